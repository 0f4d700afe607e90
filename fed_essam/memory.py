"""Peak memory of one call, on CUDA or on the CPU, as a total that ratios can compare.

:func:`measure_peak_memory` runs ``fn()`` once and returns a :class:`PeakMemory`:

* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``max_memory_allocated``
  after. The baseline is ``memory_allocated()`` at the start (everything already
  on the device: parameters, buffers, optimizer state, caches).
* CPU: PyTorch keeps no peak statistic for host memory, so ``fn`` runs under
  ``torch.profiler.profile(profile_memory=True)``. Every allocation and free of
  the c10 CPU allocator then reports the allocator's running total of live bytes
  (``total_allocated``); its maximum, minus its value just before ``fn``, is the
  exact peak increment of tensor memory, temporaries inside kernels included.
  Memory that NumPy allocates (the NumPy noise backend) is invisible to that
  counter; it is measured with :mod:`tracemalloc` (whose NumPy domain counts
  array buffers) and added: the sum of two peaks, an upper bound that is exact
  when the NumPy peak falls on the tensor peak. The baseline is the bytes of the
  tensors passed as ``resident`` (a model's parameters and buffers, an
  optimizer's state): those live before ``fn`` and are not allocated by it.

``peak_bytes = baseline_bytes + increment_bytes`` in both cases, so the ratio of
two measurements compares total peaks (weights included), not increments only.

Cost: on CPU the profiler records every operator; a forward pass of a small model
slows down by a few percent and the event list grows with the number of ops. This
is a one-off measurement helper (measure one representative step), not a monitor
to keep on during a run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

Resident = torch.Tensor | torch.nn.Module | torch.optim.Optimizer | Iterable[Any]


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one call of ``fn``.

    Attributes
    ----------
    peak_bytes : int
        ``baseline_bytes + increment_bytes``: the total peak, comparable across calls.
    baseline_bytes : int
        Bytes live before ``fn`` (CUDA: all allocated device memory; CPU: the
        ``resident`` tensors).
    increment_bytes : int
        Peak bytes above the start while ``fn`` ran (CPU: tensors plus ``host_heap_bytes``).
    retained_bytes : int
        Bytes allocated by ``fn`` and still live when it returned (e.g. optimizer
        state created on a first step, or the returned tensors).
    host_heap_bytes : int
        CPU only: peak increment of the Python/NumPy heap (:mod:`tracemalloc`),
        included in ``increment_bytes``; 0 when not tracked or on CUDA.
    device : str
        ``"cpu"`` or ``"cuda:N"``.
    method : str
        ``"cuda-allocator"`` or ``"cpu-profiler"`` (``"+tracemalloc"`` when the heap was tracked).
    result : Any
        What ``fn`` returned (not part of comparisons).
    """

    peak_bytes: int
    baseline_bytes: int
    increment_bytes: int
    retained_bytes: int
    host_heap_bytes: int
    device: str
    method: str
    result: Any = field(default=None, repr=False, compare=False)

    def ratio_to(self, other: "PeakMemory") -> float:
        """``self.peak_bytes / other.peak_bytes``."""
        return self.peak_bytes / other.peak_bytes

    def to_dict(self) -> dict[str, int | str]:
        """JSON-able form (without ``result``)."""
        return {
            "peak_bytes": self.peak_bytes,
            "baseline_bytes": self.baseline_bytes,
            "increment_bytes": self.increment_bytes,
            "retained_bytes": self.retained_bytes,
            "host_heap_bytes": self.host_heap_bytes,
            "device": self.device,
            "method": self.method,
        }


def _iter_tensors(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Every tensor held by modules (parameters, buffers), optimizers (state) and nested iterables."""
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, torch.nn.Module):
            yield from obj.parameters()
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            stack.extend(value for state in obj.state.values() if isinstance(state, dict) for value in state.values())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)


def resident_bytes(*objects: Resident, device: torch.device | str | None = None) -> int:
    """Bytes of the distinct storages behind ``objects`` (tied weights and views counted once).

    Parameters
    ----------
    *objects : tensor, nn.Module, Optimizer, or iterables of them
        Modules contribute parameters and buffers; optimizers their state tensors.
    device : torch.device or str, optional
        Count only tensors on this device (type and index).
    """
    want = None if device is None else torch.device(device)
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _iter_tensors(objects):
        if want is not None and not _same_device(tensor.device, want):
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return b.index is None or a.index in (None, b.index)


def _infer_device(resident: Iterable[Any]) -> torch.device:
    """The device of the first resident tensor, else the CPU."""
    for tensor in _iter_tensors(resident):
        return tensor.device
    return torch.device("cpu")


def measure_peak_memory(
    fn: Callable[[], Any],
    *,
    resident: Iterable[Resident] = (),
    device: torch.device | str | None = None,
    track_host_heap: bool = True,
) -> PeakMemory:
    """Run ``fn()`` once and return its peak memory (see the module docstring).

    Parameters
    ----------
    fn : callable
        The work to measure (for instance one optimizer step).
    resident : iterable of tensors, modules, optimizers
        What is live before ``fn`` and should count in the total: the model,
        the optimizer. On CPU this is the baseline; on CUDA the baseline is
        ``torch.cuda.memory_allocated()``, which includes it anyway.
    device : torch.device or str, optional
        Where to measure; default: the device of the first resident tensor, else CPU.
    track_host_heap : bool
        CPU only: add the :mod:`tracemalloc` peak (NumPy buffers, Python objects).

    Returns
    -------
    PeakMemory
        ``result`` holds what ``fn`` returned.

    Notes
    -----
    On CPU, a tensor that was allocated before the measurement and freed inside
    ``fn`` is not subtracted (the allocator never reported it), so drop such
    references before calling (``gc.collect()`` runs first). Do not nest inside
    another ``torch.profiler`` session.
    """
    resident = list(resident)
    device = torch.device(device) if device is not None else _infer_device(resident)
    if device.type == "cuda":
        return _measure_cuda(fn, device)
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on 'cpu' or 'cuda' devices, got {device}")
    return _measure_cpu(fn, resident_bytes(*resident, device="cpu"), track_host_heap)


def _measure_cuda(fn: Callable[[], Any], device: torch.device) -> PeakMemory:
    gc.collect()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    end = torch.cuda.memory_allocated(device)
    return PeakMemory(
        peak_bytes=peak, baseline_bytes=baseline, increment_bytes=peak - baseline,
        retained_bytes=max(end - baseline, 0), host_heap_bytes=0,
        device=str(torch.device("cuda", torch.cuda.current_device()) if device.index is None else device),
        method="cuda-allocator", result=result,
    )


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (Kineto prints ``profiler_start/stop`` lines there)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _measure_cpu(fn: Callable[[], Any], baseline: int, track_host_heap: bool) -> PeakMemory:
    gc.collect()
    started_tracing = False
    heap_peak = 0
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with _native_stderr_silenced():  # only the profiler's start and stop, not what fn prints
            prof.start()
        try:
            start_marker = torch.empty(1)
            # traced from here on only: the profiler's own start-up (lazy imports) would count
            if track_host_heap and not tracemalloc.is_tracing():
                tracemalloc.start()
                started_tracing = True
            heap_start = tracemalloc.get_traced_memory()[0] if track_host_heap else 0
            if track_host_heap:
                tracemalloc.reset_peak()
            result = fn()
            # read before the profiler exits: its post-processing allocates Python objects
            heap_peak = max(tracemalloc.get_traced_memory()[1] - heap_start, 0) if track_host_heap else 0
            end_marker = torch.empty(1)
        finally:
            with _native_stderr_silenced():
                prof.stop()
    finally:
        if started_tracing:
            tracemalloc.stop()
    tensor_peak, retained = _allocator_peak(prof, start_marker, end_marker)
    del start_marker, end_marker
    increment = tensor_peak + heap_peak
    return PeakMemory(
        peak_bytes=baseline + increment, baseline_bytes=baseline, increment_bytes=increment,
        retained_bytes=retained, host_heap_bytes=heap_peak, device="cpu",
        method="cpu-profiler+tracemalloc" if track_host_heap else "cpu-profiler", result=result,
    )


def _allocation_events(prof: profile) -> list[tuple[int, int, int, int]]:
    """``(time_ns, ptr, alloc_size, total_allocated)`` of every CPU allocator event, in time order."""
    from torch._C._profiler import _ExtraFields_Allocation

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        extra = node.extra_fields
        if isinstance(extra, _ExtraFields_Allocation) and extra.device.type == "cpu":
            events.append((node.start_time_ns, extra.ptr, extra.alloc_size, extra.total_allocated))
    events.sort()
    return events


def _allocator_peak(prof: profile, start_marker: torch.Tensor, end_marker: torch.Tensor) -> tuple[int, int]:
    """Peak and retained tensor bytes between the two marker allocations.

    The allocator's ``total_allocated`` is a running counter of live bytes, exact
    whatever the order in which threads report; the marker allocations bracket
    ``fn`` in time and give the counter's value just before and just after it.
    """
    events = _allocation_events(prof)
    first = _marker_position(events, start_marker.data_ptr(), last=False)
    last = _marker_position(events, end_marker.data_ptr(), last=True)
    after_start = events[first][3]
    before_end = events[last][3] - events[last][2]
    peak = max((total for _, _, _, total in events[first:last]), default=after_start)
    return max(peak - after_start, 0), max(before_end - after_start, 0)


def _marker_position(events: list[tuple[int, int, int, int]], ptr: int, *, last: bool) -> int:
    """Index of the (first or last) allocation event at ``ptr``."""
    hits = [i for i, (_, p, size, _) in enumerate(events) if p == ptr and size > 0]
    if not hits:
        raise RuntimeError("the profiler reported no allocation events; is another profiler session active?")
    return hits[-1] if last else hits[0]


__all__ = ["PeakMemory", "measure_peak_memory", "resident_bytes"]
