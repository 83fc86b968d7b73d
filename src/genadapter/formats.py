"""How contexts and prompts are worded; shared by training and evaluation so both see the same format."""

from __future__ import annotations

from collections.abc import Sequence


def demonstrations(examples: Sequence[tuple[str, str]]) -> str:
    """k demonstrations as one context document."""
    return "\n\n".join(f"Input: {x}\nOutput: {y}" for x, y in examples)


def icl_query(x: str) -> str:
    return f"Input: {x}\nOutput:"


def qa_prompt(question: str) -> str:
    """Closed-book / adapted prompt: the question alone, asking for a short answer."""
    return f"Answer with a few words.\nQuestion: {question}"


def with_context(context: str, prompt: str) -> str:
    """The in-context baseline (and the distillation teacher): the context precedes the prompt."""
    return f"{context}\n\n{prompt}"
