"""`genadapter eval knowledge | icl | persona | storage | compare`: the paper's three scenarios, a storage test
and paired comparisons.

The heavy imports (torch, the models) happen inside the commands, so `--help` stays fast. The Python entry points
are in `genadapter.eval` (`run_knowledge`, `run_icl`, `run_persona`, `run_storage` and their config dataclasses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import GenAdapterError
from .common import GeneratorSetOpt, pairs_option, parse_pairs

eval_app = typer.Typer(
    help="Evaluate closed-book, prompting, sft and genadapter: knowledge QA, in-context learning, persona.",
    no_args_is_help=True,
)

# ---- options shared by the three commands --------------------------------------------------------

DataOpt = Annotated[
    Path | None,
    typer.Option("--data", metavar="FILE", help="Input data (default: the scenario's file in ../shared/data)."),
]
MethodsOpt = Annotated[
    str,
    typer.Option(
        "--methods",
        help="Comma-separated subset of closed-book,prompting,sft,genadapter, plus genadapter-unrelated (the "
        "unrelated-text control) and genadapter-half (the state stored at half precision).",
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", metavar="N", min=0, help="Test-set size (scenario default if unset; 0 = everything)."),
]
SkipOpt = Annotated[
    int,
    typer.Option(
        "--skip",
        metavar="N",
        min=0,
        help="Leave out the first N test items of the seeded order and every question on their contexts: a sample "
        "disjoint from an earlier run's --limit N, to confirm a finding on data not yet looked at.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the test-item sampling (the dev split is fixed).")]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", metavar="FILE", help="Where to write the JSON results (default OUT/results.json)."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", metavar="DIR", help="Output directory; re-running into it resumes (default out/eval/<scenario>)."
    ),
]
BaseOpt = Annotated[
    str | None, typer.Option("--base", metavar="TEXT", help="Base model (default: the embedded SmolLM2).")
]
GeneratorOpt = Annotated[
    Path | None, typer.Option("--generator", metavar="DIR", help="Generator directory (default: the shipped one).")
]
DevOpt = Annotated[
    int | None, typer.Option("--dev", metavar="N", min=0, help="Dev items for template selection (0: no selection).")
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template",
        metavar="NAME[,NAME]",
        help="Fix the template(s) every method is compared under, instead of picking on the pooled dev split.",
    ),
]
AllTemplatesOpt = Annotated[
    bool,
    typer.Option(
        "--all-templates", help="Also answer the test items under every candidate template (a sensitivity table)."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass / contexts per block.")]
WindowOpt = Annotated[
    int | None, typer.Option("--window", min=16, help="Prompt window in tokens (default: the model's maximum).")
]
SftOpt = pairs_option("--sft", "SFT baseline setting, e.g. --sft epochs=5 --sft lr=5e-4.")
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 …")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
PrefixOpt = Annotated[
    bool, typer.Option("--prefix-cache/--no-prefix-cache", help="Compute a prompt prefix shared by rows once.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="torch CPU threads (on a busy machine 1 avoids stalls; default: torch's)."),
]
PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib).")]


def _ints(spec: str | None, name: str) -> list[int]:
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise GenAdapterError(f"{name} expects comma-separated integers, got {spec!r}") from exc


def _common(**kw) -> dict:
    from ..eval.methods import SFTConfig, parse_methods

    kw["methods"] = parse_methods(kw["methods"])
    kw["sft"] = SFTConfig.from_dict(parse_pairs(kw.pop("sft"), "--sft"))
    kw["generator_overrides"] = parse_pairs(kw.pop("generator_set"), "--generator-set")
    return kw


def _report(result: dict, out: Path | None, json_path: Path | None, scenario: str) -> None:
    out = out or Path("out/eval") / scenario
    for method, values in result["metrics"].items():
        shown = ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items() if v is not None
        )
        typer.echo(f"{method}: {shown}")
    typer.echo(
        f"wrote {json_path or out / 'results.json'}, {out / 'results.md'} and {len(result['plots'])} plots", err=True
    )


ALL = "closed-book,prompting,sft,genadapter"


@eval_app.command("knowledge")
def knowledge_command(
    data: DataOpt = None,
    methods: MethodsOpt = ALL,
    limit: LimitOpt = None,
    skip: SkipOpt = 0,
    seed: SeedOpt = 0,
    json: JsonOpt = None,
    out: OutOpt = None,
    base: BaseOpt = None,
    generator: GeneratorOpt = None,
    generator_set: GeneratorSetOpt = None,
    group_tokens: Annotated[
        str | None,
        typer.Option(
            "--group-tokens", metavar="N,N…", help="Pack short contexts (e.g. tweets) into contexts of ≈N tokens."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 20,
    dev: DevOpt = None,
    template: TemplateOpt = None,
    all_templates: AllTemplatesOpt = False,
    batch_size: BatchOpt = 8,
    window: WindowOpt = None,
    sft: SftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    prefix_cache: PrefixOpt = True,
    plots: PlotsOpt = True,
    threads: ThreadsOpt = None,
) -> None:
    """Knowledge from documents: QA F1/EM by context length (SQuAD sample; TweetQA as a news stream)."""
    from ..eval.knowledge import KnowledgeConfig, run_knowledge

    config = KnowledgeConfig(
        **_common(
            data=data, methods=methods, limit=limit, skip=skip, seed=seed, json=json, out=out, base=base,
            generator=generator, generator_set=generator_set,
            dev=dev, template=template, all_templates=all_templates, batch_size=batch_size, window=window, sft=sft,
            device=device, dtype=dtype,
            share_prefix=prefix_cache, plots=plots, threads=threads,
        ),
        group_tokens=_ints(group_tokens, "--group-tokens"),
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    _report(run_knowledge(config), out, json, "knowledge")


@eval_app.command("icl")
def icl_command(
    data: DataOpt = None,
    methods: MethodsOpt = ALL,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    json: JsonOpt = None,
    out: OutOpt = None,
    base: BaseOpt = None,
    generator: GeneratorOpt = None,
    generator_set: GeneratorSetOpt = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated task names, or 'all' (default: a fixed subset of 8).")
    ] = None,
    shots: Annotated[str, typer.Option("--shots", metavar="K,K…", help="Numbers of demonstrations.")] = "0,4,16",
    seeds: Annotated[
        str, typer.Option("--seeds", metavar="S,S…", help="Demonstration sets (MetaICL seeds).")
    ] = "13,21,42,87,100",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="For tasks without options.")] = 20,
    dev: DevOpt = None,
    template: TemplateOpt = None,
    all_templates: AllTemplatesOpt = False,
    batch_size: BatchOpt = 8,
    window: WindowOpt = None,
    sft: SftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    prefix_cache: PrefixOpt = True,
    plots: PlotsOpt = True,
    threads: ThreadsOpt = None,
) -> None:
    """Learning from demonstrations: MetaICL held-out tasks, accuracy by number of shots k."""
    from ..eval.icl import ICLConfig, run_icl

    config = ICLConfig(
        **_common(
            data=data, methods=methods, limit=limit, seed=seed, json=json, out=out, base=base, generator=generator,
            generator_set=generator_set,
            dev=dev, template=template, all_templates=all_templates, batch_size=batch_size, window=window, sft=sft,
            device=device, dtype=dtype,
            share_prefix=prefix_cache, plots=plots, threads=threads,
        ),
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        shots=_ints(shots, "--shots"),
        seeds=_ints(seeds, "--seeds"),
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    _report(run_icl(config), out, json, "icl")


@eval_app.command("persona")
def persona_command(
    data: DataOpt = None,
    methods: MethodsOpt = ALL,
    limit: LimitOpt = None,
    skip: SkipOpt = 0,
    seed: SeedOpt = 0,
    json: JsonOpt = None,
    out: OutOpt = None,
    base: BaseOpt = None,
    generator: GeneratorOpt = None,
    generator_set: GeneratorSetOpt = None,
    distractors: Annotated[int, typer.Option("--distractors", min=1, help="Other users' sentences per choice.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest reply.")] = 32,
    dev: DevOpt = None,
    template: TemplateOpt = None,
    all_templates: AllTemplatesOpt = False,
    batch_size: BatchOpt = 8,
    window: WindowOpt = None,
    sft: SftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    prefix_cache: PrefixOpt = True,
    plots: PlotsOpt = True,
    threads: ThreadsOpt = None,
) -> None:
    """Personalization from chat history: persona recall (multiple choice) and reply F1 (PersonaChat)."""
    from ..eval.persona import PersonaConfig, run_persona

    config = PersonaConfig(
        **_common(
            data=data, methods=methods, limit=limit, skip=skip, seed=seed, json=json, out=out, base=base,
            generator=generator, generator_set=generator_set,
            dev=dev, template=template, all_templates=all_templates, batch_size=batch_size, window=window, sft=sft,
            device=device, dtype=dtype,
            share_prefix=prefix_cache, plots=plots, threads=threads,
        ),
        distractors=distractors,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    _report(run_persona(config), out, json, "persona")


@eval_app.command("storage")
def storage_command(
    methods: MethodsOpt = "closed-book,prompting,genadapter,genadapter-unrelated",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated items.")] = 0,
    json: JsonOpt = None,
    out: OutOpt = None,
    base: BaseOpt = None,
    generator: GeneratorOpt = None,
    generator_set: GeneratorSetOpt = None,
    lengths: Annotated[
        str, typer.Option("--lengths", metavar="N,N…", help="Context lengths in tokens, facts included.")
    ] = "64,256,1024,4096",
    facts: Annotated[int, typer.Option("--facts", min=1, help="Invented facts per context (capacity).")] = 1,
    contexts: Annotated[int, typer.Option("--contexts", min=1, help="Test contexts per length.")] = 12,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 20,
    dev: DevOpt = None,
    template: TemplateOpt = None,
    all_templates: AllTemplatesOpt = False,
    batch_size: BatchOpt = 8,
    window: WindowOpt = None,
    sft: SftOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    prefix_cache: PrefixOpt = True,
    plots: PlotsOpt = True,
    threads: ThreadsOpt = None,
) -> None:
    """Storage: invented facts (codes, made-up names) hidden in held-out Wikipedia text, by context length."""
    from ..eval.storage import StorageConfig, run_storage

    config = StorageConfig(
        **_common(
            data=None, methods=methods, limit=0, seed=seed, json=json, out=out, base=base, generator=generator,
            generator_set=generator_set,
            dev=dev, template=template, all_templates=all_templates, batch_size=batch_size, window=window, sft=sft,
            device=device, dtype=dtype,
            share_prefix=prefix_cache, plots=plots, threads=threads,
        ),
        max_new_tokens=max_new_tokens,
        lengths=_ints(lengths, "--lengths"),
        facts=facts,
        contexts=contexts,
    )  # fmt: skip
    _report(run_storage(config), out, json, "storage")


@eval_app.command("compare")
def compare_command(
    run_a: Annotated[Path, typer.Argument(metavar="RUN_A", help="--out directory of the first run (the reference).")],
    run_b: Annotated[Path, typer.Argument(metavar="RUN_B", help="--out directory of the second run.")],
    method: Annotated[str, typer.Option("--method", help="Method to compare (in both runs).")] = "genadapter",
    method_b: Annotated[
        str | None, typer.Option("--method-b", help="Another method for run B, e.g. prompting vs genadapter.")
    ] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", help="Per-item metric (default: f1, accuracy or recall_acc, as present).")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="KEY=VALUE", help="Keep items whose record has this value, e.g. --only k=16."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", metavar="NAME", help="Template of the items to pair (default: the run's shared template)."
        ),
    ] = None,
    template_b: Annotated[
        str | None, typer.Option("--template-b", metavar="NAME", help="Another template for run B.")
    ] = None,
    across_templates: Annotated[
        bool, typer.Option("--across-templates", help="Allow pairing items answered under different templates.")
    ] = False,
    resamples: Annotated[int, typer.Option("--resamples", min=1, help="Bootstrap resamples.")] = 10_000,
    confidence: Annotated[float, typer.Option("--confidence", min=0.5, max=0.999)] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    json: JsonOpt = None,
) -> None:
    """Paired comparison of two runs item by item: mean difference B − A with a bootstrap interval."""
    from ..eval.compare import compare_runs, comparison_json
    from ..fileio import write_atomic

    method_b = method_b or method
    filters = parse_pairs(only, "--only", as_json=False)  # compared as text with the records' fields
    comparison = compare_runs(
        run_a, run_b, method, method_b, metric, filters, template, template_b, across_templates,
        resamples=resamples, confidence=confidence, seed=seed,
    )  # fmt: skip
    typer.echo(comparison.describe())
    if json is not None:
        text = comparison_json(comparison, run_a, run_b, method, method_b, filters) + "\n"
        write_atomic(json, lambda path: path.write_text(text))
        typer.echo(f"wrote {json}", err=True)
