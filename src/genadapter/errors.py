"""Errors the user can act on. The CLI prints their message as one line; anything else is a bug."""


class GenAdapterError(Exception):
    """Base class of every error genadapter raises on bad input or an unusable file."""


class IncompatibleStateError(GenAdapterError):
    """Two states (or a state and a generator) come from different generators or base models."""


class StateFileError(GenAdapterError):
    """A state file is missing, truncated, corrupted, or not a genadapter state."""


class ModelLoadError(GenAdapterError):
    """A base model or generator cannot be found or loaded."""
