"""`genadapter train …`: run recipes, finalize and score generators, calibrate the memory, probe, ablate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..base_model import EMBEDDED_MODEL
from ..data import HELDOUT_WIKI_LEADS
from ..errors import GenAdapterError
from .common import BaseOption, GeneratorSetOpt, load_adapter, pairs_option, parse_pairs, read_context

train_app = typer.Typer(help="Train a generator: `pretrain` (reconstruction + completion) or `instruct`.")
ConfigOption = Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TrainConfig JSON file.")]
SetOption = pairs_option(
    "--set",
    "Override a config field (VALUE parsed as JSON if it can be); generator.FIELD sets one field of a fresh "
    "generator's config.",
)


def parse_overrides(pairs: list[str] | None) -> dict:
    return parse_pairs(pairs, "--set")


def _train_config(config: Path | None, values: dict):
    from ..train import TrainConfig

    try:
        return TrainConfig.load(config, values) if config else TrainConfig.from_dict({}, values)
    except TypeError as exc:
        raise GenAdapterError(f"bad training config: {exc}") from exc


def _run_recipe(recipe: str, config: Path | None, overrides: list[str] | None) -> None:
    from ..train.loop import train

    final = train(_train_config(config, {**parse_overrides(overrides), "recipe": recipe}))
    typer.echo(f"wrote generator to {final}", err=True)


@train_app.command("pretrain")
def train_pretrain(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Self-supervised pretraining on Wikipedia leads + MetaICL training text (resumes from output_dir)."""
    _run_recipe("pretrain", config, set_)


@train_app.command("instruct")
def train_instruct(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Instruction tuning on (context, prompt, answer) examples, mixed with pretraining batches."""
    _run_recipe("instruct", config, set_)


@train_app.command("finalize")
def train_finalize(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="output_dir of a run with a checkpoint.pt.")],
) -> None:
    """Write RUN_DIR/generator from the latest checkpoint (e.g. of a run stopped early) and evaluate it."""
    import json

    from ..train.loop import finalize_checkpoint

    typer.echo(json.dumps(finalize_checkpoint(run_dir), indent=2))


@train_app.command("heldout")
def train_heldout(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator directory.")],
    fact_f1: Annotated[
        int, typer.Option(min=1, help="Invented-entity questions answered greedily for the fact F1 (≈1 s each).")
    ] = 16,
    generator_set: GeneratorSetOpt = None,
) -> None:
    """Score a generator on the fixed held-out set: losses with its adapter, another context's, and none."""
    import json

    from ..train.loop import evaluate_generator

    if not (generator / "generator_config.json").is_file():
        raise GenAdapterError(f"{generator} is not a generator directory (no generator_config.json)")
    overrides = parse_pairs(generator_set, "--generator-set")
    typer.echo(json.dumps(evaluate_generator(generator, fact_f1, overrides), indent=2))


@train_app.command("curve")
def train_curve(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="output_dir of a run with milestone_tokens.")],
    metric: Annotated[
        list[str],
        typer.Option(
            help="A milestone metric to plot (repeatable): a held-out one (facts_open_f1_adapter) or "
            "SUBFOLDER/METHOD/METRIC of an evaluation written into each milestone (tweetqa/genadapter/f1)."
        ),
    ],
    target: Annotated[
        float | None,
        typer.Option(
            help="A value of the first metric to reach (e.g. prompting's F1): when, by the trend? Stated from 3 "
            "milestones on, with its range when any one is left out."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Where curve.json/md/png go (default RUN_DIR).")
    ] = None,
) -> None:
    """Plot milestone metrics against training tokens, fit metric = a + b log10(tokens), and extrapolate to --target."""
    from ..train.curve import write_curve

    write_curve(run_dir, metric, target, out)
    typer.echo(((out or run_dir) / "curve.md").read_text())


@train_app.command("calibrate")
def train_calibrate(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator with the next-token memory.")],
    out: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Where to write the calibrated generator.")],
    background: Annotated[float, typer.Option(help="memory_background (beta, > 0) of the written generator.")] = 64.0,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens of text Σ is measured on.")] = 16384,
    text: Annotated[
        list[Path] | None,
        typer.Option(metavar="FILE", help="Text files to measure on (default: the pretraining text's training split)."),
    ] = None,
    heldout_docs: Annotated[
        int, typer.Option(help="Wikipedia leads held out of the default text.")
    ] = HELDOUT_WIKI_LEADS,
    memory_scale: Annotated[
        float | None, typer.Option(help="memory_scale (eta) of the written generator (default: GENERATOR_DIR's).")
    ] = None,
    generator_set: GeneratorSetOpt = None,
    half: Annotated[bool, typer.Option(help="Save the weights in float16 (as the shipped generator).")] = False,
    base: BaseOption = EMBEDDED_MODEL,
) -> None:
    """Write GENERATOR_DIR's generator with the memory's background term on: Σ measured on ordinary text, beta set.
    With --generator-set memory_keys=K, a memory of another width, with its own Σ."""
    from ..train.calibrate import calibrate_generator

    texts = {str(path): read_context(str(path)) for path in text} if text else None
    overrides = parse_pairs(generator_set, "--generator-set")
    if memory_scale is not None:
        overrides["memory_scale"] = memory_scale
    measured, fingerprint = calibrate_generator(
        generator, out, background, tokens, texts, heldout_docs, half, base, overrides
    )
    typer.echo(f"measured Σ on {measured} tokens; wrote {out} (generator {fingerprint})")


@train_app.command("oracle")
def train_oracle(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator directory.")],
    questions: Annotated[int, typer.Option(help="Held-out fact questions (2 per context).")] = 8,
    steps: Annotated[int, typer.Option(help="Adam steps on each free state.")] = 25,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-2,
    through_normaliser: Annotated[
        bool, typer.Option(help="Fit the raw sum S and pass it through the normalisation, instead of S~ itself.")
    ] = False,
    base: BaseOption = EMBEDDED_MODEL,
) -> None:
    """Fit free adapter states to held-out fact questions (generator frozen): can its readout carry facts?"""
    import json

    from ..train.oracle import heldout_fact_oracle

    ga = load_adapter(base, generator)
    try:
        results = heldout_fact_oracle(ga, questions, steps=steps, lr=lr, through_normaliser=through_normaliser)
    except ValueError as exc:
        raise GenAdapterError(str(exc)) from exc
    typer.echo(json.dumps(results, indent=2))


@train_app.command("ablate")
def train_ablate(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="One folder per variant + ablation.md/json.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    design_steps: Annotated[int, typer.Option(help="Steps of each from-scratch pretraining variant.")] = 50,
    objective_steps: Annotated[int, typer.Option(help="Steps of each instruction-objective variant.")] = 30,
    init_generator: Annotated[
        str | None, typer.Option(metavar="DIR", help="Generator the objective variants continue from.")
    ] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Run only these variants (repeatable).")] = None,
) -> None:
    """Equal-budget runs that change one design choice each; writes a table of held-out gains (resumable)."""
    from ..train.ablation import run_ablation

    base = _train_config(config, parse_overrides(set_))
    try:
        run_ablation(base, out, design_steps, objective_steps, init_generator, variant)
    except ValueError as exc:
        raise GenAdapterError(str(exc)) from exc
    typer.echo((out / "ablation.md").read_text())
