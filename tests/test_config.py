"""Configuration: composition, the validation table, and the pure data functions."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fed_essam.cli import compose_config
from fed_essam.config import ConfigError, RunConfig, to_run_config, validate_config
from fed_essam.data import build_problem_sets, derive_seed, problem_key, step_batch
from fed_essam.tasks import Problem, TaskDataError

DATA = "tests/data/gsm8k_tiny.jsonl"


def test_defaults_compose_and_validate() -> None:
    cfg = validate_config(compose_config([]))
    assert cfg.mode == "federated" and cfg.method.name == "essam" and cfg.model.name == "tiny"
    assert cfg.task.eval_size == cfg.eval.size  # interpolation resolved
    assert isinstance(to_run_config(compose_config(["mode=central"])), RunConfig)


@pytest.mark.parametrize("method", ["essam", "essam_f", "es", "mezo", "essam_paper"])
def test_every_method_preset_validates(method: str) -> None:
    validate_config(compose_config([f"method={method}"]))


def test_backprop_validates_in_central_mode() -> None:
    validate_config(compose_config(["method=backprop", "mode=central"]))


BAD = [
    (["method.sigma=-0.1"], "method.sigma"),
    (["method.sigma=0"], "method.sigma"),
    (["method.lr=0"], "method.lr"),
    (["method.lr=-1e-3"], "method.lr"),
    (["method.lr=fast"], "method.lr"),
    (["method.population=0"], "method.population"),
    (["method.population=1"], "method.population"),  # z-scores need two probes
    (["method.rho=-1"], "method.rho"),
    (["method.ascent_population=0"], "method.ascent_population"),
    (["method.name=adam"], "method.name"),
    (["method.shaping=rank"], "method.shaping"),
    (["method.fitness=accuracy"], "method.fitness"),
    (["method.noise_backend=cuda"], "method.noise_backend"),
    (["method=es", "method.rho=0.1"], "method.rho"),
    (["method=backprop"], "mode"),  # backprop is central only
    (["task.source=nope"], "task.source"),
    (["task.eval_source=nope"], "task.eval_source"),
    (["task=jsonl"], "task.path"),
    (["task=jsonl", "task.path=/no/such/file.jsonl"], "task.path"),
    (["task.train_size=0"], "task.train_size"),
    (["task.on_error=ignore"], "task.on_error"),
    (["federation.fraction=0"], "federation.fraction"),
    (["federation.fraction=1.5"], "federation.fraction"),
    (["federation.num_clients=0"], "federation.num_clients"),
    (["federation.num_clients=5", "task.train_size=4"], "federation.num_clients"),
    (["federation.min_clients=9"], "federation.min_clients"),
    (["federation.aggregation=mode"], "federation.aggregation"),
    (["federation.trim_fraction=0.5"], "federation.trim_fraction"),
    (["eval.size=0"], "eval.size"),
    (["eval.size=-3"], "eval.size"),
    (["eval.every=-1"], "eval.every"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["num_rounds=0"], "num_rounds"),
    (["batch_size=0"], "batch_size"),
    (["mode=distributed"], "mode"),
    (["device=gpu"], "device"),
    (["resume=/no/such/run"], "resume"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.template=fancy"], "model.template"),
    (["+model.lora={rank: 4}"], "model.lora"),
    (["privacy=dp", "privacy.clip=0"], "privacy.clip"),
    (["privacy=dp", "privacy.delta=1"], "privacy.delta"),
    (["+num_round=3"], "num_round"),  # a typo is an unknown key
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_raises_config_error_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(overrides))
    message = str(info.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_more_clients_than_problems_is_fine_in_central_mode() -> None:
    validate_config(compose_config(["mode=central", "federation.num_clients=5", "task.train_size=4"]))


def test_validate_accepts_plain_dicts_and_fills_defaults() -> None:
    cfg = validate_config({"mode": "central", "method": {"name": "es", "lr": 0.1, "sigma": 0.01}})
    assert cfg.method.population == 16 and cfg.eval.size == 100


def test_schema_defaults_match_the_yaml_defaults() -> None:
    """A plain dict filled by the dataclasses gets the same run-level defaults as `fed-essam` with no overrides."""
    composed, filled = _cfg_default(), validate_config({"method": {"name": "es"}})  # essam needs rho > 0
    for key in ("num_rounds", "batch_size", "checkpoint_every", "seed", "mode"):
        assert filled[key] == composed[key], key
    for key in ("every", "size", "batch_size", "max_new_tokens", "sharpness_directions", "sharpness_radius"):
        assert filled.eval[key] == composed.eval[key], f"eval.{key}"
    for key in ("lr", "sigma", "population"):
        assert filled.method[key] == composed.method[key], f"method.{key}"
    assert filled.task.train_size == composed.task.train_size


def _cfg_default():
    return validate_config(compose_config([]))


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def _cfg(*overrides: str):
    return validate_config(compose_config(["mode=central", *overrides]))


def test_train_and_held_out_never_overlap_and_are_deterministic() -> None:
    cfg = _cfg("task.train_size=300", "eval.size=100")
    train, held = build_problem_sets(cfg)
    assert len(train) == 300 and len(held) == 100
    assert not {problem_key(p) for p in train} & {problem_key(p) for p in held}
    assert len({problem_key(p) for p in held}) == 100  # no duplicates inside the held-out set
    again_train, again_held = build_problem_sets(cfg)
    assert again_train == train and again_held == held
    # the run seed orders batches; it does not change the problems
    assert build_problem_sets(_cfg("task.train_size=300", "eval.size=100", "seed=7")) == (train, held)
    other, _ = build_problem_sets(_cfg("task.train_size=300", "eval.size=100", "+task.data_seed=1"))
    assert other != train


def test_small_problem_space_is_split_between_train_and_held_out() -> None:
    # 2-term single-digit sums: 10 * 10 * 2 = 200 problems, fewer than the pool asks for
    cfg = _cfg("task.train_size=400", "eval.size=80", "task.kwargs.min_terms=2", "task.kwargs.max_terms=2")
    train, held = build_problem_sets(cfg)
    assert len(held) == 80 and len(train) == 400
    train_keys, held_keys = {problem_key(p) for p in train}, {problem_key(p) for p in held}
    assert not train_keys & held_keys
    assert len(held_keys) == 80 and len(train_keys) > 100  # most of the other 120 problems


def test_held_out_larger_than_the_problem_space_raises() -> None:
    cfg = _cfg("task.train_size=50", "eval.size=250", "task.kwargs.min_terms=2", "task.kwargs.max_terms=2")
    with pytest.raises(TaskDataError, match="held-out"):
        build_problem_sets(cfg)


def test_one_jsonl_file_is_split_without_overlap() -> None:
    cfg = _cfg("task=jsonl", f"task.path={DATA}", "eval.size=2")
    train, held = build_problem_sets(cfg)
    assert len(held) == 2 and 1 <= len(train) <= 4  # the file repeats a question: both copies go to one side
    assert not {p.question for p in train} & {p.question for p in held}


def test_eval_path_gives_the_held_out_set() -> None:
    cfg = _cfg("task=jsonl", f"task.path={DATA}", f"task.eval_path={DATA}", "eval.size=2")
    train, held = build_problem_sets(cfg)  # same file: the held-out problems leave the pool
    assert len(held) == 2 and train and not {p.question for p in train} & {p.question for p in held}
    with pytest.raises(TaskDataError, match="held-out"):  # nothing left to train on
        build_problem_sets(_cfg("task=jsonl", f"task.path={DATA}", f"task.eval_path={DATA}", "eval.size=6"))


def _pool(n: int) -> list[Problem]:
    return [Problem(question=f"q{i}", solution=f"#### {i}", answer=str(i)) for i in range(n)]


def test_step_batch_is_deterministic_and_covers_an_epoch() -> None:
    pool = _pool(10)
    batches = [step_batch(pool, t, 5, seed=3) for t in range(4)]
    assert batches == [step_batch(pool, t, 5, seed=3) for t in range(4)]
    assert sorted(p.answer for p in batches[0] + batches[1]) == sorted(p.answer for p in pool)
    assert batches[0] + batches[1] != batches[2] + batches[3]  # a new order every epoch
    assert step_batch(pool, 0, 5, seed=4) != batches[0]


def test_step_batch_fixed_and_wrapping() -> None:
    pool = _pool(7)
    assert step_batch(pool, 9, 3, seed=0, fixed=True) == step_batch(pool, 0, 3, seed=0)
    big = step_batch(pool, 2, 10, seed=0)  # larger than the pool: wraps into the next epochs
    assert len(big) == 10
    with pytest.raises(ValueError):
        step_batch([], 0, 1, seed=0)
    with pytest.raises(ValueError):
        step_batch(pool, 0, 0, seed=0)


def test_derive_seed_separates_streams() -> None:
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, k) for k in range(50)}) == 50
    assert 0 <= derive_seed(-5, 3) < 2**63


def test_compose_config_drops_hydra_node() -> None:
    cfg = compose_config(["mode=central"])
    assert "hydra" not in cfg
    assert OmegaConf.select(cfg, "method.name") == "essam"
