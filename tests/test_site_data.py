"""A deployed node's own data file (``data-path`` in its node config): the whole file is its share."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import cache
from clients.handler import handle, node_data_path
from fed_essam.app import compose_config
from fed_essam.data import site_problems
from fed_essam.protocol import RECORD_KEY, STATUS_OK, ProbeReply, ProbeRequest
from fed_essam.seeds import Phase, draw_seeds
from fed_essam.tasks import TaskDataError
from strategies.local_grid import ensure_task_identity

OVERRIDES = ["task.train_size=12", "eval.size=4", "batch_size=2", "federation.partition=iid",
             "federation.num_clients=2", "method.population=2", "method.ascent_population=2", "seed=5"]


def write_site(path, n: int, offset: int = 0):
    """A GSM8K-format JSONL file of ``n`` generated sums (not GSM8K itself)."""
    rows = []
    for i in range(n):
        a, b = offset + i + 2, 3 * i + 1
        rows.append({"question": f"Site problem {offset + i}: what is {a} plus {b}?",
                     "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cfg():
    ensure_task_identity()
    return compose_config(OVERRIDES)


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()
    yield
    cache.clear()


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(cfg) -> Message:
    seeds = tuple(draw_seeds(cfg.seed, 0, Phase.ASCENT, 2))
    request = ProbeRequest(step=0, phase="ascent", version=0, seeds=seeds, sigma=float(cfg.method.sigma),
                           rho=float(cfg.method.rho), pending_from=0, pending=(), ascent=None)
    return Message(RecordDict({RECORD_KEY: ConfigRecord(request.to_dict())}), dst_node_id=7,
                   message_type="train.ascent", group_id="1")


def test_site_problems_are_the_whole_file_in_order(tmp_path):
    problems = site_problems(write_site(tmp_path / "site.jsonl", 5))
    assert [p.answer for p in problems] == [str((i + 2) + (3 * i + 1)) for i in range(5)]
    assert all(p.metadata["path"] == str(tmp_path / "site.jsonl") for p in problems)


def test_site_share_replaces_the_generated_partition_without_splitting(cfg, tmp_path):
    site = write_site(tmp_path / "site0.jsonl", 7)
    share = cache.site_share(cfg, str(site))
    assert [p.question for p in share] == [p.question for p in site_problems(site)]
    generated = cache.client_share(cfg, 0, 2)
    assert {p.question for p in share}.isdisjoint({p.question for p in generated})
    # an edited file is read again (cache keyed by size and mtime)
    write_site(site, 9, offset=100)
    assert len(cache.site_share(cfg, str(site))) == 9


def test_node_data_path_reads_the_node_config():
    assert node_data_path(_context({"partition-id": 0, "num-partitions": 2})) is None
    assert node_data_path(_context({"data-path": ""})) is None
    assert node_data_path(_context({"data-path": "/data/site.jsonl"})) == "/data/site.jsonl"


@pytest.mark.parametrize("content, expected", [
    (None, "file not found"),
    ('{"question": "1 + 1?", "answer": "2\\n#### 2"}\nnot json\n', ":2: invalid JSON"),
    ('{"question": "1 + 1?", "answer": "no marker"}\n', ":1:"),
    ("\n\n", "contains no problems"),
])
def test_bad_site_file_errors_name_the_file(cfg, tmp_path, content, expected):
    site = tmp_path / "bad-site.jsonl"
    if content is not None:
        site.write_text(content, encoding="utf-8")
    with pytest.raises(TaskDataError) as info:
        cache.site_share(cfg, str(site))
    assert str(site) in str(info.value) and expected in str(info.value)


def test_handler_probes_the_nodes_own_file(cfg, tmp_path, monkeypatch):
    site = write_site(tmp_path / "site1.jsonl", 6)
    seen = []
    real = cache.site_share

    def spy(cfg_, path):
        share = real(cfg_, path)
        seen.append((path, len(share)))
        return share

    monkeypatch.setattr(cache, "site_share", spy)
    context = _context({"partition-id": 1, "num-partitions": 2, "data-path": str(site)})
    reply = ProbeReply.from_dict(handle(_message(cfg), context, cfg).content.metric_records[RECORD_KEY])
    assert reply.status == STATUS_OK and len(reply.diffs) == 2 and reply.num_examples == 2
    assert seen == [(str(site), 6)]


def test_handler_with_a_missing_site_file_names_it(cfg, tmp_path):
    missing = tmp_path / "nowhere" / "site.jsonl"
    with pytest.raises(TaskDataError, match=str(missing)):
        handle(_message(cfg), _context({"data-path": str(missing)}), cfg)
