"""Tests of fed_essam.tasks: sources, answer extraction, grading and prompts."""

from __future__ import annotations

import random
import sys
import types
import warnings
from pathlib import Path

import pytest

from fed_essam.tasks import (
    SOURCE_NAMES,
    Problem,
    TaskDataError,
    TaskDataWarning,
    extract_answer,
    extract_expression,
    format_prompt,
    format_target,
    grade,
    is_correct,
    load_problems,
)
from fed_essam.tasks.arithmetic_steps import arithmetic_steps
from fed_essam.tasks.gsm8k_format import strip_calculator_annotations

DATA = Path(__file__).parent / "data"
REAL_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
RG_SOURCES = ("gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown")

# --------------------------------------------------------------------------- extraction

EXTRACTION_CASES = [
    # "####" (GSM8K)
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### $1,234.00", "1234"),
    ("#### -12", "-12"),
    ("#### 42 apples", "42"),
    ("#### 3.50", "3.5"),
    ("#### 18\nQuestion: next one? #### 99", "18"),
    ("####\n#### 5", "5"),
    ("Total: 5 + 5 = 10\n#### x = 10", "10"),
    # \boxed{}
    ("So the result is \\boxed{42}.", "42"),
    ("\\boxed{1} then corrected: \\boxed{2}", "2"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{\\$25}", "25"),
    ("\\boxed{12\\%}", "12"),
    ("$\\boxed{-7}$", "-7"),
    # "the answer is" / "answer:"
    ("The answer is 42.", "42"),
    ("THE ANSWER IS 17", "17"),
    ("the answer is: $2,500", "2500"),
    ("Answer: 0.75", "0.75"),
    ("answer: -3", "-3"),
    ("So the answer is 12 + 30 = 42.", "42"),
    ("First 5, then 6. The answer is 11. I checked 3 times.", "11"),
    ("Final answer: 50%", "50"),
    ("The answer is € 12.50.", "12.5"),
    ("The answer is £7", "7"),
    # last number fallback
    ("I think it is 5, no wait, 6", "6"),
    ("We get 12.", "12"),
    ("He pays $3,000 in total.", "3000"),
    ("It is 3/4 of the cake", "3/4"),
    ("6/8", "3/4"),
    ("the value is -.5", "-0.5"),
    ("\u22124 degrees", "-4"),
    ("5-3", "3"),
    ("20.00", "20"),
    ("1,000,000 people", "1000000"),
    ("4 / 2", "2"),
    # no answer
    ("", None),
    ("   \n\t", None),
    ("no numbers here", None),
    ("####", None),
    ("\\boxed{}", None),
    ("The answer is unknown.", None),
    ("3/0", None),
    ("x2 and y7", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer_table(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extraction_table_is_large_enough() -> None:
    assert len(EXTRACTION_CASES) >= 30


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("#### 3/4", "0.75", True),
        ("#### 0.75", "3/4", True),
        ("#### 1,234", "1234", True),
        ("The answer is $18.00", "18", True),
        ("#### 50%", "50", True),
        ("#### 100000001", "100000000", True),  # within 1e-6 relative
        ("#### 1001", "1000", False),
        ("#### 41", "42", False),
        ("#### -5", "5", False),
        ("nothing", "5", False),
        ("#### 5", "", False),
        ("#### forty two", "Forty Two", True),
        ("#### 7", "#### 7", True),
    ],
)
def test_is_correct(completion: str, gold: str, expected: bool) -> None:
    assert is_correct(completion, gold) is expected


def test_extract_answer_fuzz_never_raises() -> None:
    rng = random.Random(1234)
    pieces = [
        "####",
        "\\boxed{",
        "}",
        "{",
        "answer is",
        "Answer:",
        "$",
        "€",
        "%",
        ",",
        ".",
        "/",
        "-",
        "=",
        "\\frac{",
        "0",
        "7",
        "123",
        "1,000",
        " ",
        "\n",
        "abc",
        "\u2212",
        "<<",
        ">>",
        "9" * 60,
        "/0",
    ]
    for _ in range(3000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        else:
            text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 40)))
        result = extract_answer(text)
        assert result is None or (isinstance(result, str) and result)
        assert isinstance(is_correct(text, text), bool)
        assert extract_expression(text) is None or isinstance(extract_expression(text), str)
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer("9" * 5000) is None or isinstance(extract_answer("9" * 5000), str)


# --------------------------------------------------------------------------- reasoning-gym


@pytest.fixture(scope="module")
def rg_problems() -> dict[str, list[Problem]]:
    return {name: load_problems(name, size=20, seed=7) for name in RG_SOURCES}


@pytest.mark.parametrize("name", RG_SOURCES)
def test_reasoning_gym_source_problems(name: str, rg_problems: dict[str, list[Problem]]) -> None:
    problems = rg_problems[name]
    assert len(problems) == 20
    for problem in problems:
        assert problem.source == name
        assert problem.question and problem.answer
        assert problem.solution.endswith(f"#### {problem.answer}")
        assert problem.metadata["task"] == name
        assert isinstance(problem.metadata["difficulty"], int) and problem.metadata["difficulty"] >= 1
        assert problem.metadata["rg_dataset"] == name
        assert grade(problem, problem.solution), problem
        if name != "countdown":
            assert is_correct(problem.solution, problem.answer)
    assert len({problem.metadata["difficulty"] for problem in problems}) > 1 or name == "gsm_symbolic"


@pytest.mark.parametrize("name", RG_SOURCES)
def test_reasoning_gym_determinism(name: str, rg_problems: dict[str, list[Problem]]) -> None:
    again = load_problems(name, size=20, seed=7)
    assert [(p.question, p.solution, p.answer) for p in again] == [
        (p.question, p.solution, p.answer) for p in rg_problems[name]
    ]
    # reasoning-gym items are Random(seed + index): neighbouring seeds must not share problems
    other_seed = {p.question for p in load_problems(name, size=20, seed=8)}
    other_split = {p.question for p in load_problems(name, size=20, seed=7, split="test")}
    questions = {p.question for p in rg_problems[name]}
    assert len(questions & other_seed) <= 2
    assert len(questions & other_split) <= 2


def test_gsm_symbolic_uses_chain_of_thought(rg_problems: dict[str, list[Problem]]) -> None:
    for problem in rg_problems["gsm_symbolic"]:
        cot = problem.metadata["rg_entry"]["metadata"]["answer_cot"]
        first_step = cot.strip().splitlines()[0].strip()
        assert problem.solution.startswith(first_step)
        assert problem.solution.count("\n") == problem.metadata["difficulty"]


def test_generator_kwargs_pass_through() -> None:
    problems = load_problems("chain_sum", size=20, seed=0, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    for problem in problems:
        assert problem.metadata["difficulty"] == 3
        assert len(problem.metadata["rg_entry"]["metadata"]["expression"].split()) == 3
    hard = load_problems("basic_arithmetic", size=20, seed=0, min_terms=5, max_terms=6, min_digits=3)
    assert min(p.metadata["difficulty"] for p in hard) >= 8


def test_bad_generator_kwargs_raise_task_data_error() -> None:
    with pytest.raises(TaskDataError, match="chain_sum.*min_terms"):
        load_problems("chain_sum", size=5, seed=0, min_terms=4, max_terms=2)
    with pytest.raises(TaskDataError, match="countdown"):
        load_problems("countdown", size=5, seed=0, no_such_knob=1)


def test_arithmetic_steps_worked_solution() -> None:
    assert arithmetic_steps("-( 3 + 4 ) * 2 - -5") == ["-(3 + 4) * 2 - -5", "-7 * 2 - -5", "-14 - -5", "-9"]
    assert arithmetic_steps("-7 / 2")[-1] == "-4"  # floor division, as reasoning-gym evaluates it
    with pytest.raises(ValueError):
        arithmetic_steps("__import__('os')")


def test_countdown_graded_by_its_checker() -> None:
    problem = load_problems("countdown", size=1, seed=3, operators=("+",), min_numbers=4, max_numbers=4)[0]
    numbers = problem.metadata["rg_entry"]["metadata"]["numbers"]
    target = problem.metadata["rg_entry"]["metadata"]["target"]
    assert sum(numbers) == target
    reordered = " + ".join(str(n) for n in reversed(numbers))
    assert reordered != problem.answer  # a different, still correct expression
    assert grade(problem, f"Let me add them all.\n#### {reordered}")
    assert grade(problem, f"\\boxed{{{reordered}}}")
    assert grade(problem, f"I add them:\n{reordered} = {target}")
    assert grade(problem, "The answer is: " + " + ".join(str(n) for n in numbers))
    assert not grade(problem, "#### " + " + ".join(f"{n} \\times 1" for n in numbers))  # extra numbers
    assert not grade(problem, "#### " + " - ".join(str(n) for n in numbers))  # wrong value
    assert not grade(problem, "#### " + " + ".join(str(n) for n in numbers[:-1]))  # not all numbers
    assert not grade(problem, f"#### {target}")
    assert not grade(problem, "#### __import__('os').system('echo hacked')")
    assert not grade(problem, "")


def test_grade_numeric_sources_with_checker_and_fallback(rg_problems: dict[str, list[Problem]]) -> None:
    chain = rg_problems["chain_sum"][0]
    assert grade(chain, f"The answer is {chain.answer}.")
    assert not grade(chain, f"#### {int(chain.answer) + 1}")
    arithmetic = rg_problems["basic_arithmetic"][0]  # generic checker: graded by is_correct
    assert grade(arithmetic, f"#### {int(arithmetic.answer):,}")
    assert not grade(arithmetic, "no idea")
    plain = Problem(question="q", solution="#### 0.75", answer="0.75", source="jsonl:x")
    assert grade(plain, "#### 3/4")
    assert not grade(plain, "#### 3/5")


# --------------------------------------------------------------------------- JSONL


def test_jsonl_happy_path() -> None:
    path = DATA / "gsm8k_tiny.jsonl"
    problems = load_problems("jsonl", size=None, seed=0, path=str(path))
    assert [p.answer for p in problems] == ["39", "45", "1380", "1", "1.75"]
    assert [p.metadata["line"] for p in problems] == [1, 2, 3, 5, 6]  # blank line 4 ignored
    for problem in problems:
        assert "<<" not in problem.solution and ">>" not in problem.solution
        assert problem.solution.endswith(f"#### {problem.answer}")
        assert problem.metadata["task"] == "gsm8k"
        assert problem.metadata["difficulty"] == problem.solution.count("\n")
        assert is_correct(problem.solution, problem.answer) and grade(problem, problem.solution)
    assert problems[0].solution.startswith("She bakes 12 * 4 = 48 muffins.")
    sample = load_problems("jsonl", size=3, seed=1, path=str(path))
    assert len(sample) == 3 and sample == load_problems("jsonl", size=3, seed=1, path=str(path))


def test_strip_calculator_annotations() -> None:
    assert strip_calculator_annotations("2 * 3 = <<2*3=6>>6 and <<6+1=7>>7") == "2 * 3 = 6 and 7"


GOOD = '{"question": "Q?", "answer": "1 + 1 = <<1+1=2>>2\\n#### 2"}'


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"question": "Q?", "answer": ', "invalid JSON"),
        ('{"question": "Q?"}', "missing field 'answer'"),
        ('{"answer": "#### 3"}', "missing field 'question'"),
        ('{"question": "Q?", "answer": "no final line"}', "####"),
        ('{"question": "Q?", "answer": "#### lots"}', "####"),
        ('["Q?", "#### 3"]', "JSON object"),
        ('{"question": "", "answer": "#### 3"}', "non-empty"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n{bad_line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as error:
        load_problems("jsonl", size=None, seed=0, path=str(path))
    assert f"{path}:3:" in str(error.value)
    assert reason in str(error.value)
    with pytest.warns(TaskDataWarning, match="skipped 1 invalid line"):
        assert len(load_problems("jsonl", size=None, seed=0, path=str(path), on_error="skip")) == 3


def test_jsonl_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(TaskDataError, match=r"latin1\.jsonl:2:"):
        load_problems("jsonl", size=None, seed=0, path=str(path))


def test_jsonl_skip_mode_counts_fixture() -> None:
    path = DATA / "gsm8k_bad_lines.jsonl"
    with pytest.raises(TaskDataError, match=r"gsm8k_bad_lines\.jsonl:2: invalid JSON"):
        load_problems("jsonl", size=None, seed=0, path=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = load_problems("jsonl", size=None, seed=0, path=str(path), on_error="skip")
    messages = [str(w.message) for w in caught if issubclass(w.category, TaskDataWarning)]
    assert len(messages) == 1 and "skipped 4 invalid line(s)" in messages[0]
    assert [p.answer for p in problems] == ["15", "12"]
    assert [p.metadata["line"] for p in problems] == [1, 5]


def test_jsonl_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskDataError, match=r"nope\.jsonl: file not found"):
        load_problems("jsonl", size=None, seed=0, path=str(missing), on_error="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"empty\.jsonl: the file contains no problems"):
        load_problems("jsonl", size=None, seed=0, path=str(empty))
    with pytest.raises(TaskDataError, match="needs a path"):
        load_problems("jsonl", size=None, seed=0)


def test_load_problems_rejects_bad_arguments() -> None:
    with pytest.raises(TaskDataError, match="unknown task source 'gsm9k'"):
        load_problems("gsm9k", size=5, seed=0)
    with pytest.raises(TaskDataError, match="on_error"):
        load_problems("chain_sum", size=5, seed=0, on_error="ignore")
    with pytest.raises(TaskDataError, match="size"):
        load_problems("chain_sum", size=0, seed=0)
    assert {"gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown", "jsonl", "hub"} <= set(SOURCE_NAMES)


@pytest.mark.skipif(not REAL_GSM8K.exists(), reason="real GSM8K test file not available")
def test_real_gsm8k_file() -> None:
    problems = load_problems("jsonl", size=None, seed=0, path=str(REAL_GSM8K))
    assert len(problems) == 1000
    for problem in problems:
        assert extract_answer(problem.solution) == problem.answer
        assert is_correct(problem.solution, problem.answer)
        assert "<<" not in problem.solution


# --------------------------------------------------------------------------- hub


def test_hub_without_datasets_points_to_jsonl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskDataError, match=r"`datasets`.*task=jsonl task\.path=FILE"):
        load_problems("hub", size=None, seed=0)


def test_hub_offline_points_to_jsonl(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(TaskDataError) as error:
        load_problems("gsm8k_hub", size=None, seed=0, split="test")
    message = str(error.value)
    assert "openai/gsm8k" in message and "ConnectionError" in message and "task=jsonl task.path=FILE" in message


def test_hub_loads_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str, split: str) -> list[dict[str, str]]:
        calls.append((name, config, split))
        return [{"question": "Q1?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}, {"question": "Q2?", "answer": "#### 9"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_problems("hub", size=None, seed=0, split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [p.answer for p in problems] == ["4", "9"]
    assert problems[0].solution == "2 + 2 = 4\n#### 4"


# --------------------------------------------------------------------------- prompts


class FakeChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, object]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: object) -> str:
        self.calls.append((messages, kwargs))
        return f"<|user|>{messages[0]['content']}<|assistant|>"


def test_plain_prompt_and_target() -> None:
    prompt = format_prompt("What is 2 + 3?")
    target = format_target("2 + 3 = 5\n#### 5")
    assert prompt == "Question: What is 2 + 3?\nAnswer:"
    assert prompt + target == "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5"
    assert format_prompt("What is 2 + 3?", tokenizer=object(), template="auto") == prompt
    assert extract_answer(target) == "5"


def test_chat_prompt_uses_tokenizer_template() -> None:
    tokenizer = FakeChatTokenizer()
    prompt = format_prompt("What is 2 + 3?", tokenizer=tokenizer, template="chat")
    messages, kwargs = tokenizer.calls[0]
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith("What is 2 + 3?")
    assert "####" in messages[0]["content"]
    assert kwargs == {"tokenize": False, "add_generation_prompt": True}
    assert prompt.endswith("<|assistant|>")
    assert format_prompt("What is 2 + 3?", tokenizer=tokenizer, template="auto") == prompt
    assert format_target("#### 5", template="chat") == "#### 5"
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt("q", template="chat")
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt("q", template="fancy")
