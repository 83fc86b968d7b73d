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


# ---- more wordings, the candidates that evaluation picks from on a dev split ----------------------


def question_answer(question: str) -> str:
    """Plain completion-style QA prompt (no instruction)."""
    return f"Question: {question}\nAnswer:"


def answer_only(question: str) -> str:
    """A stricter short-answer instruction: small LMs otherwise answer extractive questions in full sentences."""
    return f"{question}\nReply with only the answer (a name, number or short phrase), not a sentence."


PARTNER, USER = "Partner", "User"


def dialogue(turns: Sequence[tuple[str, str]]) -> str:
    """A chat history as one context document: the partner speaks first, then the user replies."""
    lines = []
    for partner, user in turns:
        if partner.strip():
            lines.append(f"{PARTNER}: {partner.strip()}")
        if user.strip():
            lines.append(f"{USER}: {user.strip()}")
    return "\n".join(lines)


def persona_question() -> str:
    """Question about the user whose chat history is the context (answered with one sentence)."""
    return f"What is one fact about the {USER}? Answer with one sentence."


def persona_statement() -> str:
    """Completion-style prefix of a fact about the user."""
    return f"A fact about the {USER}:"


def reply_prompt(message: str) -> str:
    """Ask for the user's reply to the partner's last message."""
    return f"Reply as the {USER} to the {PARTNER}'s message.\n{PARTNER}: {message.strip()}"


def reply_turn(message: str) -> str:
    """Completion-style dialogue turn: the partner's message, then the user's turn to speak."""
    return f"{PARTNER}: {message.strip()}\n{USER}:"
