"""Overhead of the generator in one pretraining step, measured in one run on the embedded SmolLM2.

Baseline: what any context-conditioned fine-tuning step must pay anyway — a frozen forward over the
context chunks plus a forward+backward of the frozen LM over the same target tokens (gradients reach the
input embeddings only). Generator step: `pretrain_losses` + backward into the generator. Steps alternate,
median of `--repeats`; prints the ratio and writes JSON.

    python -m bench.train_step --json bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from genadapter import AdapterGenerator, GenerativeAdapter, GeneratorConfig
from genadapter.base_model import load_base
from genadapter.train import TrainConfig
from genadapter.train.objectives import linear_cross_entropy, next_token_positions, pretrain_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_step.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    name, model, tokenizer = load_base()
    gen_config = GeneratorConfig(key_dim=96, value_dim=96, rank=96, chunk_size=args.chunk_size, base_model=name)
    ga = GenerativeAdapter(model, tokenizer, AdapterGenerator.for_model(model, gen_config), name)
    ga.generator.requires_grad_(True)
    config = TrainConfig(num_chunks=args.num_chunks, generator=gen_config)
    w, n = args.chunk_size, args.num_chunks
    rng = np.random.default_rng(0)
    sequence = rng.integers(100, 40000, size=n * w).tolist()

    def generator_step() -> None:
        loss = pretrain_losses(ga, [sequence], config, np.random.default_rng(0))["loss"]
        loss.backward()
        ga.generator.zero_grad(set_to_none=True)

    def baseline_step() -> None:
        chunks = [sequence[i * w : (i + 1) * w] for i in range(n)]
        ga.encode_chunks(chunks)
        targets = chunks[1:] + chunks  # completion (n-1) + reconstruction (n) targets, as in the generator step
        ids, mask = ga.pad(targets)
        keep = next_token_positions(mask)  # the positions the generator step scores, with the same loss code
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[keep]
        head = model.get_output_embeddings().weight
        linear_cross_entropy(hidden, head, ids[:, 1:][keep[:, :-1]]).mean().backward()

    for step in (generator_step, baseline_step):  # warm-up
        step()
    times: dict[str, list[float]] = {"generator": [], "baseline": []}
    for _ in range(args.repeats):
        for label, step in (("generator", generator_step), ("baseline", baseline_step)):
            started = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "tokens": {"context": n * w, "targets": (2 * n - 1) * w},
        "median_s": medians,
        "overhead": medians["generator"] / medians["baseline"] - 1,
        "times_s": times,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "generator_config": gen_config.to_dict(),
    }
    print(
        f"generator step {medians['generator']:.2f}s vs frozen-LM fwd+bwd {medians['baseline']:.2f}s: "
        f"overhead {100 * result['overhead']:+.1f}%"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
