"""What adapting and answering cost, as ratios against the frozen LM in the same run, on the embedded SmolLM2.

Every measurement runs for the shipped generator and for the same generator with the next-token memory off
(`overrides={"memory_layers": 0}`), in one process, alternating the compared calls and taking medians:

1. absorb: tokens/s of `absorb` ÷ tokens/s of the frozen LM over the same chunks (batches of 8 chunks), against
   the decoder alone (what absorbing must run) and the full forward with the vocabulary projection; also for a
   memory that writes the next token's embedding instead of the LM's error on it (what the error costs);
2. answer: seconds per forward of a prompt, adapted ÷ closed-book: one state through the hooks, one state merged
   into the weights (the cost of merging is reported apart), and a batch of 8 different states through the hooks;
   the same for generating new tokens, where merging is paid once per call;
3. by context length: latency of an answer with the context in the prompt ÷ with the adapter, and the state bytes;
4. a user's chat history of about 2.5K tokens (PersonaChat sessions): per-query compute (FLOP estimates of
   genadapter.eval.costs), latency and memory of genadapter against the whole history in the prompt, the paper's
   "4x" comparison.

    python -m bench.adapt_cost                 # writes bench/results/adapt_cost.json
    python -m bench.adapt_cost --json other.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.peak_rss import measure
from genadapter import GenerativeAdapter, formats
from genadapter.data import data_root, wiki_leads
from genadapter.eval.costs import ModelCosts, generator_flops
from genadapter.eval.persona import parse_personachat

QUESTION = "What is the first topic of the text about?"
CONFIGS = {"shipped": None, "memory off": {"memory_layers": 0}}
# what absorbing would cost if the memory wrote the next token's embedding instead of the LM's error on it
ABSORB_ONLY = {"memory, next-token targets": {"memory_targets": "next"}}


def medians(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls alternating so that drift in machine speed hits all of them alike."""
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def absorb_ratios(ga: GenerativeAdapter, ids: list[int], repeats: int) -> dict:
    chunks = ga.chunk([ids])
    batches = [ga.pad(chunks[i : i + 8]) for i in range(0, len(chunks), 8)]

    @torch.no_grad()
    def forward(decoder_only: bool) -> None:
        model = ga.model.get_decoder() if decoder_only else ga.model
        for batch_ids, mask in batches:
            model(input_ids=batch_ids, attention_mask=mask)

    seconds = medians(
        {
            "decoder": lambda: forward(True),
            "lm": lambda: forward(False),
            "absorb": lambda: ga.absorb(ids, progress=False),
        },
        repeats,
    )
    return {
        "tokens": len(ids),
        "seconds": seconds,
        "absorb_vs_decoder": seconds["decoder"] / seconds["absorb"],  # throughput ratio
        "absorb_vs_lm": seconds["lm"] / seconds["absorb"],
    }


def answer_ratios(ga: GenerativeAdapter, states: list, repeats: int, prompt_tokens: int, new_tokens: int) -> dict:
    one, eight = torch.randint(100, 10000, (1, prompt_tokens)), torch.randint(100, 10000, (8, prompt_tokens))
    for state in states:
        ga.adapter_factors(state)  # what a caller holding a state pays once (measured below)

    @torch.no_grad()
    def merged_forward() -> None:
        with ga.merged(states[0]):
            ga.model(input_ids=one)

    forward = medians(
        {
            "closed_book_1": lambda: ga.logits(one),
            "hooks_1": lambda: ga.logits(one, state=states[0]),
            "merged_1_with_merge": merged_forward,
            "closed_book_8": lambda: ga.logits(eight),
            "hooks_8": lambda: ga.logits(eight, state=states),
        },
        repeats,
    )
    ga.merge(states[0])
    forward["merged_1"] = medians({"merged": lambda: ga.logits(one)}, repeats)["merged"]
    ga.unmerge()
    factors = medians({"factors": lambda: _uncached_factors(ga, states[0])}, repeats)["factors"]

    question = formats.qa_prompt(QUESTION)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    generate = medians(
        {
            "closed_book_1": lambda: ga.generate(question, **kwargs),
            "hooks_1": lambda: ga.generate(question, state=states[0], merge=False, **kwargs),
            "merged_1": lambda: ga.generate(question, state=states[0], merge=True, **kwargs),
            "closed_book_8": lambda: ga.generate([question] * 8, **kwargs),
            "hooks_8": lambda: ga.generate([question] * 8, state=states, **kwargs),
        },
        repeats,
    )
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "forward_seconds": forward,
        "generate_seconds": generate,
        "factors_seconds_per_state": factors,
        "merge_seconds": forward["merged_1_with_merge"] - forward["merged_1"],
        "forward_ratio": {
            "hooks_1": forward["hooks_1"] / forward["closed_book_1"],
            "merged_1": forward["merged_1"] / forward["closed_book_1"],
            "hooks_8": forward["hooks_8"] / forward["closed_book_8"],
        },
        "generate_ratio": {
            "hooks_1": generate["hooks_1"] / generate["closed_book_1"],
            "merged_1": generate["merged_1"] / generate["closed_book_1"],
            "hooks_8": generate["hooks_8"] / generate["closed_book_8"],
        },
    }


def _uncached_factors(ga: GenerativeAdapter, state) -> None:
    state.cached_factors = None
    ga.adapter_factors(state)


def by_length(ga: GenerativeAdapter, ids: list[int], lengths: list[int], new_tokens: int) -> list[dict]:
    window = ga.model.config.get_text_config().max_position_embeddings - new_tokens - 64
    question = formats.qa_prompt(QUESTION)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    ga.generate(question, max_new_tokens=2)  # warm-up
    rows = []
    for length in lengths:
        state, absorb_s, absorb_mib = measure(lambda n=length: ga.absorb(ids[:n], progress=False))
        kept = ids[:length][-window:]
        prompt = formats.with_context(ga.tokenizer.decode(kept), question)
        _, adapted_s, adapted_mib = measure(lambda s=state: ga.generate(question, state=s, **kwargs))
        _, prompted_s, prompted_mib = measure(lambda p=prompt: ga.generate(p, **kwargs))
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
                "prompted_vs_adapted": prompted_s / adapted_s,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def chat_history(ga: GenerativeAdapter, tokens: int) -> tuple[str, str]:
    """PersonaChat sessions joined until `tokens` tokens: (history, the partner's last message)."""
    sessions, count = [], 0
    for dialogue in parse_personachat(data_root() / "persona" / "personachat_valid_700.txt"):
        sessions.append(formats.dialogue(dialogue.turns[:-1]))
        count += len(ga.tokenizer(sessions[-1], add_special_tokens=False)["input_ids"])
        if count >= tokens:
            return "\n\n".join(sessions), dialogue.turns[-1][0]
    raise SystemExit(f"the PersonaChat file holds fewer than {tokens} tokens")


def persona_costs(ga: GenerativeAdapter, history_tokens: int, new_tokens: int, repeats: int) -> dict:
    history, message = chat_history(ga, history_tokens)
    prompt = formats.reply_prompt(message)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    state, absorb_s, absorb_mib = measure(lambda: ga.absorb(history, progress=False))
    prompted_prompt = formats.with_context(history, prompt)
    seconds = medians(
        {
            "genadapter": lambda: ga.generate(prompt, state=state, **kwargs),
            "prompting": lambda: ga.generate(prompted_prompt, **kwargs),
        },
        repeats,
    )
    _, _, adapted_mib = measure(lambda: ga.generate(prompt, state=state, **kwargs))
    _, _, prompted_mib = measure(lambda: ga.generate(prompted_prompt, **kwargs))

    def count(text: str) -> int:
        return len(ga.tokenizer(ga.format_prompt(text), add_special_tokens=False)["input_ids"])

    costs = ModelCosts.of(ga.model)
    absorb_extra, adapter_per_token = generator_flops(ga.generator, state.num_tokens, costs.vocab_size)
    adapted_tokens, prompted_tokens = count(prompt) + new_tokens, count(prompted_prompt) + new_tokens
    flops = {
        "genadapter": costs.forward_flops(adapted_tokens) + adapter_per_token * adapted_tokens,
        "prompting": costs.forward_flops(prompted_tokens),
        "absorb_once": 2.0 * costs.decoder_params * state.num_tokens + absorb_extra,
    }
    memory = {
        "genadapter_kv_cache_bytes": costs.kv_cache_bytes(adapted_tokens),
        "prompting_kv_cache_bytes": costs.kv_cache_bytes(prompted_tokens),
        "state_bytes": state.nbytes,
        "genadapter_peak_mib": adapted_mib,
        "prompting_peak_mib": prompted_mib,
    }
    return {
        "history_tokens": state.num_tokens,
        "new_tokens": new_tokens,
        "absorb_s": absorb_s,
        "absorb_peak_mib": absorb_mib,
        "seconds": seconds,
        "flops": flops,
        "memory": memory,
        "prompting_vs_genadapter": {
            "flops": flops["prompting"] / flops["genadapter"],
            "latency": seconds["prompting"] / seconds["genadapter"],
            "kv_cache_plus_state": memory["prompting_kv_cache_bytes"]
            / (memory["genadapter_kv_cache_bytes"] + memory["state_bytes"]),
        },
        "queries_to_repay_absorb": flops["absorb_once"] / (flops["prompting"] - flops["genadapter"]),
    }


def table(results: dict) -> str:
    names = list(results["configs"])
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, get: Callable[[dict], float], fmt: str = "{:.2f}") -> None:
        lines.append(f"| {label} | " + " | ".join(fmt.format(get(results["configs"][n])) for n in names) + " |")

    row("absorb ÷ frozen decoder, throughput", lambda c: c["absorb"]["absorb_vs_decoder"])
    row("absorb ÷ frozen LM with its vocabulary projection", lambda c: c["absorb"]["absorb_vs_lm"])
    row("forward, 1 state (hooks) ÷ closed-book", lambda c: c["answer"]["forward_ratio"]["hooks_1"])
    row("forward, 1 state (merged) ÷ closed-book", lambda c: c["answer"]["forward_ratio"]["merged_1"])
    row("forward, 8 different states ÷ closed-book", lambda c: c["answer"]["forward_ratio"]["hooks_8"])
    row("generate, 1 state (hooks) ÷ closed-book", lambda c: c["answer"]["generate_ratio"]["hooks_1"])
    row("generate, 1 state (merged, merge included) ÷ closed-book", lambda c: c["answer"]["generate_ratio"]["merged_1"])
    row("generate, 8 different states ÷ closed-book", lambda c: c["answer"]["generate_ratio"]["hooks_8"])
    row("merging one state, s", lambda c: c["answer"]["merge_seconds"], "{:.3f}")
    row("normalising one state (once, then cached), s", lambda c: c["answer"]["factors_seconds_per_state"], "{:.3f}")
    row("state per context, MiB", lambda c: c["lengths"][0]["state_bytes"] / 2**20, "{:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--absorb-tokens", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--history-tokens", type=int, default=2500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/adapt_cost.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = [int(x) for x in args.lengths.split(",")]

    results: dict = {"configs": {}}
    for name, overrides in CONFIGS.items():
        ga = GenerativeAdapter.from_pretrained(overrides=overrides)
        text = "\n\n".join(t for _, t in wiki_leads()[:3000])
        ids = ga.tokenizer(text, add_special_tokens=False)["input_ids"]
        leads = [t for _, t in wiki_leads()[3000:3080]]
        states = [ga.absorb(leads[i * 10 : (i + 1) * 10], progress=False) for i in range(8)]
        config = {"generator": ga.fingerprint}
        config["absorb"] = absorb_ratios(ga, ids[: args.absorb_tokens], args.repeats)
        print(name, "absorb", json.dumps(config["absorb"]), flush=True)
        config["answer"] = answer_ratios(ga, states, args.repeats, args.prompt_tokens, args.new_tokens)
        print(name, "answer", json.dumps(config["answer"]), flush=True)
        config["lengths"] = by_length(ga, ids, lengths, args.new_tokens)
        config["persona"] = persona_costs(ga, args.history_tokens, args.new_tokens, args.repeats)
        print(name, "persona", json.dumps(config["persona"]), flush=True)
        results["configs"][name] = config
        del ga

    for name, overrides in ABSORB_ONLY.items():
        ga = GenerativeAdapter.from_pretrained(overrides=overrides)
        ids = ga.tokenizer("\n\n".join(t for _, t in wiki_leads()[:3000]), add_special_tokens=False)["input_ids"]
        results["absorb_only"] = {name: absorb_ratios(ga, ids[: args.absorb_tokens], args.repeats)}
        print(name, "absorb", json.dumps(results["absorb_only"][name]), flush=True)
        del ga

    results["table"] = table(results)
    print(results["table"])
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
    }
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
