"""Training recipes on the tiny model: losses behave, runs resume after SIGKILL, NaN stops with a message."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import MEMORY, TEXT_A, TEXT_B, make_adapter, tiny_config

from genadapter import GenerativeAdapter, formats
from genadapter.data import split_wiki
from genadapter.errors import GenAdapterError
from genadapter.train import TrainConfig
from genadapter.train.data import (
    Example,
    instruction_examples,
    metaicl_train_tasks,
    pretrain_documents,
)
from genadapter.train.facts import OpenValues, fact_questions
from genadapter.train.loop import GeneratorTrainer, HeldOut, TrainingError, build_adapter, forward_backward, train
from genadapter.train.objectives import (
    AnswerBatch,
    adapted_logits,
    context_states,
    instruct_losses,
    linear_cross_entropy,
    plain_lm_head,
    pretrain_losses,
    target_nll,
)


def tiny_train_config(base, out, **overrides) -> TrainConfig:
    values = dict(
        recipe="pretrain",
        output_dir=str(out),
        base=str(base),
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        generator=tiny_config().to_dict(),
        num_chunks=3,
        max_documents=50,
        heldout_docs=20,
        eval_every=1000,
        eval_sequences=2,
        log_every=1,
        checkpoint_minutes=0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_pretrain_losses_use_prefix_states():
    ga = make_adapter()
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:64]
    config = tiny_train_config("x", "y", num_chunks=4)
    with_adapter = pretrain_losses(ga, [ids], config, np.random.default_rng(0))
    without = pretrain_losses(ga, [ids], config, np.random.default_rng(0), with_adapter=False)
    assert set(with_adapter) == {"completion", "reconstruction", "loss"}
    assert with_adapter["loss"].requires_grad
    assert not torch.isclose(with_adapter["completion"], without["completion"])


def _row_nll_from_all_logits(full, ids, target_mask):
    """Mean NLL of each row's target tokens, token by token from the logits of every position."""
    logp = full.log_softmax(-1)
    rows = []
    for row in range(len(ids)):
        positions = [t for t in range(1, ids.shape[1]) if target_mask[row, t]]
        rows.append(torch.stack([-logp[row, t - 1, ids[row, t]] for t in positions]).mean())
    return torch.stack(rows)


def test_target_nll_scores_each_rows_targets_from_the_kept_positions_only():
    """Rows of different lengths (padding) and a target mask with gaps: the per-row NLL from the kept positions
    equals the one from the logits of every position, with or without forming the logits, and so do the
    generator's gradients."""
    ga = make_adapter()
    tok = ga.tokenizer
    ids, mask = ga.pad([tok(t, add_special_tokens=False)["input_ids"][:n] for t, n in ((TEXT_A, 20), (TEXT_B, 13))])
    targets = mask.clone()
    targets[0, 5:9] = 0
    ga.generator.requires_grad_(True)
    results = []
    for with_logits in (False, True):
        normalized = ga.generator.normalize(context_states(ga, [[ids[1, :13].tolist()], [ids[0].tolist()]]))
        per_row, logits = target_nll(ga, ids, mask, targets, normalized, with_logits)
        per_row.sum().backward()
        results.append((per_row.detach(), {n: p.grad.clone() for n, p in ga.generator.named_parameters()}))
        ga.generator.zero_grad(set_to_none=True)
    full = adapted_logits(ga, ids, mask, normalized)
    torch.testing.assert_close(results[0][0], _row_nll_from_all_logits(full, ids, targets).detach())
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)
    assert logits.shape == (int(targets[:, 1:].sum()), full.shape[-1])


def test_linear_cross_entropy_matches_the_logits_path_in_value_and_gradient():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 6, dtype=torch.float64), torch.randn(17, 6, dtype=torch.float64)
    targets = torch.randint(0, 17, (10,))
    upstream = torch.rand(10, dtype=torch.float64)  # a weighted sum, as the per-row means make it
    fused_in, plain_in = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    fused = linear_cross_entropy(fused_in, weight, targets, chunk=3)  # 3 full chunks and a partial one
    plain = torch.nn.functional.cross_entropy(plain_in @ weight.T, targets, reduction="none")
    (fused * upstream).sum().backward()
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused, plain.detach())
    torch.testing.assert_close(fused_in.grad, plain_in.grad)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(hidden, weight.requires_grad_(True), targets)


def test_a_scaled_or_capped_lm_head_keeps_the_logits_path(monkeypatch):
    ga = make_adapter()
    assert plain_lm_head(ga.model)
    monkeypatch.setattr(ga.model.config, "final_logit_softcapping", 30.0, raising=False)
    assert not plain_lm_head(ga.model)


def test_instruct_losses_on_answer_logits_equal_those_on_all_logits():
    """The answer NLL and the distillation KL project only answer positions onto the vocabulary; they must
    equal the same losses taken from the logits of every position."""
    ga = make_adapter()
    examples = [Example([TEXT_A], "Where is the tower?", "in Paris", "t"), Example([TEXT_B], "Who?", "Curie", "t")]
    batch = AnswerBatch.build(ga, examples, 64)
    normalized = ga.generator.normalize(context_states(ga, batch.contexts))
    full = adapted_logits(ga, batch.ids, batch.mask, normalized)
    nll, logits = batch.answer_nll(ga, normalized, with_logits=True)
    torch.testing.assert_close(nll, _row_nll_from_all_logits(full, batch.ids, batch.answer_mask).mean())
    assert logits.shape == (int(batch.answer_mask.sum()), full.shape[-1])

    # the KL as the loop over rows of full teacher and student logits computed it
    tok = ga.tokenizer
    per_row = []
    for row, (ex, answer) in enumerate(zip(examples, batch.answers, strict=True)):
        context = "\n\n".join(tok.decode(doc) for doc in batch.contexts[row])
        teacher_prompt = tok(ga.format_prompt(formats.with_context(context, ex.prompt)), add_special_tokens=False)
        t_ids = torch.tensor([teacher_prompt["input_ids"] + answer])
        t_logp = adapted_logits(ga, t_ids, torch.ones_like(t_ids), None)[0, -len(answer) - 1 : -1].log_softmax(-1)
        start = int(batch.answer_mask[row].nonzero()[0]) - 1
        s_logp = full[row, start : start + len(answer)].log_softmax(-1)
        per_row.append((t_logp.exp() * (t_logp - s_logp)).sum() / len(answer))
    config = tiny_train_config("x", "y", recipe="instruct", objective="mix", max_context_tokens=64)
    losses = instruct_losses(ga, examples, config)
    torch.testing.assert_close(losses["distill"], torch.stack(per_row).mean())
    torch.testing.assert_close(losses["answer"], nll)


def test_other_context_control_changes_only_the_adapter_source():
    ga = make_adapter()
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"]
    own, other = ids[:64], ids[64:128]
    config = tiny_train_config("x", "y", num_chunks=4)
    default = pretrain_losses(ga, [own], config, np.random.default_rng(0))
    same = pretrain_losses(ga, [own], config, np.random.default_rng(0), adapter_sequences=[own])
    swapped = pretrain_losses(ga, [own], config, np.random.default_rng(0), adapter_sequences=[other])
    torch.testing.assert_close(default["loss"], same["loss"])
    assert not torch.isclose(default["completion"], swapped["completion"])
    with pytest.raises(ValueError, match="adapter sequences"):
        pretrain_losses(ga, [own], config, np.random.default_rng(0), adapter_sequences=[other[:10]])


@pytest.mark.parametrize("kind", ["pretrain", "instruct"])
def test_micro_batches_give_the_whole_batchs_losses_and_gradients(kind):
    ga = make_adapter()
    tok = ga.tokenizer
    config = tiny_train_config("x", "y", recipe="instruct", objective="mix", num_chunks=3, max_context_tokens=64)
    if kind == "pretrain":
        ids = tok(TEXT_A + " " + TEXT_B, add_special_tokens=False)["input_ids"]
        batch = [ids[start : start + 48] for start in (0, 20, 40)]
    else:
        batch = [
            Example([TEXT_A], "Where is the tower?", "in Paris", "t"),
            Example([TEXT_B], "Who?", "Marie Curie", "t"),
            Example([TEXT_B, TEXT_A], "What did she win?", "two Nobel prizes", "t"),
        ]
    trainer, accelerator = GeneratorTrainer(ga, config), Accelerator(cpu=True)
    results = []
    for micro_batch_size in (0, 2, 1):
        losses = forward_backward(accelerator, trainer, kind, batch, np.random.default_rng(0), micro_batch_size)
        results.append((losses, {n: p.grad.clone() for n, p in ga.generator.named_parameters()}))
        ga.generator.zero_grad(set_to_none=True)
    (whole, whole_grads), *micro = results
    assert set(whole) == (
        {"completion", "reconstruction", "loss"} if kind == "pretrain" else {"answer", "distill", "loss"}
    )
    for losses, grads in micro:
        for key in whole:
            torch.testing.assert_close(losses[key], whole[key])
        for name in whole_grads:
            torch.testing.assert_close(grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(GenAdapterError, match="micro_batch_size"):
        tiny_train_config("x", "y", micro_batch_size=-1)


def test_contrastive_term_compares_own_and_next_sequences_adapters_on_the_same_targets():
    ga = make_adapter()
    ids = ga.tokenizer(TEXT_A + " " + TEXT_B, add_special_tokens=False)["input_ids"]
    pair = [ids[:48], ids[48:96]]
    plain = tiny_train_config("x", "y", num_chunks=3)
    config = tiny_train_config("x", "y", num_chunks=3, contrast_weight=0.5, contrast_margin=100.0)
    own = pretrain_losses(ga, pair, plain, np.random.default_rng(0))
    other = pretrain_losses(ga, pair, plain, np.random.default_rng(0), adapter_sequences=pair[::-1])
    with_contrast = pretrain_losses(ga, pair, config, np.random.default_rng(0))

    def all_rows(losses):  # 2 × 2 completion rows and 2 × 3 reconstruction rows
        return (4 * losses["completion"] + 6 * losses["reconstruction"]) / 10

    for task in ("completion", "reconstruction"):
        torch.testing.assert_close(with_contrast[task], own[task])
    # a margin far above every gap keeps the hinge linear: it is the margin minus the mean gap
    torch.testing.assert_close(with_contrast["contrast"], 100.0 - (all_rows(other) - all_rows(own)))
    torch.testing.assert_close(with_contrast["loss"], own["loss"] + 0.5 * with_contrast["contrast"])
    with pytest.raises(ValueError, match="at least 2"):
        pretrain_losses(ga, pair[:1], config, np.random.default_rng(0))


def test_test_tasks_never_reach_training_data():
    test_tasks = set(
        json.loads((metaicl_train_tasks.__globals__["data_root"]() / "metaicl/hr_to_lr.json").read_text())["test"]
    )
    assert not test_tasks & set(metaicl_train_tasks())
    train_leads, heldout = split_wiki(50)
    assert not {t for t, _ in heldout} & {t for t, _ in train_leads}


def test_fact_questions_are_answered_by_their_context_only():
    import random

    triples = fact_questions(random.Random(0), 40)
    assert len(triples) == 40 and triples == fact_questions(random.Random(0), 40)
    for context, question, answer in triples:
        # the answer is in the context (other paragraphs are distractors and may share a common value)
        assert sum(answer in paragraph for paragraph in context) >= 1, (context, answer)
        assert answer not in question
    # random values: the same question wording gets many different answers across entities
    answers = {a for _, q, a in triples if "born" in q or "founded" in q or "members" in q}
    assert len(answers) > 3
    assert any(len(context) > 1 for context, _, _ in triples)


def test_fact_paragraphs_sometimes_refer_back_instead_of_naming_in_full():
    import random

    from genadapter.train.facts import fact_paragraph

    rng = random.Random(0)
    back_references = ("It ", "The town ", "The society ", "The club ", "The guild ", "The company ")
    referring = 0
    for _ in range(100):
        paragraph, questions = fact_paragraph(rng)
        first, *rest = paragraph.split(". ")
        name = min((first.split(verb)[0] for verb in (" is ", " grew ", " was ")), key=len)
        surname_only = [s for s in rest if s.split()[0] == name.split()[-1] and not s.startswith(name)]
        referring += any(s.startswith(back_references) for s in rest) or bool(surname_only)
        assert all(name.lower() in question.lower() for question, _ in questions)  # questions always name it
    assert 10 < referring < 100


def test_counterfactual_lead_swaps_every_name_and_number_consistently():
    import random

    from genadapter.train.facts import counterfactual_lead

    title = "Ada Lovelace"
    text = (
        "Ada Lovelace was an English mathematician, born in 1815 in London. In 1833 Lovelace met Charles Babbage "
        "in London, and in December 1843 she published 65 pages of notes. Her notes were read by 2,400 people."
    )
    new_title, new_text = counterfactual_lead(title, text, random.Random(0))
    assert (new_title, new_text) == counterfactual_lead(title, text, random.Random(0))
    for name in ("Ada", "Lovelace", "London", "Charles", "Babbage", "1815", "1833", "1843", "65", "2,400"):
        assert name not in new_text and name not in new_title
    # kept: sentence-initial words, demonyms, months, lower-case words
    for kept in ("In 1", "English mathematician", "in December 1", "Her notes were read by"):
        assert kept in new_text
    assert new_text.startswith(new_title + " was an English mathematician")
    london = re.search(r"born in \d{4} in (\w+)\.", new_text).group(1)
    assert new_text.count(f"{london}, and") == 1  # the same new name at every mention
    years = [int(w) for w in re.findall(r"\b\d{4}\b", new_text)]
    assert years == sorted(years) and len(set(years)) == 3  # one shift for all years: their order survives


def _open_values(heldout: bool, probability: float = 1.0):
    # titles with q, x or j: invented words (no such onsets) can never spell one, so any hit came from a pool
    leads = [
        *[(title, f"{title} is a city.") for title in ("Quorvex", "Jaxtown", "Exquill", "Qualdrix", "Vexjor")],
        *[(title.capitalize(), f"The {title} is a thing.") for title in ("quillax", "jexwort", "quasque", "boxjaw")],
        *[
            (f"{a} {b}", f"{a} {b} was a writer.")
            for a, b in (("Quin", "Jaxby"), ("Xaver", "Quell"), ("Jaxon", "Quobb"))
        ],
        ("Quex (band)", "skipped: not all letters"),
    ]
    return OpenValues.from_leads(leads, heldout=heldout, probability=probability)


def test_open_fact_values_split_titles_into_kinds_and_keep_a_heldout_half():
    train_values, heldout_values = _open_values(False), _open_values(True)
    merged = {
        kind: set(getattr(train_values, kind)) | set(getattr(heldout_values, kind))
        for kind in ("first_names", "proper_nouns", "things")
    }
    assert merged == {
        "first_names": {"Quin", "Xaver", "Jaxon"},
        "proper_nouns": {"Quorvex", "Jaxtown", "Exquill", "Qualdrix", "Vexjor", "Jaxby", "Quell", "Quobb"},
        "things": {"quillax", "jexwort", "quasque", "boxjaw"},
    }
    for kind in merged:
        assert not set(getattr(train_values, kind)) & set(getattr(heldout_values, kind))
    with pytest.raises(ValueError, match="probability"):
        _open_values(False, probability=0.0)


def test_fact_draws_use_open_values_of_their_half_only():
    import random

    from genadapter.train.facts import FactRandom

    assert fact_questions(FactRandom(5), 60) == fact_questions(random.Random(5), 60)  # no values: the lists only
    # and exactly what the generator drew before open values existed (answers recorded from commit 8dd3b89)
    recorded = ["6 hours", "glassware", "728", "salt", "porcelain", "Luca Halloran", "Stougrend", "Chen Kipos"]
    assert [answer for _, _, answer in fact_questions(random.Random(0), 8)] == recorded
    train_values, heldout_values = _open_values(False), _open_values(True)
    triples = fact_questions(FactRandom(5, train_values), 200)
    assert triples != fact_questions(random.Random(5), 200)
    text = " ".join(" ".join(context) + " " + answer for context, _, answer in triples)
    assert sum(train_values.holds_value(answer) for _, _, answer in triples) > 50
    assert not heldout_values.holds_value(text)  # evaluation values never reach training data
    known_for = [answer for _, question, answer in triples if "known for making" in question]
    assert known_for and set(known_for) <= set(train_values.things)


def test_instruction_sources_choose_the_mix():
    facts_only = instruction_examples(50, seed=0, sources=["facts"], facts=30)
    assert len(facts_only) == 30 and {ex.task for ex in facts_only} == {"facts"}
    with pytest.raises(GenAdapterError, match="unknown instruction sources"):
        instruction_examples(50, seed=0, sources=["facts", "web"])
    with pytest.raises(GenAdapterError, match="gave no examples"):
        instruction_examples(50, seed=0, sources=["facts"], facts=0)


@pytest.mark.parametrize("recipe", ["pretrain", "instruct"])
def test_recipe_runs_and_writes_outputs(tiny_dirs, tmp_path, recipe):
    base, gen = tiny_dirs
    config = tiny_train_config(
        base, tmp_path / recipe, recipe=recipe, objective="mix", pretrain_every=2, max_context_tokens=48
    )
    final = train(config)
    assert (final / "generator.safetensors").is_file() and (final / "train_config.json").is_file()
    metrics = json.loads((final / "heldout_metrics.json").read_text())
    kinds = ("adapter", "other_context", "base")
    expected = {f"{task}_{kind}" for task in ("completion", "reconstruction") for kind in kinds}
    expected |= {f"{task}_nll_{kind}" for task in ("qa", "facts", "facts_open") for kind in kinds}
    expected |= {f"{facts}_f1_{kind}" for facts in ("facts", "facts_open") for kind in ("adapter", "other_context")}
    assert expected | {"cloze_f1_adapter"} <= set(metrics)
    log = [json.loads(line) for line in (tmp_path / recipe / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_log_lines_average_every_step_kind_since_the_last_line(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    out = tmp_path / "mixed"
    config = tiny_train_config(base, out, recipe="instruct", pretrain_every=2, log_every=2, max_context_tokens=48)
    train(config)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        assert {"pretrain.loss", "pretrain.completion", "instruct.loss", "instruct.answer"} <= set(record)
        assert record["loss"] == pytest.approx((record["pretrain.loss"] + record["instruct.loss"]) / 2)


def test_killed_run_resumes_to_the_same_weights(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    reference = tiny_train_config(base, tmp_path / "ref", steps=6)
    train(reference)
    killed = tiny_train_config(base, tmp_path / "killed", steps=6, log_every=1)
    reference_config = tmp_path / "killed.json"
    reference_config.write_text(json.dumps(killed.to_dict()))
    code = (
        "import sys, time, genadapter.train.loop as loop\n"
        "from genadapter.train import TrainConfig\n"
        "orig = loop.pretrain_losses\n"
        "def slow(*a, **k):\n    time.sleep(0.5)\n    return orig(*a, **k)\n"
        "loop.pretrain_losses = slow\n"
        "loop.train(TrainConfig.load(sys.argv[1]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(reference_config)], stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["step"] >= 2:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 2 <= step < 6
    train(TrainConfig.load(reference_config))
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["generator"]
    b = torch.load(checkpoint, weights_only=False)["generator"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_learning_rate_follows_steps_or_the_time_box_whichever_is_further():
    from genadapter.train.loop import lr_factor

    boxed = TrainConfig(steps=100, warmup_steps=10, max_minutes=1.0)
    unboxed = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(boxed, 4, 50.0) == lr_factor(unboxed, 4, 0.0) == pytest.approx(0.5)  # warm-up goes by steps
    assert lr_factor(boxed, 55, 0.0) == lr_factor(unboxed, 55, 1e9) == pytest.approx(0.55)  # half-way by steps
    assert lr_factor(boxed, 20, 30.0) == pytest.approx(0.55)  # half-way by time
    assert lr_factor(boxed, 20, 60.0) == pytest.approx(0.1) == lr_factor(boxed, 100, 0.0)


def test_time_boxed_run_stops_early_finishes_and_keeps_its_budget_on_resume(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    config = tiny_train_config(base, tmp_path / "boxed", steps=100_000, warmup_steps=1, max_minutes=0.05)
    final = train(config)
    assert (final / "generator.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "boxed" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert 0 < len(steps) < 100_000 and log[-1]["step"] == steps[-1]["step"] and "final_eval" in log[-1]
    assert steps[-1]["lr"] < 0.5 * config.lr < steps[0]["lr"]  # the cosine ran down with the clock
    assert torch.load(tmp_path / "boxed" / "checkpoint.pt", weights_only=False)["elapsed_s"] >= 3.0

    train(config)  # resuming: the budget is spent, so no further step
    again = [json.loads(line) for line in (tmp_path / "boxed" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in again if "loss" in r]) == len(steps) and again[-1]["step"] == steps[-1]["step"]


def test_nan_loss_stops_with_a_clear_message(tiny_dirs, tmp_path, monkeypatch):
    base, _ = tiny_dirs
    import genadapter.train.loop as loop

    def nan_losses(*args, **kwargs):
        return {"loss": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(loop, "pretrain_losses", nan_losses)
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        train(tiny_train_config(base, tmp_path / "nan"))


def test_bf16_on_a_cpu_without_native_bf16_warns(tiny_dirs, tmp_path, monkeypatch):
    base, _ = tiny_dirs
    from accelerate.state import AcceleratorState

    import genadapter.train.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    AcceleratorState._reset_state(reset_partial_state=True)  # one mixed-precision setting per process
    try:
        with pytest.warns(UserWarning, match="without native bf16"):
            train(tiny_train_config(base, tmp_path / "bf16", bf16=True, steps=1))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_generator_overrides_continue_a_generator_at_another_rank_and_shift(tiny_dirs, tmp_path):
    base, gen = tiny_dirs
    overrides = {"rank": 3, "value_shift": 1}
    config = tiny_train_config(base, tmp_path / "out", init_generator=str(gen), generator_overrides=overrides)
    ga = build_adapter(config, torch.device("cpu"))
    assert ga.config.rank == 3 and ga.generator.export_rank() == 3 and ga.config.value_shift == 1
    normalized = ga.generator.normalize(ga.absorb(TEXT_A, progress=False).sums)
    assert all(int(torch.linalg.matrix_rank(s)) == 3 for s in normalized.values())
    with pytest.raises(GenAdapterError, match="exceeds"):
        bad = tiny_train_config(base, tmp_path / "o", init_generator=str(gen), generator_overrides={"rank": 99})
        build_adapter(bad, "cpu")
    with pytest.raises(GenAdapterError, match="must be of type int"):
        tiny_train_config(base, tmp_path / "o", init_generator=str(gen), generator_overrides={"rank": "3"})
    with pytest.raises(GenAdapterError, match="may change only"):
        tiny_train_config(base, tmp_path / "o", init_generator=str(gen), generator_overrides={"key_dim": 8})
    with pytest.raises(GenAdapterError, match="init_generator"):
        tiny_train_config(base, tmp_path / "o", generator_overrides={"rank": 3})


def test_base_dtype_loads_the_frozen_lm_in_bf16_and_keeps_the_generator_fp32(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    config = tiny_train_config(base, tmp_path / "bf16", steps=2, base_dtype="bfloat16")
    ga = build_adapter(config, torch.device("cpu"))
    assert ga.model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in ga.generator.parameters())
    final = train(config)
    log = [json.loads(line) for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(map(math.isfinite, losses)) and (final / "generator.safetensors").is_file()
    with pytest.raises(GenAdapterError, match="base_dtype"):
        build_adapter(tiny_train_config(base, tmp_path / "x", base_dtype="float8"), torch.device("cpu"))


def test_finalize_rebuilds_a_run_that_continued_a_generator_with_overrides(tiny_dirs, tmp_path):
    """finalize builds the generator from the checkpoint alone: overrides are already in its config."""
    from genadapter.train.loop import finalize_checkpoint

    base, gen = tiny_dirs
    config = tiny_train_config(
        base, tmp_path / "run", steps=2, init_generator=str(gen), generator_overrides={"rank": 3}
    )
    train(config)
    finalize_checkpoint(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "generator" / "generator_config.json").read_text())
    assert saved["rank"] == 3
    assert json.loads((tmp_path / "run" / "generator" / "heldout_metrics.json").read_text())["step"] == 2


def test_finalize_writes_the_weights_before_the_held_out_scoring(tiny_dirs, tmp_path, monkeypatch):
    """A run stopped while its final held-out scoring runs keeps its generator, without the metrics file that marks a
    finished one (the ablation re-runs such a variant, the scaling curve skips such a milestone)."""
    base, gen = tiny_dirs
    config = tiny_train_config(base, tmp_path / "run", steps=2, init_generator=str(gen))

    def stopped(self, ga):
        raise KeyboardInterrupt

    monkeypatch.setattr(HeldOut, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    out = tmp_path / "run" / "generator"
    assert (out / "generator.safetensors").is_file() and (out / "train_config.json").is_file()
    assert not (out / "heldout_metrics.json").exists()
    GenerativeAdapter.from_pretrained(base=str(base), generator=out)  # a complete generator directory


def test_training_with_a_memory_background_calibrates_it_once_on_training_text(tiny_dirs, tmp_path, monkeypatch):
    """A run that switches memory_background on measures Σ before its first step (on the training split, the same
    Σ calibrate_memory gives there) and ships it with the weights; it does not fail for want of a calibration, and a
    resumed run takes Σ from its checkpoint instead of measuring it again."""
    base, gen = tiny_dirs
    overrides = {**MEMORY, "memory_background": 3.0}
    config = tiny_train_config(
        base, tmp_path / "bg", steps=2, init_generator=str(gen), generator_overrides=overrides, calibration_tokens=40
    )
    trained = GenerativeAdapter.from_pretrained(base=str(base), generator=train(config))
    reference = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=overrides)
    assert reference.calibrate_memory(pretrain_documents(config.heldout_docs, config.max_documents), 40) == 40
    memory = trained.generator.memory
    assert memory.calibrated and trained.config.memory_background == 3.0
    for name in memory.module_names:
        torch.testing.assert_close(memory.background(name), reference.generator.memory.background(name))
    monkeypatch.setattr(GenerativeAdapter, "calibrate_memory", lambda *a, **k: pytest.fail("calibrated on resume"))
    resumed = GenerativeAdapter.from_pretrained(base=str(base), generator=train(config))
    for name in memory.module_names:
        torch.testing.assert_close(resumed.generator.memory.background(name), memory.background(name))
    with pytest.raises(GenAdapterError, match="calibration_tokens"):
        tiny_train_config(base, tmp_path / "o", calibration_tokens=0)


def test_cli_train_with_config_and_overrides(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from genadapter.cli import app

    base, _ = tiny_dirs
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(tiny_train_config(base, tmp_path / "cli").to_dict()))
    # a fresh generator of the ridge write: one generator field set, the others as in the file; it trains
    ridge = ["--set", "steps=2", "--set", "generator.normalization=ridge"]
    result = CliRunner().invoke(app, ["train", "pretrain", "--config", str(config_file), *ridge])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cli" / "generator" / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["recipe"] == "pretrain"
    fresh = tiny_train_config(base, tmp_path).generator.to_dict()
    assert saved["generator"] == {**fresh, "normalization": "ridge", "base_model": str(base)}  # the base it ran on
    written = json.loads((tmp_path / "cli" / "generator" / "generator_config.json").read_text())
    assert written["normalization"] == "ridge"

    for pair, message in (("nope=1", "unknown training config keys"), ("generator.nope=1", "unknown generator")):
        bad = CliRunner().invoke(app, ["train", "pretrain", "--config", str(config_file), "--set", pair])
        assert bad.exit_code == 1 and bad.stderr.startswith(f"error: {message}")


def test_ddp_smoke_with_two_cpu_processes(tiny_dirs, tmp_path):
    """`accelerate launch` with 2 CPU processes trains and writes one generator (gradients synced by DDP)."""
    base, _ = tiny_dirs
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(tiny_train_config(base, tmp_path / "ddp", steps=2).to_dict()))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "genadapter.cli",
            "train",
            "pretrain",
            "--config",
            str(config_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ddp" / "generator" / "generator.safetensors").is_file()


def test_ablation_runs_variants_writes_a_table_and_skips_finished_runs(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from genadapter.cli import app

    base, gen = tiny_dirs
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(tiny_train_config(base, tmp_path / "unused").to_dict()))
    variants = ["Frobenius normalisation", "context distillation"]
    args = ["train", "ablate", "--config", str(config_file), "--out", str(tmp_path / "abl"), "--design-steps", "2"]
    args += ["--objective-steps", "2", "--init-generator", str(gen), "--set", "max_context_tokens=48"]
    result = CliRunner().invoke(app, args + [arg for v in variants for arg in ("--variant", v)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == variants and [r["group"] for r in rows] == ["design", "objective"]
    frobenius = json.loads((tmp_path / "abl" / "Frobenius_normalisation" / "train_config.json").read_text())
    assert frobenius["generator"]["normalization"] == "frobenius" and frobenius["recipe"] == "pretrain"
    distill = json.loads((tmp_path / "abl" / "context_distillation" / "train_config.json").read_text())
    assert distill["objective"] == "distill" and distill["pretrain_every"] == 0
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("\n") == 2 + len(variants) and "qa_nll gain vs other context" in table

    metrics_file = tmp_path / "abl" / "context_distillation" / "generator" / "heldout_metrics.json"
    stamp = metrics_file.stat().st_mtime_ns
    again = CliRunner().invoke(app, args + ["--variant", "context distillation"])
    assert again.exit_code == 0 and metrics_file.stat().st_mtime_ns == stamp

    unknown = CliRunner().invoke(app, args + ["--variant", "nope"])
    assert unknown.exit_code == 1 and "unknown variant" in unknown.stderr


def test_cli_heldout_scores_a_generator_directory(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from genadapter.cli import app

    _, gen = tiny_dirs
    config = tiny_train_config("unused", tmp_path / "x")
    (gen / "train_config.json").write_text(json.dumps({**config.to_dict(), "base": None}))
    result = CliRunner().invoke(app, ["train", "heldout", str(gen)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["completion_adapter"] > 0 and "qa_nll_other_context" in metrics

    bad = CliRunner().invoke(app, ["train", "heldout", str(gen), "--generator-set", "key_dim=4"])
    assert bad.exit_code == 1 and "overrides may change only" in bad.stderr

    missing = CliRunner().invoke(app, ["train", "heldout", str(tmp_path)])
    assert missing.exit_code == 1 and "not a generator directory" in missing.stderr


def test_heldout_scores_the_directorys_generator_not_the_runs_overrides(tiny_dirs, tmp_path, monkeypatch):
    """A generator directory's config says what it is (the shipped memory strength was changed after training);
    the run's generator_overrides in its train_config.json must not be applied on top of it again."""
    from genadapter.train import loop

    _, gen = tiny_dirs
    config = tiny_train_config("unused", tmp_path / "x")
    saved = {**config.to_dict(), "base": None, "generator_overrides": {"memory_layers": 1}}
    (gen / "train_config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(loop.HeldOut, "evaluate", lambda self, ga: {"memory_layers": ga.config.memory_layers})
    assert loop.evaluate_generator(gen) == {"memory_layers": 0}
    assert loop.evaluate_generator(gen, overrides={"memory_layers": 1}) == {"memory_layers": 1}  # asked for: applied


def test_more_fact_f1_items_extend_the_default_draw():
    ga = make_adapter()
    config = tiny_train_config("unused", "unused", heldout_docs=20)
    default, longer = HeldOut(ga, config), HeldOut(ga, config, fact_f1_items=40)
    assert [len(items) for items in longer.fact_f1] == [40, 40]
    assert longer.questions["facts"] == default.questions["facts"]  # the NLL set does not move
    assert [items[:16] for items in longer.fact_f1] == list(default.fact_f1)
    assert [items[:16] for items in longer.open_fact_f1] == list(default.open_fact_f1)
    training_values = OpenValues.from_leads(split_wiki(20)[0], heldout=False)
    for ex in default.questions["facts_open"]:  # every answer holds a value training never draws
        assert not training_values.holds_value(ex.answer)
    with pytest.raises(GenAdapterError, match="at least 1"):
        HeldOut(ga, config, fact_f1_items=0)


@pytest.mark.parametrize("through_normaliser", [False, True])
def test_readout_oracle_fits_free_states(through_normaliser):
    from genadapter.train.oracle import heldout_fact_oracle

    torch.manual_seed(0)
    ga = make_adapter()
    results = heldout_fact_oracle(ga, 4, steps=15, lr=5e-2, through_normaliser=through_normaliser)
    assert len(results) == 2 and all(len(r["answers"]) == 2 for r in results)  # 2 questions per context
    for r in results:
        assert r["nll_fitted"] < r["nll_written"], r
    assert not any(p.requires_grad for p in ga.generator.parameters())
    with pytest.raises(ValueError, match="at least 1"):
        heldout_fact_oracle(ga, 2, steps=0)


def test_cli_oracle_prints_per_context_results(tiny_dirs):
    from typer.testing import CliRunner

    from genadapter.cli import app

    base, gen = tiny_dirs
    args = ["train", "oracle", str(gen), "--base", str(base), "--questions", "2", "--steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (only,) = json.loads(result.stdout)
    assert set(only) == {"answers", "nll_written", "nll_fitted"}
    bad = CliRunner().invoke(app, [*args[:-1], "0"])
    assert bad.exit_code == 1 and "at least 1" in bad.stderr
