"""fed_essam.partition: deterministic, disjoint, covering, never empty, clear errors."""

from __future__ import annotations

from collections import Counter

import pytest

from fed_essam.partition import PartitionError, group_of, partition, partition_indices
from fed_essam.tasks import Problem


def _labels(n: int, groups: int) -> list[tuple[str, str]]:
    return [("task", str(i % groups)) for i in range(n)]


def _check_split(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "parts must cover every item exactly once"
    assert all(parts), "no part may be empty"
    assert all(part == sorted(part) for part in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [1, 3, 7])
def test_split_is_deterministic_disjoint_and_covering(scheme, num_partitions):
    labels = _labels(200, 5)
    parts = partition_indices(labels, num_partitions, scheme=scheme, alpha=0.5, seed=3)
    assert len(parts) == num_partitions
    _check_split(parts, len(labels))
    assert parts == partition_indices(labels, num_partitions, scheme=scheme, alpha=0.5, seed=3)


def test_iid_sizes_differ_by_at_most_one_and_depend_on_the_seed():
    parts = partition_indices(_labels(103, 1), 4, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts != partition_indices(_labels(103, 1), 4, scheme="iid", seed=1)


def test_small_alpha_concentrates_groups_large_alpha_spreads_them():
    labels = _labels(400, 4)

    def purity(alpha: float) -> float:
        parts = partition_indices(labels, 4, scheme="dirichlet", alpha=alpha, seed=0)
        return sum(max(Counter(labels[i] for i in p).values()) / len(p) for p in parts) / len(parts)

    assert purity(0.05) > 0.6
    assert purity(1000.0) < 0.4


def test_shared_gives_everyone_everything():
    assert partition_indices(_labels(5, 2), 3, scheme="shared") == [list(range(5))] * 3


def test_partition_returns_the_share_of_one_client_by_task_and_difficulty():
    problems = [Problem(f"q{i}", f"s{i}", str(i), metadata={"task": "t", "difficulty": i % 3}) for i in range(30)]
    assert group_of(problems[4]) == ("t", "1")
    assert group_of(Problem("q", "s", "1", source="jsonl:x")) == ("jsonl:x", "?")
    shares = [partition(problems, k, 3, scheme="dirichlet", alpha=0.3, seed=1) for k in range(3)]
    assert sorted(p.question for share in shares for p in share) == sorted(p.question for p in problems)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": _labels(2, 1), "num_partitions": 3}, "non-empty private share"),
        ({"labels": _labels(9, 1), "num_partitions": 0}, "positive integer"),
        ({"labels": _labels(9, 1), "num_partitions": 2, "scheme": "shards"}, "unknown partition scheme"),
        ({"labels": _labels(9, 1), "num_partitions": 2, "scheme": "dirichlet", "alpha": 0.0}, "dirichlet_alpha"),
        ({"labels": _labels(4, 1), "num_partitions": 4, "scheme": "dirichlet", "alpha": 0.01}, "without data"),
    ],
)
def test_impossible_splits_raise_clear_errors(kwargs, match):
    with pytest.raises(PartitionError, match=match):
        partition_indices(**kwargs)


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(PartitionError, match="partition-id 3"):
        partition(list(range(10)), 3, 3, labels=[0] * 10)
