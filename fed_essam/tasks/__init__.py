"""Math tasks: problems, sources, prompts, answer extraction and grading."""

from fed_essam.tasks.problem import Problem

__all__ = ["Problem"]
