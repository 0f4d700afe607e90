"""Math tasks: problems, sources, prompts, answer extraction and grading."""

from fed_essam.tasks.answers import extract_answer, is_correct, normalize_answer
from fed_essam.tasks.errors import TaskDataError, TaskDataWarning
from fed_essam.tasks.grading import extract_expression, grade
from fed_essam.tasks.loading import SOURCE_NAMES, load_problems
from fed_essam.tasks.problem import Problem
from fed_essam.tasks.prompts import format_prompt, format_target

__all__ = [
    "Problem",
    "SOURCE_NAMES",
    "TaskDataError",
    "TaskDataWarning",
    "extract_answer",
    "extract_expression",
    "format_prompt",
    "format_target",
    "grade",
    "is_correct",
    "load_problems",
    "normalize_answer",
]
