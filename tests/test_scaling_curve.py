"""Scaling curves: a run keeps its generator at token milestones (across a resume), and `train curve` fits the trend."""

import json
import math

import pytest
from test_train import tiny_train_config

from genadapter.errors import GenAdapterError
from genadapter.train import TrainConfig
from genadapter.train.curve import fit_log_tokens, milestone_rows, write_curve
from genadapter.train.loop import TrainingError, step_tokens, tokens_through, train


def test_token_count_follows_each_steps_batch_kind():
    config = TrainConfig(recipe="instruct", batch_size=2, pretrain_every=3, num_chunks=4, max_context_tokens=100)
    pretrain = 2 * 4 * config.generator.chunk_size
    assert [step_tokens(config, s) for s in range(6)] == [200, 200, pretrain, 200, 200, pretrain]
    assert tokens_through(config, 6) == 800 + 2 * pretrain and tokens_through(config, 0) == 0


def test_milestones_keep_the_generator_once_each_and_count_tokens_across_a_resume(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    out = tmp_path / "long"
    first = tiny_train_config(base, out, steps=3)
    at_2, at_5 = tokens_through(first, 2), tokens_through(first, 5)
    train(tiny_train_config(base, out, steps=3, milestone_tokens=[at_2]))
    kept = out / "milestones" / str(at_2) / "heldout_metrics.json"
    written = kept.read_text()
    assert json.loads(written)["step"] == 2 and json.loads(written)["tokens_seen"] == at_2

    train(tiny_train_config(base, out, steps=6, milestone_tokens=[at_2, at_5]))  # resumes at step 3
    assert kept.read_text() == written  # not re-run on resume
    later = out / "milestones" / str(at_5)
    assert json.loads((later / "heldout_metrics.json").read_text())["step"] == 5
    assert (later / "generator.safetensors").is_file() and (later / "generator_config.json").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["tokens_seen"] for r in log if "loss" in r] == [tokens_through(first, s) for s in range(1, 7)]
    assert [r["milestones"] for r in log if "milestones" in r] == [[at_2], [at_5]]


def test_milestones_must_be_reachable_and_positive(tiny_dirs, tmp_path):
    base, _ = tiny_dirs
    config = tiny_train_config(base, tmp_path / "x", steps=2)
    config.milestone_tokens = [tokens_through(config, 2) + 1]
    with pytest.raises(TrainingError, match="beyond the run's"):
        train(config)
    with pytest.raises(GenAdapterError, match="positive whole numbers"):
        TrainConfig(milestone_tokens=[0])


def fake_run(tmp_path, values: dict[int, float], tweetqa: dict[int, float] | None = None):
    for tokens, value in values.items():
        directory = tmp_path / "milestones" / str(tokens)
        directory.mkdir(parents=True)
        (directory / "heldout_metrics.json").write_text(json.dumps({"facts_open_f1_adapter": value, "step": 1}))
        if tweetqa and tokens in tweetqa:
            (directory / "tweetqa").mkdir()
            result = {"metrics": {"genadapter": {"f1": tweetqa[tokens], "note": "text"}}}
            (directory / "tweetqa" / "results.json").write_text(json.dumps(result))
    return tmp_path


def test_curve_reads_evaluations_in_milestones_and_extrapolates_a_log_linear_trend(tmp_path):
    # f1 = 1 + 2 · log10(tokens): 13.4 is reached at 10^6.2 tokens
    run = fake_run(tmp_path, {10**k: 0.5 * k for k in (2, 3, 4)}, {10**k: 1 + 2 * k for k in (2, 3, 4)})
    (tmp_path / "milestones" / "200000").mkdir()  # being written: no metrics yet
    rows = milestone_rows(run)
    assert [r["tokens"] for r in rows] == [100, 1000, 10000] and rows[0]["tweetqa/genadapter/f1"] == 5
    assert "tweetqa/genadapter/note" not in rows[0]
    result = write_curve(run, ["tweetqa/genadapter/f1", "facts_open_f1_adapter"], target=13.4)
    assert result["fits"]["tweetqa/genadapter/f1"]["slope"] == pytest.approx(2.0)
    assert math.log10(result["target"]["tokens"]) == pytest.approx(6.2)
    assert [math.log10(t) for t in result["target"]["leave_one_out"]] == pytest.approx([6.2, 6.2])  # exact line
    assert (run / "curve.png").is_file() and "10,000" in (run / "curve.md").read_text()


def test_curve_says_a_falling_trend_never_reaches_and_names_what_is_available(tmp_path):
    run = fake_run(tmp_path, {100: 9.0, 1000: 5.0})
    assert fit_log_tokens(milestone_rows(run), "facts_open_f1_adapter").tokens_to_reach(10.0) is None
    assert fit_log_tokens(milestone_rows(fake_run(tmp_path / "one", {100: 1.0})), "facts_open_f1_adapter") is None
    with pytest.raises(GenAdapterError, match="available: facts_open_f1_adapter"):
        write_curve(run, ["tweetqa/genadapter/f1"])
    with pytest.raises(GenAdapterError, match="no milestones"):
        milestone_rows(tmp_path / "nowhere")


def test_cli_curve_prints_the_table_and_the_extrapolation(tmp_path):
    from typer.testing import CliRunner

    from genadapter.cli import app

    two = fake_run(tmp_path / "two", {10**k: 1 + 2 * k for k in (2, 3)})
    args = ["train", "curve", str(two), "--metric", "facts_open_f1_adapter", "--target", "9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "a trend needs at least 3" in result.stdout and "reaches it" not in result.stdout

    # 1 + 2 · log10(tokens) with the third point high: the fit reaches 9 sooner; without that point, at 10^4
    run = fake_run(tmp_path / "four", {100: 5.0, 1000: 7.0, 10**4: 12.0, 10**5: 11.0})
    args[2] = str(run)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    target = json.loads((run / "curve.json").read_text())["target"]
    low, high = target["leave_one_out"]
    assert low < target["tokens"] < high and high == pytest.approx(10**4)
    assert f"leaving one milestone out: {low:,.0f} to {high:,.0f}" in result.stdout


def test_curve_leave_one_out_says_never_when_a_point_carries_the_rise(tmp_path):
    run = fake_run(tmp_path, {100: 5.0, 1000: 5.0, 10**4: 8.0})  # without the last point, flat
    target = write_curve(run, ["facts_open_f1_adapter"], target=9.0)["target"]
    assert target["tokens"] > 10**4 and target["leave_one_out"][1] is None
    assert "to never" in (run / "curve.md").read_text()
    assert "Infinity" not in (run / "curve.json").read_text()  # strict JSON: never is null
