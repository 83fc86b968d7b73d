"""Peak memory and time of one pretraining step at batch 8, whole vs in micro-batches (`micro_batch_size`).

Each setting runs in its own process (memory freed by one step may stay mapped, which would hide the next
one's peak): load the embedded SmolLM2 with a fresh generator, one warm-up step, then `--repeats` timed steps
(forward + backward through `forward_backward`, the training loop's own step). Reports the median time, the
peak RSS above the RSS after loading, and the loss, which must agree across settings. Writes JSON.

    python -m bench.micro_batch --json bench/results/micro_batch.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.peak_rss import measure


def one_setting(micro_batch_size: int, batch_size: int, repeats: int) -> dict:
    from accelerate import Accelerator

    from genadapter import AdapterGenerator, GenerativeAdapter, GeneratorConfig
    from genadapter.base_model import load_base
    from genadapter.train import TrainConfig
    from genadapter.train.loop import GeneratorTrainer, forward_backward

    torch.manual_seed(0)
    name, model, tokenizer = load_base()
    gen_config = GeneratorConfig(key_dim=96, value_dim=96, rank=96, chunk_size=128, base_model=name)
    ga = GenerativeAdapter(model, tokenizer, AdapterGenerator.for_model(model, gen_config), name)
    ga.generator.requires_grad_(True)
    config = TrainConfig(num_chunks=4, batch_size=batch_size, micro_batch_size=micro_batch_size, generator=gen_config)
    sequences = np.random.default_rng(0).integers(100, 40000, size=(batch_size, 4 * 128)).tolist()
    trainer, accelerator = GeneratorTrainer(ga, config), Accelerator(cpu=True)

    def step() -> float:
        losses = forward_backward(
            accelerator, trainer, "pretrain", sequences, np.random.default_rng(0), micro_batch_size
        )
        ga.generator.zero_grad(set_to_none=True)
        return losses["loss"].item()

    loss, _, peak_mib = measure(step)  # the first step's peak: later ones reuse memory it mapped
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"micro_batch_size": micro_batch_size, "loss": loss, "peak_rss_mib": peak_mib, "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro", default="0,1,2,4", help="micro_batch_size values (0 = the whole batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one setting
    parser.add_argument("--json", type=Path, default=Path("bench/results/micro_batch.json"))
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(args.one, args.batch_size, args.repeats)))
        return
    rows = []
    for micro in (int(m) for m in args.micro.split(",")):
        child = [sys.executable, "-m", "bench.micro_batch", "--one", str(micro), "--batch-size", str(args.batch_size)]
        out = subprocess.run([*child, "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["median_s"] = statistics.median(row["times_s"])
        rows.append(row)
        print(
            f"micro_batch_size {micro or args.batch_size}: {row['median_s']:.1f} s/step, "
            f"peak +{row['peak_rss_mib'] / 1024:.2f} GiB, loss {row['loss']:.6f}",
            flush=True,
        )
    result = {
        "batch_size": args.batch_size,
        "rows": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
