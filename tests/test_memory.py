import numpy as np
import pytest
import torch

from fed_essam.memory import PeakMemory, measure_peak_memory, resident_bytes

MB40 = 10_000_000  # float32 elements in 40 MB


def _within(value: int, expected: int, rel: float = 0.03) -> bool:
    return abs(value - expected) <= rel * expected


def test_a_known_40mb_tensor_shows_up_within_a_few_percent():
    def fn():
        x = torch.empty(MB40)
        x.fill_(1.0)
        return float(x[0])

    mem = measure_peak_memory(fn)
    assert isinstance(mem, PeakMemory)
    assert _within(mem.increment_bytes, 40_000_000)
    assert mem.peak_bytes == mem.baseline_bytes + mem.increment_bytes
    assert mem.retained_bytes == 0
    assert mem.result == 1.0


def test_frees_inside_fn_lower_the_live_total():
    def fn():
        a = torch.ones(MB40)
        b = a + 1  # 80 MB live
        del a
        c = b * 2  # 80 MB live again, never 120
        return float(c[0])

    mem = measure_peak_memory(fn)
    assert _within(mem.increment_bytes, 80_000_000)


def test_temporaries_inside_an_expression_count():
    x = torch.ones(MB40 // 2)  # 20 MB, allocated before: not part of the increment

    def fn():
        return float(((x + 1) * 2).sum())  # x + 1 and its product: two 20 MB temporaries at once

    mem = measure_peak_memory(fn, resident=[x])
    assert mem.baseline_bytes == 20_000_000
    assert _within(mem.increment_bytes, 40_000_000)
    assert _within(mem.peak_bytes, 60_000_000)


def test_numpy_buffers_are_counted_through_tracemalloc():
    def fn():
        return float(np.ones(MB40, dtype=np.float32).sum())

    mem = measure_peak_memory(fn)
    assert _within(mem.host_heap_bytes, 40_000_000)
    assert _within(mem.increment_bytes, 40_000_000)
    assert measure_peak_memory(fn, track_host_heap=False).increment_bytes < 1_000_000


def test_retained_allocations_are_reported():
    kept = []
    mem = measure_peak_memory(lambda: kept.append(torch.zeros(MB40)))
    assert _within(mem.retained_bytes, 40_000_000)


def test_resident_bytes_counts_parameters_buffers_optimizer_state_once():
    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 100, bias=False))
    model[2].weight = model[0].weight  # tied: counted once
    model.register_buffer("scale", torch.ones(10))
    n_params = sum(p.numel() for p in model.parameters())  # parameters() deduplicates tied weights
    assert resident_bytes(model) == 4 * (n_params + 10)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    state = resident_bytes(opt)
    assert state >= 2 * 4 * n_params  # exp_avg and exp_avg_sq (plus step counters)
    assert resident_bytes(model, opt) == resident_bytes(model) + state


def test_ratios_compare_totals():
    x = torch.ones(MB40 // 4)  # 10 MB resident
    small = measure_peak_memory(lambda: float((x * 2).sum()), resident=[x])
    big = measure_peak_memory(lambda: float((x * 2 + x * 3).sum()), resident=[x])
    assert 1.5 < big.ratio_to(small) < 2.5  # (10 + 30) / (10 + 10)
    assert set(big.to_dict()) >= {"peak_bytes", "baseline_bytes", "increment_bytes", "device", "method"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_of_a_known_tensor():
    device = torch.device("cuda")
    w = torch.ones(MB40 // 4, device=device)

    def fn():
        x = torch.empty(MB40, device=device)
        x.fill_(1.0)
        return float(x[0])

    mem = measure_peak_memory(fn, resident=[w])
    assert mem.method == "cuda-allocator"
    assert mem.baseline_bytes >= 10_000_000
    assert _within(mem.increment_bytes, 40_000_000)
