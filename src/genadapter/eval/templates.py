"""Prompt templates the methods choose from on a dev split: wordings from `genadapter.formats` ± chat format.

The first candidate of every slot is the wording used in training (chat-formatted); it wins ties, so a
method only moves away from the training format when the dev split says another wording is better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import formats
from ..errors import GenAdapterError


@dataclass(frozen=True)
class Template:
    """How a query becomes the prompt: `build(query)`, in the model's chat template when `chat`."""

    name: str
    build: Callable[[str], str]
    chat: bool

    def __call__(self, query: str) -> str:
        return self.build(query)


KNOWLEDGE = (
    Template("qa-chat", formats.qa_prompt, True),
    Template("qa-plain", formats.qa_prompt, False),
    Template("question-answer-plain", formats.question_answer, False),
    Template("question-answer-chat", formats.question_answer, True),
    Template("answer-only-chat", formats.answer_only, True),
)
ICL = (
    Template("icl-chat", formats.icl_query, True),
    Template("icl-plain", formats.icl_query, False),
)
RECALL = (
    Template("persona-question-chat", lambda _: formats.persona_question(), True),
    Template("persona-statement-plain", lambda _: formats.persona_statement(), False),
)
REPLY = (
    Template("reply-chat", formats.reply_prompt, True),
    Template("reply-turn-plain", formats.reply_turn, False),
)


def parse_forced(spec: str | None, slots: dict[str, Sequence[Template]]) -> dict[str, Template]:
    """`--template NAME[,NAME]`: each name fixes the slot whose candidates include it."""
    forced: dict[str, Template] = {}
    for name in [n.strip() for n in (spec or "").split(",") if n.strip()]:
        for slot, candidates in slots.items():
            match = next((t for t in candidates if t.name == name), None)
            if match is not None:
                forced[slot] = match
                break
        else:
            known = ", ".join(t.name for c in slots.values() for t in c)
            raise GenAdapterError(f"unknown template {name!r}; this scenario has: {known}")
    return forced
