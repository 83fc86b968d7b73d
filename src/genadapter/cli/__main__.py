"""`python -m genadapter.cli` (e.g. under `accelerate launch`)."""

from . import app

app()
