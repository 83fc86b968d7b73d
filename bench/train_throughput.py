"""Training throughput: tokens/s of the generator's pretraining step, and its ratio to the frozen LM's own
forward + backward over the same tokens, on the device it runs on.

Generator step: the training loop's own step (`forward_backward`, gradient clipping, AdamW) on a batch of
sequences of `--num-chunks` × `--chunk-size` tokens. Baseline: what any context-conditioned fine-tuning step pays
anyway on the same batch, as in `bench.train_step`: the frozen LM's forward over the context chunks plus its
forward + backward over the same target tokens (gradients reach the input embeddings only). Both under the same
autocast. Training tokens are the batch's sequence tokens (what the loop's `tokens_per_s` counts). Steps alternate:
times are medians of `--repeats`, and the ratio (generator tokens/s over baseline tokens/s) is the median of each
repeat's pair, so that a machine whose load drifts during the run still compares like with like. Also times the SVD
normalisation alone (forward + backward) on a step's worth of states, by path ("exact": fp64 eigendecomposition on
CPU threads; "device": matrix products where the states live), and on a GPU counts the host syncs of each step
(`torch.cuda.set_sync_debug_mode`). Results are merged into the JSON file under "<device>/<model>".

    python -m bench.train_throughput --tiny                 # seconds: tiny random model, CPU
    python -m bench.train_throughput --device cpu           # SmolLM2-135M, batch 1
    python -m bench.train_throughput --device cuda          # SmolLM2-135M, batch 32, bf16, both normalisers

Goal (issue 31) on one H100/H200 for SmolLM2-135M: ≥ 100K training tokens/s, ratio ≥ 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genadapter import AdapterGenerator, GenerativeAdapter, GeneratorConfig
from genadapter.generator import NORMALIZER_ENV, normalize_state
from genadapter.train import TrainConfig
from genadapter.train.loop import GeneratorTrainer, forward_backward
from genadapter.train.objectives import linear_cross_entropy, next_token_positions

GOAL_TOKENS_PER_S, GOAL_RATIO = 100_000, 0.8


def build(args: argparse.Namespace) -> tuple[GenerativeAdapter, str]:
    """The adapter under test on args.device, and the model's name."""
    if args.tiny:
        from genadapter.testing import make_model, make_tokenizer, tiny_config

        tokenizer = make_tokenizer()
        model = make_model(len(tokenizer)).to(args.device)
        generator = AdapterGenerator.for_model(model, tiny_config(chunk_size=args.chunk_size))
        return GenerativeAdapter(model, tokenizer, generator, "tiny"), "tiny"
    if args.shipped:
        ga = GenerativeAdapter.from_pretrained(device=args.device)
        return ga, f"{ga.base_name}+shipped-generator"
    from genadapter.base_model import load_base

    name, model, tokenizer = load_base(device=args.device)
    config = GeneratorConfig(key_dim=96, value_dim=96, rank=96, chunk_size=args.chunk_size, base_model=name)
    return GenerativeAdapter(model, tokenizer, AdapterGenerator.for_model(model, config), name), name


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def count_syncs(step: Callable[[], object]) -> dict:
    """Host syncs of one step on a GPU: CUDA's sync debug mode warns at each, with the Python line that caused it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"count": sum(sites.values()), "sites": dict(sites.most_common())}


def with_normalizer(normalizer: str, step: Callable[[], object]) -> Callable[[], object]:
    """`step` run with $GENADAPTER_NORMALIZER set to `normalizer` (the switch of genadapter.generator)."""

    def run() -> object:
        previous = os.environ.get(NORMALIZER_ENV)
        os.environ[NORMALIZER_ENV] = normalizer
        try:
            return step()
        finally:
            if previous is None:
                os.environ.pop(NORMALIZER_ENV)
            else:
                os.environ[NORMALIZER_ENV] = previous

    return run


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.startswith("cuda"):
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model of genadapter.testing")
    parser.add_argument("--shipped", action="store_true", help="SmolLM2 with the shipped generator (its memory)")
    parser.add_argument("--batch-size", type=int, help="default: 32 on a GPU, 1 on CPU (8 with --tiny)")
    parser.add_argument("--num-chunks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, help="default: 128 (16 with --tiny)")
    parser.add_argument("--micro-batch-size", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="autocast; default: on a GPU only")
    parser.add_argument(
        "--normalizer", default=None, help="comma list of auto, exact, device; default: auto, plus exact on a GPU"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--normaliser-repeats", type=int, default=3, help="0 skips timing the normalisation alone")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--note", default="", help="stored with the result, e.g. how busy the machine was")
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (32 if on_gpu else 8 if args.tiny else 1)
    args.chunk_size = args.chunk_size or (16 if args.tiny else 128)
    args.bf16 = on_gpu if args.bf16 is None else args.bf16
    normalizers = (args.normalizer or ("auto,exact" if on_gpu else "auto")).split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from accelerate import Accelerator

    ga, model_name = build(args)
    model, gen_config = ga.model, ga.config
    ga.generator.requires_grad_(True).train()
    config = TrainConfig(
        num_chunks=args.num_chunks,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        generator=gen_config.to_dict(),
        bf16=args.bf16,
    )
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not on_gpu)
    trainer = GeneratorTrainer(ga, config)
    optimizer = torch.optim.AdamW(ga.generator.parameters(), lr=1e-5)
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    w, n = args.chunk_size, args.num_chunks
    low, high = (0, 256) if args.tiny else (100, 40000)
    sequences = np.random.default_rng(0).integers(low, high, size=(args.batch_size, n * w)).tolist()
    tokens = args.batch_size * n * w

    def generator_step() -> None:  # the loop's step, without its logging
        forward_backward(accelerator, trainer, "pretrain", sequences, np.random.default_rng(0), args.micro_batch_size)
        accelerator.clip_grad_norm_(ga.generator.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def baseline_step() -> None:
        chunks = [seq[i * w : (i + 1) * w] for seq in sequences for i in range(n)]
        targets = [c for b in range(args.batch_size) for c in chunks[b * n + 1 : (b + 1) * n]] + chunks
        with accelerator.autocast():
            ga.encode_chunks(chunks)
            ids, mask = ga.pad(targets)  # completion (n - 1) + reconstruction (n) targets per sequence
            keep = next_token_positions(mask)  # the positions the generator step scores, with the same loss code
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[keep]
            loss = linear_cross_entropy(hidden, model.get_output_embeddings().weight, ids[:, 1:][keep[:, :-1]])
        loss.mean().backward()

    steps = {"baseline": baseline_step} | {
        f"generator ({name})": with_normalizer(name, generator_step) for name in normalizers
    }
    for step in steps.values():  # warm-up: kernels, allocator, thread pools
        step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    peak_mib: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, step in steps.items():
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            times[label].append(timed(step, args.device))
            if on_gpu:
                peak_mib[label] = max(peak_mib.get(label, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    medians = {label: statistics.median(values) for label, values in times.items()}
    baseline_rate = tokens / medians["baseline"]
    rows = {  # the ratio pairs each step with the baseline step run just before it: load that drifts cancels out
        label: {
            "median_s": medians[label],
            "tokens_per_s": tokens / medians[label],
            "ratio_to_baseline": statistics.median(b / t for b, t in zip(times["baseline"], times[label], strict=True)),
            "ratio_of_medians": medians["baseline"] / medians[label],
            "times_s": times[label],
        }
        | ({"peak_gpu_mib": peak_mib[label]} if on_gpu else {})
        for label in steps
    }
    syncs = {label: count_syncs(step) for label, step in steps.items()} if on_gpu else "not measured (CPU)"

    normaliser: dict = {"repeats": args.normaliser_repeats}
    if args.normaliser_repeats:
        count = args.batch_size * n * len(ga.generator.module_names)
        states = torch.randn(count, gen_config.key_dim, gen_config.value_dim, device=args.device)
        normaliser |= {"states": count, "shape": list(states.shape[1:])}
        for path in ("exact", "device"):

            def run(path: str = path) -> None:
                leaf = states.clone().requires_grad_(True)
                normalize_state(leaf, gen_config, method=path).sum().backward()

            run()
            normaliser[f"{path}_fwd_bwd_s"] = statistics.median(
                timed(run, args.device) for _ in range(args.normaliser_repeats)
            )

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "model": model_name,
        "batch": {"sequences": args.batch_size, "chunks": n, "chunk_size": w, "tokens": tokens},
        "bf16": args.bf16,
        "micro_batch_size": args.micro_batch_size,
        "repeats": args.repeats,
        "steps": rows,
        "normaliser": normaliser,
        "host_syncs_per_step": syncs,
        "goal": f">= {GOAL_TOKENS_PER_S} training tokens/s and ratio >= {GOAL_RATIO} on one H100/H200 (SmolLM2-135M)",
        "note": args.note,
        "machine": machine(args.device),
        "generator_config": gen_config.to_dict(),
    }
    print(
        f"{args.device} {model_name}: batch {args.batch_size} x {n} x {w} = {tokens} tokens/step, "
        f"bf16 {args.bf16}, medians of {args.repeats}"
    )
    print(f"  frozen LM fwd+bwd (baseline)  {medians['baseline']:8.3f} s  {baseline_rate:12,.0f} tokens/s")
    for label in steps:
        if label != "baseline":
            row = rows[label]
            print(
                f"  {label:29s} {row['median_s']:8.3f} s  {row['tokens_per_s']:12,.0f} tokens/s  "
                f"ratio {row['ratio_to_baseline']:.3f}"
            )
    for key in ("exact", "device"):
        if f"{key}_fwd_bwd_s" in normaliser:
            seconds, count = normaliser[f"{key}_fwd_bwd_s"], normaliser["states"]
            print(f"  normalisation alone, {key:6s}  {seconds:8.3f} s  ({count} states, forward + backward)")
    if on_gpu:
        print("  host syncs per step: " + ", ".join(f"{label} {s['count']}" for label, s in syncs.items()))
        if not args.tiny:
            for label, row in list(rows.items())[1:]:  # the generator steps
                met = row["tokens_per_s"] >= GOAL_TOKENS_PER_S and row["ratio_to_baseline"] >= GOAL_RATIO
                print(f"  goal ({result['goal']}): {label} {'met' if met else 'not met'}")

    stored = json.loads(args.json.read_text()) if args.json.is_file() else {}
    stored.setdefault("runs", {})[f"{args.device}/{model_name}"] = result
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(stored, indent=2) + "\n")


if __name__ == "__main__":
    main()
