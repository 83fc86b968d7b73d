"""Cost of adapting vs prompting, by context length, in one run on the embedded SmolLM2.

For contexts of 512 … 32K tokens (Wikipedia leads): seconds and peak memory of `absorb`, bytes of the
state, and per-answer latency + memory of (a) the adapted model with the question alone vs (b) the
base model prompted with the whole context (left-truncated to the model's window). Prints a markdown
table and writes JSON.

    python -m bench.adapt_cost --json bench/results/adapt_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from bench.peak_rss import measure
from genadapter import GenerativeAdapter, formats
from genadapter.data import wiki_leads

QUESTION = "What is the first topic of the text about?"


def kv_cache_bytes(model, tokens: int) -> int:
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * model.dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=Path("bench/results/adapt_cost.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    ga = GenerativeAdapter.from_pretrained()
    window = ga.model.config.get_text_config().max_position_embeddings - args.new_tokens - 64
    text_ids = ga.tokenizer("\n\n".join(t for _, t in wiki_leads()[:3000]), add_special_tokens=False)["input_ids"]
    question = formats.qa_prompt(QUESTION)
    ga.generate(question, max_new_tokens=2)  # warm-up

    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        context = text_ids[:length]
        state, absorb_s, absorb_mib = measure(lambda c=context: ga.absorb(c, progress=False))
        _, adapted_s, adapted_mib = measure(
            lambda s=state: ga.generate(
                question, state=s, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens
            )
        )
        kept = context[-window:]
        prompt = formats.with_context(ga.tokenizer.decode(kept), question)
        _, prompted_s, prompted_mib = measure(
            lambda p=prompt: ga.generate(p, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        )
        rows.append(
            {
                "context_tokens": length,
                "absorb_s": absorb_s,
                "absorb_peak_mib": absorb_mib,
                "state_bytes": state.nbytes,
                "adapted_answer_s": adapted_s,
                "adapted_answer_peak_mib": adapted_mib,
                "prompted_answer_s": prompted_s,
                "prompted_answer_peak_mib": prompted_mib,
                "prompted_context_tokens": len(kept),
                "kv_cache_bytes": kv_cache_bytes(ga.model, len(kept)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    header = (
        "| context tokens | absorb s | absorb peak MiB | state KiB | adapted answer s | adapted peak MiB "
        "| prompted answer s | prompted peak MiB | prompted tokens | KV cache MiB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        cells = [
            r["context_tokens"],
            f"{r['absorb_s']:.2f}",
            f"{r['absorb_peak_mib']:.0f}",
            f"{r['state_bytes'] / 1024:.0f}",
            f"{r['adapted_answer_s']:.2f}",
            f"{r['adapted_answer_peak_mib']:.0f}",
            f"{r['prompted_answer_s']:.2f}",
            f"{r['prompted_answer_peak_mib']:.0f}",
            r["prompted_context_tokens"],
            f"{r['kv_cache_bytes'] / 2**20:.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(ga.model.dtype),
        "new_tokens": args.new_tokens,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": machine, "generator": ga.fingerprint, "rows": rows, "table": table}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
