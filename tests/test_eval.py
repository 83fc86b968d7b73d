"""The evaluation harness end to end on the tiny random model: JSON, markdown, plots, resuming, templates."""

import json

import pytest
import torch
from conftest import MEMORY, TEXT_A, make_adapter, save_tiny_dirs
from typer.testing import CliRunner

from genadapter import GenAdapterError
from genadapter.cli.eval import eval_app
from genadapter.eval import ICLConfig, KnowledgeConfig, PersonaConfig, run_icl, run_knowledge, run_persona
from genadapter.eval.compare import compare_runs, paired_bootstrap
from genadapter.eval.costs import ModelCosts, generator_flops
from genadapter.eval.engine import Engine
from genadapter.eval.knowledge import load_qa, split_dev
from genadapter.eval.methods import (
    METHODS,
    EvalContext,
    FineTuning,
    GenAdapterMethod,
    Prompting,
    SFTConfig,
    UnrelatedAdapterMethod,
    parse_methods,
)
from genadapter.eval.persona import build_groups, parse_personachat
from genadapter.eval.runner import select_test_items
from genadapter.eval.storage import StorageConfig, build_items, run_storage
from genadapter.eval.templates import KNOWLEDGE

FAST_SFT = SFTConfig(epochs=1, max_length=64)
LONG = "Gustave Eiffel's company designed and built the tower over two years. " * 4 + "The final word is Paris."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ga():
    return make_adapter()


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"context": LONG, "question": "What is the final word?", "answers": ["Paris"]},
            {"context": LONG, "question": "Who built it?", "answers": ["Gustave Eiffel's company"]},
            {"context": LONG.replace("Paris", "Rome"), "question": "What is the last word?", "answers": ["Rome"]},
            {"context": "Marie Curie won two Nobel prizes.", "question": "Who won?", "answers": ["Marie Curie"]},
            {"context": "Bob likes green tea.", "question": "What does Bob like?", "answers": "green tea"},
        ],
    )


def line_count(path):
    return len(path.read_text().splitlines())


# ---- engine and methods --------------------------------------------------------------------------


def test_shared_prefix_matches_adapter(ga):
    """Caching the common prompt prefix changes nothing: same scores and answers as GenerativeAdapter."""
    engine = Engine(ga, batch_size=2, min_prefix=8)
    calls = []
    for name in ("_score_shared", "_generate_shared"):
        original = getattr(engine, name)
        setattr(engine, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    state = ga.absorb(TEXT_A)
    prompts = [f"{TEXT_A}\n\nQuestion {i}: where is it?" for i in range(3)]
    conts = [" Paris", " in France", " London, England"]
    for s in (None, state):
        assert engine.score(prompts, conts, s, chat=True) == pytest.approx(ga.score(prompts, conts, state=s), abs=1e-3)
        for chat in (True, False):
            expected = ga.generate(prompts, state=s, max_new_tokens=6, chat=chat)
            assert engine.generate(prompts, s, chat, 6) == expected
    assert calls.count("_score_shared") == 2 and calls.count("_generate_shared") == 4  # the cached path ran
    plain = Engine(ga, share_prefix=False)
    assert plain.score(prompts, conts, None, chat=False) == pytest.approx(ga.score(prompts, conts, chat=False))


def test_prompting_truncates_from_the_left(ga):
    engine = Engine(ga)
    method = Prompting(engine, window=120)
    adapted = method.adapt(EvalContext("c", [LONG]))
    prompted = method.prompt(adapted, KNOWLEDGE[0], "What is the final word?", reserve=10)
    assert prompted.truncated and prompted.dropped_tokens > 0
    assert prompted.tokens + 10 <= 120
    assert "The final word is Paris." in prompted.text  # the newest tokens are kept
    assert LONG[:40] not in prompted.text
    roomy = Prompting(engine, window=512).prompt(adapted, KNOWLEDGE[0], "What?", reserve=10)
    assert not roomy.truncated and LONG in roomy.text


def test_sft_restores_the_base_model(ga):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = ga.logits(ids).clone()
    method = FineTuning(Engine(ga), 512, SFTConfig(epochs=2, lr=1e-2))
    adapted = method.adapt(EvalContext("c", [TEXT_A]))
    assert adapted.extra["steps"] == 2 and adapted.kept_bytes > 0
    assert not torch.allclose(ga.logits(ids), before)
    method.release(adapted)
    assert torch.equal(ga.logits(ids), before)
    assert not any(p.requires_grad for p in ga.model.parameters())


# ---- knowledge ------------------------------------------------------------------------------------


def test_unrelated_control_absorbs_other_text_of_the_context_length(ga):
    engine = Engine(ga)
    control = UnrelatedAdapterMethod(engine, 512, unrelated="The river flows north through the old valley. " * 3)
    context = EvalContext("c1", [LONG])
    tokens = engine.count(LONG)
    text = control.unrelated_text(context, tokens)
    assert text == control.unrelated_text(context, tokens)  # the offset is fixed by the context id
    assert abs(engine.count(text) - tokens) <= 2 and "Eiffel" not in text  # the short pool wraps around
    own, other = GenAdapterMethod(engine, 512).adapt(context), control.adapt(context)
    assert other.context is context and abs(other.state.num_tokens - own.state.num_tokens) <= 2
    module = next(iter(own.state.sums))
    assert not torch.allclose(own.state.sums[module], other.state.sums[module])
    assert control.adapt(EvalContext("empty", ["  "])).state is None
    assert parse_methods("genadapter, genadapter-unrelated") == ["genadapter", "genadapter-unrelated"]
    assert parse_methods(None) == list(METHODS)  # the control runs only when asked for
    with pytest.raises(GenAdapterError, match="genadapter-unrelated"):
        parse_methods("genadapter,genadapter-other")


def test_knowledge_cli_end_to_end_and_resume(tiny_dirs, tmp_path, qa_file):
    base, gen = tiny_dirs
    out = tmp_path / "out"
    args = ["knowledge", "--data", qa_file, "--out", out, "--base", base, "--generator", gen, "--dev", "1"]
    args += ["--window", "150", "--max-new-tokens", "4", "--sft", "epochs=1", "--sft", "max_length=64"]
    result = CliRunner().invoke(eval_app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["metrics"]) == set(METHODS)
    for values in data["metrics"].values():
        assert {"contains", "f1", "em", "option_acc", "n"} <= set(values) and values["n"] >= 2
    for key in ("config", "costs", "items", "contexts", "versions", "machine", "templates", "by_length"):
        assert key in data
    names = {t.name for t in KNOWLEDGE}
    shared = data["templates"]["shared"]["qa"]["chosen"]
    assert shared in names and {i["template"] for i in data["items"]} == {shared}  # one template for all methods
    for method in METHODS:
        assert data["templates"]["methods"][method]["qa"]["chosen"] in names  # each method's own choice, kept
        assert set(data["templates"]["dev_scores"][method]["qa"]) == names
    assert f"`{shared}`" in (out / "results.md").read_text()
    # only the long contexts (one is in the test split) overflow the 150-token window, and only prompting
    # puts the context in the prompt
    assert data["metrics"]["prompting"]["truncated"] >= 1
    assert data["costs"]["prompting"]["truncated_items"] == data["metrics"]["prompting"]["truncated"]
    assert data["metrics"]["closed-book"]["truncated"] == 0
    assert data["costs"]["genadapter"]["kept_bytes_mean"] > 0 and data["costs"]["sft"]["adapt_s_mean"] > 0
    assert {i["method"] for i in data["items"]} == set(METHODS) and "prediction" in data["items"][0]
    assert "| genadapter |" in (out / "results.md").read_text()
    for png in ("contains_vs_length.png", "cost_vs_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert data["resume"]["skipped_contexts"] == {m: 0 for m in METHODS}

    lines = line_count(out / "records.jsonl")
    again = CliRunner().invoke(eval_app, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    resumed = json.loads((out / "results.json").read_text())
    contexts = data["costs"]["genadapter"]["contexts"]
    assert resumed["resume"]["skipped_contexts"] == {m: contexts for m in METHODS}
    assert line_count(out / "records.jsonl") == lines  # nothing recomputed
    assert resumed["metrics"] == data["metrics"]

    # the run compared with itself, prompting (B) against closed-book (A), item by item
    args = ["compare", out, out, "--method", "closed-book", "--method-b", "prompting", "--json", tmp_path / "c.json"]
    compared = CliRunner().invoke(eval_app, [str(a) for a in args])
    assert compared.exit_code == 0, compared.output
    c = json.loads((tmp_path / "c.json").read_text())
    f1 = data["metrics"]
    assert c["metric"] == "contains" and c["n"] == f1["prompting"]["n"]
    assert c["a"]["template"] == c["b"]["template"] == shared
    assert c["difference"] == pytest.approx(f1["prompting"]["contains"] - f1["closed-book"]["contains"])
    assert c["low"] <= c["difference"] <= c["high"]


def test_knowledge_grouped_news_stream(ga, tmp_path):
    tweets = [f"Tweet {i}: team {i} won the match by {i} goals." for i in range(6)]
    rows = [
        {"context": t, "question": f"How many goals did team {i} win by?", "answers": [str(i)]}
        for i, t in enumerate(tweets)
    ]
    data = write_jsonl(tmp_path / "tweets.jsonl", rows)
    config = KnowledgeConfig(
        data=data, out=tmp_path / "out", dev=1, methods=["prompting", "genadapter", "genadapter-unrelated"],
        group_tokens=[60, 150],
        max_new_tokens=3, progress=False, limit=3,
    )  # fmt: skip
    result = run_knowledge(config, ga=ga)
    for method in ("prompting", "genadapter", "genadapter-unrelated"):
        assert [row["length"] for row in result["by_length"][method]] == [60, 150]
        assert all(row["n"] <= 3 for row in result["by_length"][method])
    packs = {c["group"]: c["context_tokens"] for c in result["contexts"]}
    assert any(tokens > 60 for tokens in packs.values())  # several tweets in one context
    assert (tmp_path / "out" / "results.md").is_file()


def test_half_state_variant_keeps_a_half_precision_state(ga, tmp_path, qa_file):
    config = KnowledgeConfig(
        data=qa_file, out=tmp_path / "half", dev=0, methods=["genadapter", "genadapter-half"], max_new_tokens=3,
        progress=False,
    )  # fmt: skip
    costs = run_knowledge(config, ga=ga)["costs"]
    tensors = costs["genadapter"]["kept_bytes_mean"]  # float32 tensor bytes; the variant keeps its stored file
    assert tensors / 2 < costs["genadapter-half"]["kept_bytes_mean"] < tensors / 2 + 4096  # + the file's header


def test_generator_set_turns_the_memory_off(tmp_path, qa_file):
    base, gen = save_tiny_dirs(tmp_path / "tiny", **MEMORY)
    runs = {}
    for name, extra in (("on", []), ("off", ["--generator-set", "memory_layers=0"])):
        args = ["knowledge", "--data", qa_file, "--out", tmp_path / name, "--base", base, "--generator", gen]
        args += ["--dev", "0", "--methods", "genadapter", "--max-new-tokens", "2", *extra]
        result = CliRunner().invoke(eval_app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    on, off = runs["on"]["config"], runs["off"]["config"]
    assert off["generator_overrides"] == {"memory_layers": 0} and off["generator_config"]["memory_layers"] == 0
    assert on["generator_config"]["memory_layers"] == 1 and on["generator_fingerprint"] != off["generator_fingerprint"]
    assert runs["off"]["costs"]["genadapter"]["kept_bytes_mean"] < runs["on"]["costs"]["genadapter"]["kept_bytes_mean"]


def test_other_settings_in_the_same_out_are_refused(ga, tmp_path, qa_file):
    config = KnowledgeConfig(data=qa_file, out=tmp_path / "o", dev=0, methods=["closed-book"], max_new_tokens=2)
    result = run_knowledge(config, ga=ga)
    assert result["templates"]["shared"]["qa"]["how"] == "training format (no dev items)"
    config.seed = 1
    with pytest.raises(GenAdapterError, match="seed"):
        run_knowledge(config, ga=ga)


def test_skip_gives_a_sample_of_fresh_contexts(ga, tmp_path, qa_file):
    def contexts(result):
        return {c["group"] for c in result["contexts"]}

    def run(name, **kw):
        config = KnowledgeConfig(
            data=qa_file, out=tmp_path / name, dev=0, methods=["closed-book"], max_new_tokens=2, progress=False, **kw
        )
        return run_knowledge(config, ga=ga)

    first, everything = run("first", limit=2), run("all", limit=0)
    fresh = run("fresh", limit=0, skip=2)
    assert contexts(first) and contexts(fresh) and not contexts(first) & contexts(fresh)
    assert contexts(first) | contexts(fresh) == contexts(everything)  # only the skipped contexts are left out
    assert fresh["config"]["skip"] == 2 and first["config"]["skip"] == 0
    with pytest.raises(GenAdapterError, match="skip"):  # another sample cannot resume into the same directory
        run("first", limit=2, skip=1)
    with pytest.raises(GenAdapterError, match="leaves no test items"):
        run("too-many", skip=5)
    with pytest.raises(GenAdapterError, match="leaves no test items"):  # the rest all share skipped contexts
        select_test_items(["a1", "b1", "a2"], 2, 0, context_of=lambda item: item[0])
    with pytest.raises(GenAdapterError, match="group-tokens"):
        run("packed", skip=1, group_tokens=[60])


# ---- icl ------------------------------------------------------------------------------------------


@pytest.fixture
def metaicl_dir(tmp_path):
    root = tmp_path / "metaicl"
    for task, options in (("colors", ["red", "blue"]), ("echo", [])):
        folder = root / task
        folder.mkdir(parents=True)

        def row(i, task=task, options=options):
            return {
                "task": task,
                "input": f"item {i}",
                "output": options[i % 2] if options else f"{i}",
                "options": options,
            }

        write_jsonl(folder / "test.jsonl", [row(i) for i in range(3)])
        for seed in (13, 21):
            write_jsonl(folder / f"{task}_16_{seed}_train.jsonl", [row(100 + seed + i) for i in range(16)])
            write_jsonl(folder / f"{task}_16_{seed}_dev.jsonl", [row(200 + i) for i in range(4)])
    return root


def test_icl_end_to_end(ga, metaicl_dir, tmp_path):
    config = ICLConfig(
        data=metaicl_dir, out=tmp_path / "icl", tasks=["all"], shots=[0, 2], seeds=[13, 21], limit=2, dev=2,
        max_new_tokens=3, sft=FAST_SFT, progress=False,
    )  # fmt: skip
    result = run_icl(config, ga=ga)
    assert set(result["metrics"]) == set(METHODS)
    for values in result["metrics"].values():
        assert {"accuracy", "accuracy_k0", "accuracy_k2"} <= set(values)
        assert 0 <= values["accuracy"] <= 100
    assert set(result["per_task"]["genadapter"]) == {"colors", "echo"}
    assert result["metrics"]["closed-book"]["accuracy_k2"] == result["metrics"]["closed-book"]["accuracy_k0"]
    ks = {(i["method"], i["k"]) for i in result["items"]}
    assert ("closed-book", 2) not in ks and ("genadapter", 2) in ks and ("sft", 0) in ks
    assert {i["seed"] for i in result["items"] if i["k"] == 2} == {13, 21}
    assert all(t["icl"]["chosen"] for t in result["templates"]["methods"].values())
    chosen = result["templates"]["methods"]["genadapter"]["icl"]
    assert chosen["dev"][chosen["chosen"]]["n"] == 2
    assert (tmp_path / "icl" / "accuracy_vs_k.png").is_file() and (tmp_path / "icl" / "results.md").is_file()
    scored = [i for i in result["items"] if i["task"] == "colors"]
    assert all(len(i["option_scores"]) == 2 for i in scored)
    # a single MetaICL file works too: demonstrations come from the sibling *_train.jsonl files
    single = ICLConfig(
        data=metaicl_dir / "colors" / "test.jsonl", out=tmp_path / "icl1", shots=[2], seeds=[13], limit=1, dev=0,
        methods=["genadapter"], progress=False, plots=False,
    )  # fmt: skip
    assert run_icl(single, ga=ga)["metrics"]["genadapter"]["n"] == 1
    with pytest.raises(GenAdapterError, match="another --seed"):  # icl samples per task: --skip has no meaning
        run_icl(ICLConfig(data=metaicl_dir, out=tmp_path / "icl2", skip=1, progress=False), ga=ga)


# ---- persona --------------------------------------------------------------------------------------

PERSONA = """1 your persona: i have two dogs.
2 your persona: i love vintage cars.
3 hi ! how are you ?\ti am great , walking my two dogs .
4 nice . i work at a shelter .\tcool . i fix old cars on weekends .
5 what cars ?\tmustangs , mostly from the sixties .
1 your persona: i am a nurse.
2 your persona: my favorite color is green.
3 hello there .\thi ! i just finished a night shift at the hospital .
4 that sounds tiring .\tit is , but i like helping people .
5 what do you do to relax ?\ti paint everything green .
1 your persona: i play the violin.
2 your persona: i live in boston.
3 hey , what is up ?\tjust practicing violin in boston .
4 do you play in a band ?\tin an orchestra , yes .
5 that is neat .\tthanks ! do you play music ?
1 your persona: i hate vegetables.
2 your persona: i drive a truck.
3 good morning !\tmorning ! just got back from a long drive in my truck .
4 where did you go ?\tto texas and back .
5 did you eat well ?\tonly burgers , i hate vegetables .
"""


def test_persona_end_to_end(ga, tmp_path):
    path = tmp_path / "persona.txt"
    path.write_text(PERSONA)
    dialogues = parse_personachat(path)
    assert len(dialogues) == 4 and dialogues[0].persona == ["i have two dogs.", "i love vintage cars."]
    groups = build_groups(dialogues, dialogues, Engine(ga), distractors=2, seed=0)
    for dialogue, group in zip(dialogues, groups, strict=True):
        history = group.context.text
        assert "persona" not in history and dialogue.turns[-1][1] not in history  # hidden facts, no answer
        recall = [i for i in group.items if hasattr(i, "candidates")]
        assert all(len(i.candidates) == 3 and i.candidates[i.answer] == i.fact for i in recall)
        assert not any(c in dialogue.persona for i in recall for c in i.candidates if c != i.fact)

    config = PersonaConfig(
        data=path, out=tmp_path / "persona", dev=1, limit=2, distractors=2, max_new_tokens=4, sft=FAST_SFT,
        progress=False,
    )  # fmt: skip
    result = run_persona(config, ga=ga)
    for values in result["metrics"].values():
        assert {"recall_acc", "reply_f1"} <= set(values) and values["n"] == 2 and values["recall_items"] == 4
    assert set(result["templates"]["methods"]["sft"]) == {"recall", "reply"}
    assert (tmp_path / "persona" / "persona_metrics.png").is_file()
    assert (tmp_path / "persona" / "cost_vs_length.png").is_file()
    again = run_persona(config, ga=ga)
    assert again["resume"]["skipped_contexts"] == {m: 2 for m in METHODS}
    config.out, config.skip, config.methods = tmp_path / "persona-fresh", 2, ["closed-book"]
    fresh = run_persona(config, ga=ga)  # 3 test dialogues: the one after the first run's two
    assert {c["group"] for c in fresh["contexts"]}.isdisjoint({c["group"] for c in result["contexts"]})
    assert fresh["metrics"]["closed-book"]["n"] == 1


# ---- paired comparison of runs --------------------------------------------------------------------


def write_records(run, scores, method="genadapter", metric="f1"):
    run.mkdir()
    rows = [
        {"kind": "item", "method": method, "id": i, metric: v, "k": n % 2, "latency_s": 0.1}
        for n, (i, v) in enumerate(scores.items())
    ]
    write_jsonl(run / "records.jsonl", rows)
    with (run / "records.jsonl").open("a") as fh:
        fh.write('{"kind": "item", "method": "genadap')  # a line cut short by a killed run is skipped
    return run


def test_paired_bootstrap_interval_and_counts():
    gen = torch.Generator().manual_seed(0)
    a = {f"q{i}": float(v) for i, v in enumerate(torch.rand(60, generator=gen) * 100)}
    b = {k: v + 5.0 for k, v in a.items()}
    shifted = paired_bootstrap(a, b, seed=1)
    assert shifted.difference == pytest.approx(5.0) and shifted.low == pytest.approx(5.0) == shifted.high
    assert shifted.b_better == 60 and shifted.b_worse == 0 and shifted.only_a == shifted.only_b == 0

    noisy = {k: v + float(torch.randn(1, generator=gen)) * 30 for k, v in a.items() if k != "q0"}
    noisy["extra"] = 1.0
    c = paired_bootstrap(a, noisy, seed=3)
    paired = [k for k in a if k in noisy]
    assert c.n == 59 and c.only_a == 1 and c.only_b == 1
    assert c.difference == pytest.approx(sum(noisy[k] - a[k] for k in paired) / 59)
    assert c.low < c.difference < c.high and c.b_better + c.b_worse == 59
    assert paired_bootstrap(a, noisy, seed=3) == c  # seeded: the same interval again
    wider = paired_bootstrap(a, noisy, seed=3, confidence=0.99)
    assert wider.low < c.low and wider.high > c.high


def test_compare_runs_reads_records_and_rejects_bad_input(tmp_path):
    a = write_records(tmp_path / "a", {"x": 0.0, "y": 100.0, "z": 50.0})
    b = write_records(tmp_path / "b", {"x": 100.0, "y": 100.0, "z": 0.0})
    c = compare_runs(a, b)
    assert c.metric == "f1" and c.n == 3 and c.difference == pytest.approx(50 / 3)
    assert (c.b_better, c.b_worse) == (1, 1)
    assert compare_runs(a, b, metric="latency_s").difference == pytest.approx(0.0)
    only_x = compare_runs(a, b, only={"k": "0"})  # items x and z
    assert only_x.n == 2 and only_x.difference == pytest.approx(25.0)
    with pytest.raises(GenAdapterError, match="no item of 'genadapter'.*k=5"):
        compare_runs(a, b, only={"k": "5"})
    with pytest.raises(GenAdapterError, match="no field 'task'"):
        compare_runs(a, b, only={"task": "x"})
    with pytest.raises(GenAdapterError, match="no records.jsonl"):
        compare_runs(tmp_path, b)
    with pytest.raises(GenAdapterError, match="has: genadapter"):
        compare_runs(a, b, method="prompting")
    with pytest.raises(GenAdapterError, match="no metric 'accuracy'"):
        compare_runs(a, b, metric="accuracy")
    other = write_records(tmp_path / "other", {"w": 1.0})
    with pytest.raises(GenAdapterError, match="share no scored item"):
        compare_runs(a, other)
    result = CliRunner().invoke(eval_app, ["compare", str(a), str(b)])
    assert result.exit_code == 0 and "over 3 paired items" in result.output and "no clear difference" in result.output
    result = CliRunner().invoke(
        eval_app, ["compare", str(a), str(b), "--only", "k=1", "--json", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 0 and "over 1 paired items" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["only"] == {"k": "1"}
    result = CliRunner().invoke(eval_app, ["compare", str(a), str(b), "--only", "k"])
    assert isinstance(result.exception, GenAdapterError) and "--only expects KEY=VALUE" in str(result.exception)


# ---- evaluation protocol: one template, dev splits that can choose, scoring that ignores format ----------------


def test_genadapter_with_an_empty_context_equals_closed_book_bit_for_bit(ga, metaicl_dir, tmp_path):
    """At k = 0 genadapter absorbs nothing: under the same template it must be the closed-book model exactly, so
    the harness can never report the two apart except through a template the report names."""
    for template in ("icl-chat", "icl-plain"):
        config = ICLConfig(
            data=metaicl_dir, out=tmp_path / template, tasks=["all"], shots=[0], seeds=[13], limit=3, dev=0,
            methods=["closed-book", "genadapter"], template=template, max_new_tokens=4, progress=False, plots=False,
        )  # fmt: skip
        result = run_icl(config, ga=ga)
        by_method: dict[str, dict] = {}
        for item in result["items"]:
            by_method.setdefault(item["method"], {})[item["id"]] = (item["prediction"], item.get("option_scores"))
        assert by_method["closed-book"] == by_method["genadapter"]
        assert any(scores for _, scores in by_method["genadapter"].values())  # option log-probs compared, not only text
        assert result["metrics"]["closed-book"]["accuracy_k0"] == result["metrics"]["genadapter"]["accuracy_k0"]


def test_pick_template_keeps_the_training_format_unless_dev_clearly_prefers_another():
    from genadapter.eval.runner import pick_template

    names = ["train-format", "other"]
    noisy = {"train-format": [0.0, 100.0, 0.0, 100.0], "other": [100.0, 100.0, 0.0, 100.0]}  # +25 ± 25
    assert pick_template(names, [noisy])["chosen"] == "train-format"
    clear = {"train-format": [0.0] * 32, "other": [100.0] * 30 + [0.0] * 2}
    picked = pick_template(names, [clear])
    assert picked["chosen"] == "other" and picked["dev"]["other"]["n"] == 32 and picked["dev"]["other"]["se"] > 0
    # pooled over methods: one method's clear preference is diluted by another's opposite one
    opposite = {"train-format": [100.0] * 32, "other": [0.0] * 32}
    assert pick_template(names, [clear, opposite])["chosen"] == "train-format"
    assert pick_template(names, [{}])["how"] == "training format (no dev items)"


def test_contains_answer_and_named_options():
    from genadapter.metrics import contains_answer, named_options

    assert contains_answer("6 PM or 11 PM.", ["6 PM"]) == 1.0 and contains_answer("at 16 PM", ["6 PM"]) == 0.0
    assert contains_answer("The answer: Paris, France", ["paris"]) == 1.0 and contains_answer("", ["x"]) == 0.0
    assert named_options("What time did CPU load go up: 6 PM or 11 PM?", ["6 PM"]) == (["6 PM", "11 PM"], 0)
    assert named_options("are people calling or texting her?", ["texting"]) == (["calling", "texting"], 1)
    assert named_options("Is it real or not?", ["of course"]) is None  # the gold answer is not one of them
    assert named_options("Who won?", ["Marie Curie"]) is None


def test_all_templates_answers_every_candidate_and_reports_the_sensitivity(ga, tmp_path, qa_file):
    rows = [json.loads(line) for line in qa_file.read_text().splitlines()]
    rows.append({"context": "The meeting is at 6 PM.", "question": "When is it: 6 PM or 11 PM?", "answers": ["6 PM"]})
    data = write_jsonl(tmp_path / "qa2.jsonl", rows)
    out = tmp_path / "all"
    config = KnowledgeConfig(
        data=data, out=out, dev=1, methods=["closed-book", "genadapter"], all_templates=True, max_new_tokens=3,
        progress=False,
    )  # fmt: skip
    result = run_knowledge(config, ga=ga)
    names = {t.name for t in KNOWLEDGE}
    for method in ("closed-book", "genadapter"):
        assert set(result["template_sensitivity"][method]) == names
        answered = {(i["template"], i["id"]) for i in result["items"] if i["method"] == method}
        assert {t for t, _ in answered} == {result["templates"]["shared"]["qa"]["chosen"]}  # the headline: shared
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["template"] for r in records if r["kind"] == "item"} == names
    option_items = [r for r in records if r["kind"] == "item" and r.get("option_acc") is not None]
    assert option_items and all(r["option_acc"] in (0.0, 100.0) for r in option_items)
    text = (out / "results.md").read_text()
    assert "Every candidate template on the test items" in text and (out / "templates.png").is_file()
    # a paired comparison across templates is refused unless asked for
    other = next(n for n in names if n != result["templates"]["shared"]["qa"]["chosen"])
    with pytest.raises(GenAdapterError, match="template"):
        compare_runs(out, out, "closed-book", "genadapter", template_b=other)
    assert compare_runs(out, out, "closed-book", "genadapter", template_b=other, across_templates=True).n >= 1


# ---- storage -------------------------------------------------------------------------------------


def test_storage_items_hide_facts_that_cannot_be_guessed(ga):
    def count(text):
        return len(ga.tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = build_items(ga.tokenizer, [160, 320], facts=2, contexts=3, dev=2, seed=0)
    assert rows == build_items(ga.tokenizer, [160, 320], facts=2, contexts=3, dev=2, seed=0)
    assert rows != build_items(ga.tokenizer, [160, 320], facts=2, contexts=3, dev=2, seed=1)
    test, dev = [r for r in rows if r["split"] == "test"], [r for r in rows if r["split"] == "dev"]
    assert len(test) == 2 * 3 * 2 and len(dev) == 2 * 2
    assert sorted({r["length"] for r in test}) == [160, 320]
    for row in rows:
        (answer,) = row["answers"]
        assert answer in row["context"] and answer not in row["question"]
        assert abs(count(row["context"]) - row["length"]) <= 2 + row["length"] // 20
    assert len({r["answers"][0] for r in rows}) == len(rows)  # every value is new
    with pytest.raises(GenAdapterError, match="cannot hold 4 facts"):
        build_items(ga.tokenizer, [64], facts=4, contexts=1, dev=0, seed=0)


def test_storage_end_to_end_by_nominal_length(ga, tmp_path):
    config = StorageConfig(
        out=tmp_path / "storage", methods=["closed-book", "genadapter"], lengths=[64, 96], contexts=2, dev=2,
        max_new_tokens=4, progress=False, plots=False,
    )  # fmt: skip
    result = run_storage(config, ga=ga)
    assert result["scenario"] == "storage"
    for method in ("closed-book", "genadapter"):
        assert [(row["length"], row["n"]) for row in result["by_length"][method]] == [(64, 2), (96, 2)]
    rows = [json.loads(line) for line in (tmp_path / "storage" / "items.jsonl").read_text().splitlines()]
    dev_questions = {r["question"] for r in rows if r["split"] == "dev"}
    assert not dev_questions & {item["question"] for item in result["items"]}  # dev items are never reported


def test_a_data_file_may_fix_the_dev_split_and_must_name_it_right(tmp_path):
    rows = [
        {"context": f"Code {i} is {i}.", "question": f"What is code {i}?", "answers": [str(i)], "split": split}
        for i, split in enumerate(["dev", "test", "dev", "test"])
    ]
    dev, test = split_dev(load_qa(write_jsonl(tmp_path / "qa.jsonl", rows)), 1)
    assert len(dev) == 1 and dev[0].question in {"What is code 0?", "What is code 2?"}
    assert [i.question for i in test] == ["What is code 1?", "What is code 3?"]
    rows[0]["split"] = "train"
    with pytest.raises(GenAdapterError, match="split must be 'dev' or 'test'"):
        load_qa(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_flop_estimates_count_the_next_token_memory():
    plain = make_adapter()
    costs = ModelCosts.of(plain.model)
    absorb, per_token = generator_flops(plain.generator, 10, costs.vocab_size)
    for targets in ("next", "error"):
        ga = make_adapter(memory_layers=1, memory_keys=8, memory_targets=targets)
        (name,) = ga.generator.memory.module_names
        d_in, d_out = ga.generator.memory.in_features[name], ga.generator.memory.out_features[name]
        vocabulary = 2 * 2 * costs.vocab_size * ga.generator.hidden_size if targets == "error" else 0
        with_memory = generator_flops(ga.generator, 10, costs.vocab_size)
        assert with_memory[0] == pytest.approx(absorb + 10 * (2 * (d_in * 8 + d_out * 8 + 8 * 8) + vocabulary))
        assert with_memory[1] == pytest.approx(per_token + 2 * (d_in * 8 + 8 * d_out))
