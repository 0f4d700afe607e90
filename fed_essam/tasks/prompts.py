"""Prompt and target formatting: ``prompt + target`` is the natural training text."""

from __future__ import annotations

from typing import Any

PLAIN_PROMPT = "Question: {question}\nAnswer:"
"""Plain template: short, for the default character-level model."""

CHAT_INSTRUCTION = "\nSolve it step by step and end with a line '#### <answer>'."
"""Appended to the question in the chat template."""

TEMPLATES: tuple[str, ...] = ("plain", "chat", "auto")


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """Resolve ``"auto"`` to ``"chat"`` or ``"plain"`` and validate the name.

    Parameters
    ----------
    template : {"plain", "chat", "auto"}
        Requested template; ``"auto"`` is ``"chat"`` when
        ``tokenizer.chat_template`` is set, else ``"plain"``.
    tokenizer : Any, optional
        A Hugging Face tokenizer (or anything with ``chat_template`` and
        ``apply_chat_template``).

    Returns
    -------
    str
        ``"plain"`` or ``"chat"``.

    Raises
    ------
    ValueError
        On an unknown template, or ``"chat"`` without a tokenizer that has a
        chat template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "plain"
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' needs a tokenizer with a chat_template; use template='plain' or 'auto'")
    return template


def format_prompt(question: str, tokenizer: Any = None, template: str = "plain") -> str:
    """Format a question as the model's prompt.

    Parameters
    ----------
    question : str
        Problem statement.
    tokenizer : Any, optional
        Tokenizer used by the chat template.
    template : {"plain", "chat", "auto"}, optional
        ``"plain"``: ``"Question: {question}\\nAnswer:"``; ``"chat"``: the
        tokenizer's chat template on one user turn (question plus
        :data:`CHAT_INSTRUCTION`) with the generation prompt; ``"auto"``: chat
        when the tokenizer has a chat template.

    Returns
    -------
    str
        The prompt text.
    """
    if resolve_template(template, tokenizer) == "plain":
        return PLAIN_PROMPT.format(question=question.strip())
    messages = [{"role": "user", "content": question.strip() + CHAT_INSTRUCTION}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_target(solution: str, template: str = "plain", tokenizer: Any = None) -> str:
    """Format a solution as the text that follows the prompt (the scored target).

    Parameters
    ----------
    solution : str
        Worked solution ending in ``#### <answer>``.
    template : {"plain", "chat", "auto"}, optional
        Must match the template of :func:`format_prompt`: ``"plain"`` puts a
        space after ``"Answer:"``; after a chat generation prompt the solution
        starts directly.
    tokenizer : Any, optional
        Needed only to resolve ``"auto"``.

    Returns
    -------
    str
        The target text.
    """
    if template == "auto":
        template = resolve_template(template, tokenizer)
    elif template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")
    return " " + solution.strip() if template == "plain" else solution.strip()
