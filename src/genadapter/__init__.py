"""genadapter: Generative Adapter (Chen et al., ICLR 2025) — contexts into LoRA adapters in one forward pass."""

from . import formats
from .adapter import GenerativeAdapter
from .config import GeneratorConfig
from .errors import GenAdapterError, IncompatibleStateError, ModelLoadError, StateFileError
from .generator import AdapterGenerator
from .state import ContextState

__version__ = "0.1.0"
__all__ = [
    "AdapterGenerator",
    "ContextState",
    "GenAdapterError",
    "GenerativeAdapter",
    "GeneratorConfig",
    "IncompatibleStateError",
    "ModelLoadError",
    "StateFileError",
    "formats",
]
