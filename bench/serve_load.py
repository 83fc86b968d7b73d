"""Load on the HTTP service: batched vs one at a time, and chats while a long absorb runs.

Two workloads, each on `python -m genadapter.serve` on 127.0.0.1 (no API keys, loopback only):

- throughput: the server twice (max_batch=16, then max_batch=1); every client has its own context and sends
  --requests generation requests back to back. Throughput, p50/p95 latency and the mean batch size the server ran,
  for N in --clients.
- mixed: 8 chat clients (/v1/chat/completions, each with its own context, max_tokens 8..64 drawn per request)
  send --chats requests each; then a text of --absorb-tokens tokens is absorbed into a new context while the same
  clients chat until it is done. Chat p50/p95 without and with the absorb running (the goal: p95 with it at most
  3x p95 without), and how long the absorb took with the chats (and alone, with --absorb-alone).

Any failed request is an error (exit code 1). Prints markdown tables and writes JSON.

By default the model is the tiny random test-style model (built here, saved to a temp dir: seconds) with a
smaller absorb; --real uses the embedded SmolLM2 with its shipped generator.

    python -m bench.serve_load [--real] [--workloads throughput,mixed] [--json bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from genadapter.serve.launch import ServerProcess
from genadapter.testing import save_tiny_dirs

MODES = {"batched": 16, "one at a time": 1}  # mode -> max_batch
TOPICS = ["river", "castle", "violin", "glacier", "lantern", "orchard", "comet", "harbor"]
CHAT_CLIENTS = 8
CHAT_TOKENS = (8, 64)  # max_tokens of a chat request, drawn uniformly


def context_text(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Client {i} keeps notes about the {topic}. The {topic} of client {i} is number {1000 + i}. " * 4


def long_text(sentences: int) -> str:
    return "".join(
        f"Entry {k}: the {TOPICS[k % len(TOPICS)]} of client {k % 97} was seen {k % 13 + 2} times near "
        f"marker {1000 + k}. "
        for k in range(sentences)
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    return {
        "requests": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "mean_ms": 1000 * statistics.fmean(latencies),
    }


def create(http: httpx.Client, text: str) -> dict:
    response = http.post("/v1/contexts", json={"text": text})
    response.raise_for_status()
    return response.json()


def timed_post(http: httpx.Client, path: str, body: dict) -> tuple[float, bool]:
    """(seconds, whether the answer was 200); a failed connection counts as an error, not a crash."""
    started = time.perf_counter()
    try:
        ok = http.post(path, json=body).status_code == 200
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - started, ok


def run_clients(url: str, context_ids: list[str], requests: int, new_tokens: int) -> tuple[list[float], int, float]:
    """Every client sends `requests` requests with its own context; (latencies s, errors, wall s)."""
    barrier = threading.Barrier(len(context_ids))

    def client(context_id: str) -> tuple[list[float], int]:
        latencies, errors = [], 0
        body = {"items": [{"prompt": "What is the number?", "context_id": context_id}], "max_new_tokens": new_tokens}
        with httpx.Client(base_url=url, trust_env=False, timeout=300) as http:
            barrier.wait(timeout=60)
            for _ in range(requests):
                latency, ok = timed_post(http, "/v1/generate", body)
                latencies.append(latency)
                errors += not ok
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(len(context_ids)) as pool:
        results = list(pool.map(client, context_ids))
    wall = time.perf_counter() - started
    return [x for lat, _ in results for x in lat], sum(e for _, e in results), wall


def run_chats(url: str, context_ids: list[str], more: Callable[[int], bool]) -> tuple[list[float], int]:
    """Chat clients, each with its own context, sending requests back to back while `more(sent so far)`;
    (latencies s, errors)."""
    barrier = threading.Barrier(len(context_ids))

    def client(i: int) -> tuple[list[float], int]:
        rng = random.Random(i)
        latencies, errors = [], 0
        with httpx.Client(base_url=url, trust_env=False, timeout=900) as http:
            barrier.wait(timeout=60)
            while more(len(latencies)):
                body = {
                    "model": context_ids[i],
                    "messages": [{"role": "user", "content": f"What is the number of client {i}?"}],
                    "max_tokens": rng.randint(*CHAT_TOKENS),
                }
                latency, ok = timed_post(http, "/v1/chat/completions", body)
                latencies.append(latency)
                errors += not ok
        return latencies, errors

    with ThreadPoolExecutor(len(context_ids)) as pool:
        results = list(pool.map(client, range(len(context_ids))))
    return [x for lat, _ in results for x in lat], sum(e for _, e in results)


def mean_batch(before: dict, after: dict) -> float:
    return (after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1)


def throughput(args: argparse.Namespace, tmp: Path, base: Path | None, gen: Path | None, threads: int) -> list[dict]:
    clients = [int(x) for x in args.clients.split(",")]
    rows = []
    for mode, max_batch in MODES.items():
        config = {"max_batch": max_batch, "batch_wait_ms": 5, "max_new_tokens": max(args.new_tokens, 64)}
        log = tmp / f"{max_batch}.log"
        server = ServerProcess(tmp / f"{max_batch}.db", base, gen, config, log, threads, no_auth=True)
        with server, httpx.Client(base_url=server.url, trust_env=False, timeout=300) as http:
            ids = [create(http, context_text(i))["id"] for i in range(max(clients))]
            run_clients(server.url, ids[:1], 2, args.new_tokens)  # warm-up
            for n in clients:
                before = http.get("/v1/stats").json()
                latencies, errors, wall = run_clients(server.url, ids[:n], args.requests, args.new_tokens)
                after = http.get("/v1/stats").json()
                row = {
                    "clients": n,
                    "mode": mode,
                    "max_batch": max_batch,
                    "requests": len(latencies),
                    "errors": errors,
                    "throughput_rps": len(latencies) / wall,
                    "p50_ms": 1000 * statistics.median(latencies),
                    "p95_ms": 1000 * percentile(latencies, 0.95),
                    "mean_batch": mean_batch(before, after),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def mixed(args: argparse.Namespace, tmp: Path, base: Path | None, gen: Path | None, threads: int) -> dict:
    config = {"max_new_tokens": CHAT_TOKENS[1]}
    server = ServerProcess(tmp / "mixed.db", base, gen, config, tmp / "mixed.log", threads, no_auth=True)
    with server, httpx.Client(base_url=server.url, trust_env=False, timeout=900) as http:
        sample = 40
        per_sentence = create(http, long_text(sample))["num_tokens"] / sample
        text = long_text(round(args.absorb_tokens / per_sentence))
        ids = [create(http, context_text(i))["id"] for i in range(CHAT_CLIENTS)]
        run_chats(server.url, ids, lambda sent: sent < 1)  # warm-up

        alone_s = None
        if args.absorb_alone:
            started = time.perf_counter()
            create(http, text)
            alone_s = time.perf_counter() - started
            print(json.dumps({"absorb_alone_s": alone_s}), flush=True)

        before = http.get("/v1/stats").json()
        without, errors_without = run_chats(server.url, ids, lambda sent: sent < args.chats)
        after = http.get("/v1/stats").json()
        quiet = {**summary(without), "errors": errors_without, "mean_batch": mean_batch(before, after)}
        print(json.dumps({"chats": "without absorb", **quiet}), flush=True)

        done = threading.Event()
        absorb: dict = {"status": None, "tokens": None}

        def absorb_long() -> None:
            with httpx.Client(base_url=server.url, trust_env=False, timeout=1800) as own:
                time.sleep(0.5)  # the chat clients are under way
                begun = time.perf_counter()
                try:
                    response = own.post("/v1/contexts", json={"text": text})
                    absorb["status"] = response.status_code
                    absorb["tokens"] = response.json().get("num_tokens")
                finally:
                    absorb["seconds"] = time.perf_counter() - begun
                    done.set()

        before = http.get("/v1/stats").json()
        absorber = threading.Thread(target=absorb_long)
        absorber.start()
        during, errors_during = run_chats(server.url, ids, lambda sent: not done.is_set())
        absorber.join()
        after = http.get("/v1/stats").json()
        busy = {**summary(during), "errors": errors_during, "mean_batch": mean_batch(before, after)}
        print(json.dumps({"chats": "during absorb", **busy}), flush=True)
    return {
        "chat_clients": CHAT_CLIENTS,
        "chat_max_tokens": list(CHAT_TOKENS),
        "absorb_tokens": absorb["tokens"],
        "absorb_alone_s": alone_s,
        "absorb_with_chats_s": absorb["seconds"],
        "absorb_status": absorb["status"],
        "chats_without_absorb": quiet,
        "chats_during_absorb": busy,
        "p95_ratio": busy["p95_ms"] / quiet["p95_ms"],
    }


def report(args: argparse.Namespace, threads: int, rows: list[dict], mix: dict | None) -> None:
    model = "SmolLM2-135M (embedded)" if args.real else "tiny random llama"
    print(f"\nmodel: {model}, server torch threads: {threads or 'all'}")
    if rows:
        serial = {r["clients"]: r["throughput_rps"] for r in rows if r["max_batch"] == 1}
        print(f"\nthroughput: {args.new_tokens} new tokens, {args.requests} requests per client\n")
        print("| clients | mode | requests | req/s | vs one at a time | p50 ms | p95 ms | mean batch | errors |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(rows, key=lambda r: (r["clients"], -r["max_batch"])):
            speedup = r["throughput_rps"] / serial[r["clients"]]
            print(
                f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['throughput_rps']:.1f} | {speedup:.2f}x "
                f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |"
            )
    if mix:
        alone = "" if mix["absorb_alone_s"] is None else f"{mix['absorb_alone_s']:.1f} s alone, "
        print(
            f"\nmixed: {mix['chat_clients']} chat clients, max_tokens {mix['chat_max_tokens'][0]}.."
            f"{mix['chat_max_tokens'][1]}; absorbing {mix['absorb_tokens']} tokens took {alone}"
            f"{mix['absorb_with_chats_s']:.1f} s with the chats\n"
        )
        print("| chats | requests | p50 ms | p95 ms | mean ms | mean batch | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in ("chats_without_absorb", "chats_during_absorb"):
            r = mix[name]
            print(
                f"| {name.removeprefix('chats_').replace('_', ' ')} | {r['requests']} | {r['p50_ms']:.0f} "
                f"| {r['p95_ms']:.0f} | {r['mean_ms']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |"
            )
        print(f"\np95 during / without the absorb: {mix['p95_ratio']:.2f}x (goal: at most 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="embedded SmolLM2 instead of the tiny random model")
    parser.add_argument("--workloads", default="throughput,mixed", help="comma-separated: throughput, mixed")
    parser.add_argument("--clients", default="1,4,16", help="throughput: client counts")
    parser.add_argument("--requests", type=int, default=6, help="throughput: requests per client")
    parser.add_argument("--new-tokens", type=int, default=16, help="throughput: max_new_tokens")
    parser.add_argument("--chats", type=int, default=None, help="mixed: requests per chat client without absorb")
    parser.add_argument("--absorb-tokens", type=int, default=None, help="mixed: tokens of the long absorb")
    parser.add_argument("--absorb-alone", action="store_true", help="mixed: also time the absorb without chats")
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: 1 tiny, all real)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve_load.json"))
    args = parser.parse_args()
    workloads = set(args.workloads.split(","))
    if not workloads <= {"throughput", "mixed"}:
        parser.error(f"unknown workloads: {sorted(workloads - {'throughput', 'mixed'})}")
    threads = args.threads if args.threads is not None else (0 if args.real else 1)
    args.chats = args.chats or (4 if args.real else 12)
    args.absorb_tokens = args.absorb_tokens or (28000 if args.real else 12000)

    with tempfile.TemporaryDirectory(prefix="genadapter-serve-load-") as tmp:
        tmp = Path(tmp)
        base, gen = (None, None) if args.real else save_tiny_dirs(tmp)
        rows = throughput(args, tmp, base, gen, threads) if "throughput" in workloads else []
        mix = mixed(args, tmp, base, gen, threads) if "mixed" in workloads else None

    report(args, threads, rows, mix)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"real": args.real, "new_tokens": args.new_tokens, "requests_per_client": args.requests}
    meta |= {"server_threads": threads, "python": platform.python_version(), "machine": platform.machine()}
    args.json.write_text(json.dumps({**meta, "rows": rows, "mixed": mix}, indent=2) + "\n")
    errors = sum(r["errors"] for r in rows)
    if mix:
        errors += mix["chats_without_absorb"]["errors"] + mix["chats_during_absorb"]["errors"]
        errors += mix["absorb_status"] != 200
    if errors:
        sys.exit("errors: some requests failed")


if __name__ == "__main__":
    main()
