"""The results page is checked against its run files, the docs' relative links resolve, and the training guide
lists every config field.

docs/results.md copies every table from a results file of a run under docs/experiments/results/. The line before
each table (blank lines aside) names that file as a markdown link and gives the command that produced it; the
table's lines must appear in that file byte for byte and in the same order (rows may be left out, none changed).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PAGE = ROOT / "docs" / "results.md"
MODEL_CARD = ROOT / "src" / "genadapter" / "assets" / "smollm2-135m-instruct" / "MODEL_CARD.md"
LINKED_DOCS = [
    ROOT / "README.md",
    MODEL_CARD,
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "experiments").glob("*.md")),
    *sorted((ROOT / "configs").glob("*/README.md")),
]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SOURCE = re.compile(r"^Source: \[[^\]]*\]\(([^)\s]+)\); command: `(genadapter [^`]+)`$")


def tables(text: str) -> list[tuple[int, list[str], str | None]]:
    """Each markdown table as (line number, its lines, the nearest non-blank line before it or None)."""
    lines = text.split("\n")
    found = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), None)
            found.append((start + 1, lines[start:i], before))
        else:
            i += 1
    return found


def table_problems(text: str, base: Path) -> list[str]:
    """What is wrong with the tables of a page whose links are relative to `base`; empty if nothing."""
    problems = []
    for lineno, rows, before in tables(text):
        match = SOURCE.match(before or "")
        if match is None:
            problems.append(f"line {lineno}: table not preceded by 'Source: [..](FILE); command: `genadapter ..`'")
            continue
        source = base / match.group(1)
        if not source.is_file():
            problems.append(f"line {lineno}: source {match.group(1)} does not exist")
            continue
        source_lines = source.read_text().split("\n")
        at = 0
        for offset, row in enumerate(rows):
            try:
                at = source_lines.index(row, at) + 1
            except ValueError:
                problems.append(f"line {lineno + offset}: not in {match.group(1)} (in this order): {row}")
                break
    return problems


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file that do not resolve to an existing file or folder."""
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # external (http:, https:, mailto:) or an anchor on the same page
        local = target.split("#", 1)[0]
        if not (path.parent / local).exists():
            broken.append(target)
    return broken


def test_results_page_tables_match_their_run_files():
    text = RESULTS_PAGE.read_text()
    assert tables(text), "docs/results.md has no tables"
    assert table_problems(text, RESULTS_PAGE.parent) == []


def test_results_page_names_release_8_and_archives_the_old_protocol():
    text = RESULTS_PAGE.read_text()
    assert "5b91070a00fd5e8a" in text
    assert "experiments/results/squad-release8-protocol2/results.md" in text
    assert "experiments/results-release8-protocol1.md" in text  # the per-method-template tables, kept


def shared_template_problems(text: str) -> list[str]:
    """Tables with a template column whose rows name more than one template (methods not compared alike)."""
    problems = []
    for lineno, lines, _ in tables(text):
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        if "template" in header:
            column = header.index("template")
            used = {row.strip("|").split("|")[column].strip() for row in lines[2:]}
            if len(used) != 1:
                problems.append(f"line {lineno}: methods under different templates {sorted(used)}")
    return problems


def test_every_results_table_compares_methods_under_one_template():
    assert shared_template_problems(RESULTS_PAGE.read_text()) == []
    mixed = "| method | f1 | template |\n|---|---|---|\n| a | 1 | qa-chat |\n| b | 2 | qa-plain |\n"
    assert shared_template_problems(mixed)  # the check can fail


FIXTURE_SOURCE = """# run
| method | f1 | em |
|---|---|---|
| closed-book | 5.7 | 0.0 |
| genadapter | 14.7 | 9.0 |
"""


def _page(*rows: str, before: str = "Source: [r](run/results.md); command: `genadapter eval knowledge`") -> str:
    return "\n".join(["# page", "", before, "", *rows, "", "text"]) + "\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.md").write_text(FIXTURE_SOURCE)
    return tmp_path


def test_parser_accepts_a_faithful_copy_and_a_subset_of_rows(run_dir: Path):
    full = _page("| method | f1 | em |", "|---|---|---|", "| closed-book | 5.7 | 0.0 |", "| genadapter | 14.7 | 9.0 |")
    subset = _page("| method | f1 | em |", "|---|---|---|", "| genadapter | 14.7 | 9.0 |")
    assert table_problems(full, run_dir) == []
    assert table_problems(subset, run_dir) == []


def test_parser_rejects_a_doctored_table(run_dir: Path):
    doctored = _page("| method | f1 | em |", "|---|---|---|", "| genadapter | 17.4 | 9.0 |")
    problems = table_problems(doctored, run_dir)
    assert len(problems) == 1 and "17.4" in problems[0]


def test_parser_rejects_reordered_rows(run_dir: Path):
    swapped = _page(
        "| method | f1 | em |", "|---|---|---|", "| genadapter | 14.7 | 9.0 |", "| closed-book | 5.7 | 0.0 |"
    )
    assert len(table_problems(swapped, run_dir)) == 1


def test_parser_rejects_a_table_without_source_or_command(run_dir: Path):
    rows = ("| method | f1 | em |", "|---|---|---|")
    assert table_problems(_page(*rows, before="Some prose."), run_dir)
    assert table_problems(_page(*rows, before="Source: [r](run/results.md)"), run_dir)
    assert table_problems(_page(*rows, before="Source: [r](run/missing.md); command: `genadapter x`"), run_dir)


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    assert path.is_file(), path
    assert broken_links(path) == []


def test_link_checker_finds_a_broken_link(tmp_path: Path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [web](https://example.org/x) [anchor](#a) [ok too](there.md#a) [gone](gone.md)\n")
    assert broken_links(page) == ["gone.md"]


def test_model_card_is_short_and_names_the_shipped_generator():
    text = MODEL_CARD.read_text()
    assert len(text.split("\n")) <= 200
    assert "5b91070a00fd5e8a" in text
    assert "docs/experiments/" in text


def test_training_guide_lists_every_config_field_with_its_default():
    from dataclasses import MISSING, fields

    from genadapter.train import TrainConfig

    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", (ROOT / "docs" / "training.md").read_text(), re.M))
    for spec in fields(TrainConfig):
        assert spec.name in rows, f"docs/training.md has no row for TrainConfig.{spec.name}"
        documented = rows[spec.name].strip().strip("`").strip('"')
        if spec.default is not MISSING and isinstance(spec.default, bool):
            assert documented == str(spec.default).lower(), spec.name
        elif spec.default is not MISSING and isinstance(spec.default, int | float):
            assert float(documented) == spec.default, spec.name
        elif spec.default is not MISSING and spec.default is not None:
            assert documented == spec.default, spec.name
