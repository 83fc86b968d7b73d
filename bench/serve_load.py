"""Load on the HTTP service: N concurrent clients, each asking with its own context, batched vs one at a time.

Starts `python -m genadapter.serve` on 127.0.0.1 twice (max_batch=16, then max_batch=1), gives every
client its own context, and has each client send --requests generation requests back to back. Reports
throughput, p50/p95 latency and the mean batch size the server ran, for N in --clients; any failed
request is an error (exit code 1). Prints a markdown table and writes JSON.

By default the model is the tiny random test-style model (built here, saved to a temp dir: seconds);
--real uses the embedded SmolLM2 with its shipped generator.

    python -m bench.serve_load [--real] [--json bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from genadapter.serve.launch import ServerProcess
from genadapter.testing import save_tiny_dirs

MODES = {"batched": 16, "one at a time": 1}  # mode -> max_batch
TOPICS = ["river", "castle", "violin", "glacier", "lantern", "orchard", "comet", "harbor"]


def context_text(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Client {i} keeps notes about the {topic}. The {topic} of client {i} is number {1000 + i}. " * 4


def tiny_model(directory: Path) -> tuple[Path, Path]:
    return save_tiny_dirs(directory)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(url: str, context_ids: list[str], requests: int, new_tokens: int) -> tuple[list[float], int, float]:
    """Every client sends `requests` requests with its own context; (latencies s, errors, wall s)."""
    barrier = threading.Barrier(len(context_ids))

    def client(context_id: str) -> tuple[list[float], int]:
        latencies, errors = [], 0
        body = {"items": [{"prompt": "What is the number?", "context_id": context_id}], "max_new_tokens": new_tokens}
        with httpx.Client(base_url=url, trust_env=False, timeout=120) as http:
            barrier.wait(timeout=60)
            for _ in range(requests):
                started = time.perf_counter()
                try:
                    ok = http.post("/v1/generate", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(len(context_ids)) as pool:
        results = list(pool.map(client, context_ids))
    wall = time.perf_counter() - started
    return [x for lat, _ in results for x in lat], sum(e for _, e in results), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="embedded SmolLM2 instead of the tiny random model")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: 1 tiny, all real)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_load.json"))
    args = parser.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    threads = args.threads if args.threads is not None else (0 if args.real else 1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="genadapter-serve-load-") as tmp:
        tmp = Path(tmp)
        base, gen = (None, None) if args.real else tiny_model(tmp)
        for mode, max_batch in MODES.items():
            config = {"max_batch": max_batch, "batch_wait_ms": 5, "max_new_tokens": max(args.new_tokens, 64)}
            server = ServerProcess(tmp / f"{max_batch}.db", base, gen, config, tmp / f"{max_batch}.log", threads)
            with server, httpx.Client(base_url=server.url, trust_env=False, timeout=300) as http:
                ids = [
                    http.post("/v1/contexts", json={"text": context_text(i)}).json()["id"] for i in range(max(clients))
                ]
                run_clients(server.url, ids[:1], 2, args.new_tokens)  # warm-up
                for n in clients:
                    before = http.get("/v1/stats").json()
                    latencies, errors, wall = run_clients(server.url, ids[:n], args.requests, args.new_tokens)
                    after = http.get("/v1/stats").json()
                    batches = after["batches"] - before["batches"]
                    row = {
                        "clients": n,
                        "mode": mode,
                        "max_batch": max_batch,
                        "requests": len(latencies),
                        "errors": errors,
                        "throughput_rps": len(latencies) / wall,
                        "p50_ms": 1000 * statistics.median(latencies),
                        "p95_ms": 1000 * percentile(latencies, 0.95),
                        "mean_batch": (after["rows"] - before["rows"]) / max(batches, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    serial = {r["clients"]: r["throughput_rps"] for r in rows if r["max_batch"] == 1}
    model = "SmolLM2-135M (embedded)" if args.real else "tiny random llama"
    print(f"\nmodel: {model}, {args.new_tokens} new tokens, {args.requests} requests per client, ", end="")
    print(f"server torch threads: {threads or 'all'}\n")
    print("| clients | mode | requests | req/s | vs one at a time | p50 ms | p95 ms | mean batch | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["clients"], -r["max_batch"])):
        speedup = r["throughput_rps"] / serial[r["clients"]]
        print(
            f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['throughput_rps']:.1f} | {speedup:.2f}x "
            f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"real": args.real, "new_tokens": args.new_tokens, "requests_per_client": args.requests}
    meta |= {"server_threads": threads, "python": platform.python_version(), "machine": platform.machine()}
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    if any(r["errors"] for r in rows):
        sys.exit("errors: some requests failed")


if __name__ == "__main__":
    main()
