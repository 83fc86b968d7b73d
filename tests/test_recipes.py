"""The training configs under configs/: every file loads, the release-8 chain starts each step where the one before
ended, and nothing starts from the installed package's generator (which holds whatever release is current)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from genadapter.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES, EXPERIMENTS, CHAIN = CONFIGS / "recipes", CONFIGS / "experiments", CONFIGS / "recipes" / "release8"
ALL = sorted(CONFIGS.rglob("*.json"))

# each chain step and the train_config.json its stage wrote next to its weights (archived)
RECORDED = {
    "01-stage1-instruct.json": "release5-stage1.json",
    "02-stage2.json": "release5-stage2.json",
    "03-stage3-facts.json": "release5-stage3.json",
    "04-stage4-fp32.json": "release5-stage4.json",
    "05-stage5-release5.json": "release5-stage5.json",
    "06-stage18-memory.json": "release6-stage18.json",
    "07-stage19-copy.json": "release6-stage19.json",
    "08-stage20-error-release6.json": "release6-stage20.json",
    "09-stage21-long.json": "release7-stage21.json",
    "10-stage23-release8.json": "release8-stage23.json",
}


def name(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


def chain_commands() -> list[tuple[str, ...]]:
    """The rebuild sequence in configs/recipes/README.md: ("config", FILE) and ("calibrate", IN, OUT), in order."""
    text = (RECIPES / "README.md").read_text()
    section = text.split("## Rebuilding release 8", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    steps: list[tuple[str, ...]] = []
    for line in block.splitlines():
        if match := re.match(r"genadapter train instruct --config (\S+)$", line.strip()):
            steps.append(("config", match.group(1)))
        elif match := re.match(r"genadapter train calibrate (\S+) (\S+)", line.strip()):
            steps.append(("calibrate", match.group(1), match.group(2)))
    return steps


def produced_by_calibration() -> dict[str, str]:
    return {step[2]: step[1] for step in chain_commands() if step[0] == "calibrate"}


def test_the_config_tree_is_there():
    assert ALL and not list(CONFIGS.glob("*.json")), "configs belong in configs/recipes/ or configs/experiments/"
    assert sorted(p.name for p in CHAIN.glob("*.json")) == sorted(RECORDED)
    assert {name(p) for p in ALL} == {name(p) for p in [*RECIPES.rglob("*.json"), *EXPERIMENTS.glob("*.json")]}


@pytest.mark.parametrize("path", ALL, ids=name)
def test_config_loads_and_never_starts_from_the_package(path):
    config = TrainConfig.load(path)  # what `genadapter train pretrain|instruct|ablate --config` reads
    assert "genadapter/assets" not in path.read_text()
    init = config.init_generator
    assert init is None or (init.startswith("runs/") and not Path(init).is_absolute()), init


def test_every_run_starts_from_one_that_a_config_or_the_calibration_writes():
    """Re-runnable: every init_generator is the output of another config in configs/, or runs/release7."""
    outputs = {TrainConfig.load(p).output_dir + "/generator" for p in ALL} | set(produced_by_calibration())
    for path in ALL:
        init = TrainConfig.load(path).init_generator
        assert init is None or init in outputs, f"{name(path)}: nothing here writes {init}"


def test_release8_chain_starts_each_step_where_the_one_before_ended():
    steps = chain_commands()
    files = [step[1] for step in steps if step[0] == "config"]
    assert files == [f"configs/recipes/release8/{file}" for file in sorted(RECORDED)]
    available: set[str] = set()
    for index, step in enumerate(steps):
        if step[0] == "calibrate":
            assert step[1] in available, step
            available.add(step[2])
            continue
        config = TrainConfig.load(CONFIGS.parent / step[1])
        if index == 0:
            assert config.init_generator is None, "the chain starts from a fresh generator"
        else:
            assert config.init_generator in available, f"{step[1]} starts from {config.init_generator}"
        available.add(config.output_dir + "/generator")
    last = TrainConfig.load(CONFIGS.parent / files[-1])
    assert last.output_dir + "/generator" in (RECIPES / "README.md").read_text()


@pytest.mark.parametrize("step", sorted(RECORDED))
def test_chain_step_is_the_recorded_config(step):
    """Each step is what its stage ran: the same TrainConfig as the train_config.json it wrote, but where it starts."""
    recipe = TrainConfig.load(CHAIN / step).to_dict()
    recorded = TrainConfig.load(EXPERIMENTS / RECORDED[step]).to_dict()
    assert recipe["init_generator"] == recorded["init_generator"]  # both rewritten to the same runs/… directory
    if recipe["init_generator"]:  # a continued run takes its shape from init_generator, not from `generator`
        recipe.pop("generator"), recorded.pop("generator")
    assert recipe == recorded


def test_non_chain_recipes_start_from_scratch_or_from_a_chain_step():
    chain_outputs = {TrainConfig.load(p).output_dir + "/generator" for p in CHAIN.glob("*.json")}
    for path in RECIPES.glob("*.json"):
        init = TrainConfig.load(path).init_generator
        assert init is None or init in chain_outputs, f"{name(path)} starts from {init}"


@pytest.mark.parametrize("folder", [RECIPES, EXPERIMENTS], ids=lambda p: p.name)
def test_readme_documents_every_file(folder):
    readme = (folder / "README.md").read_text()
    for path in folder.rglob("*.json"):
        assert path.relative_to(folder).as_posix() in readme, f"{folder.name}/README.md does not mention {path.name}"


def test_configs_are_plain_json_objects():
    for path in ALL:
        assert isinstance(json.loads(path.read_text()), dict), name(path)
