"""The eigendecomposition behind SVD normalisation: one `torch.linalg.eigh` call on a batch of R×R fp64 Gram
matrices vs `batched_eigh` (the batch split across CPU threads), in one run on the same random matrices.

Why it matters: a training step normalises batch · chunks · modules states (7,680 for 32 sequences of 4 chunks on
SmolLM2's 60 modules); both ATen's CPU eigh and cuSOLVER beyond 32×32 solve them one at a time.

    python -m bench.eigh --device cuda --count 7680     # on a GPU machine
    python -m bench.eigh --count 960 --json bench/results/eigh.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from genadapter.generator import batched_eigh


def timed(fn, gram: torch.Tensor, repeats: int) -> float:
    fn(gram[:8])  # warm-up: handles, thread pool
    times = []
    for _ in range(repeats):
        if gram.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(gram)
        if gram.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=960, help="matrices in the batch")
    parser.add_argument("--size", type=int, default=96, help="R: key_dim = value_dim of the generator")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    states = torch.randn(args.count, args.size, args.size, dtype=torch.float64, device=args.device)
    gram = states.mT @ states
    one_call = timed(torch.linalg.eigh, gram, args.repeats)
    split = timed(batched_eigh, gram, args.repeats)
    result = {
        "device": args.device,
        "matrices": args.count,
        "size": args.size,
        "cpu_threads": torch.get_num_threads(),
        "one_call_s": one_call,
        "split_across_threads_s": split,
        "speedup": one_call / split,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
