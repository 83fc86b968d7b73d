"""Evaluation harness: the paper's three scenarios and a storage test (docs/evaluation.md).

Each scenario compares closed-book, prompting (context in the prompt), sft (a LoRA fine-tuned on the
context at test time) and genadapter (the generated adapter), with costs, and writes JSON, a markdown
table and PNG plots. Runs resume: re-running with the same --out skips finished work.

The Python entry points are `run_knowledge`, `run_icl`, `run_persona` and `run_storage` with their config
dataclasses; the
command line (`genadapter eval …`) is `genadapter.cli.eval`.
"""

from __future__ import annotations


def __getattr__(name: str):
    """Lazy access to the Python entry points without importing torch for `--help`."""
    lazy = {
        "run_knowledge": ("knowledge", "run_knowledge"),
        "KnowledgeConfig": ("knowledge", "KnowledgeConfig"),
        "run_icl": ("icl", "run_icl"),
        "ICLConfig": ("icl", "ICLConfig"),
        "run_persona": ("persona", "run_persona"),
        "PersonaConfig": ("persona", "PersonaConfig"),
        "run_storage": ("storage", "run_storage"),
        "StorageConfig": ("storage", "StorageConfig"),
        "SFTConfig": ("methods", "SFTConfig"),
        "compare_runs": ("compare", "compare_runs"),
        "paired_bootstrap": ("compare", "paired_bootstrap"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(name)


__all__ = [
    "run_knowledge",
    "run_icl",
    "run_persona",
    "run_storage",
    "KnowledgeConfig",
    "ICLConfig",
    "PersonaConfig",
    "StorageConfig",
]
