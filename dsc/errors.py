"""Errors dsc raises: each names the problem and how to fix it."""

from __future__ import annotations

__all__ = [
    "DscError",
    "TargetError",
    "UnsupportedOpError",
    "TraceError",
    "PlanError",
    "LimitError",
    "InputError",
]


class DscError(Exception):
    """Base class of every error dsc raises on purpose."""


class TargetError(DscError, ValueError):
    """The Target asks for something the model or the machine cannot do."""


class TraceError(DscError):
    """The model could not be traced to a graph."""


class UnsupportedOpError(DscError):
    """The graph holds an op dsc cannot run on the chosen target."""


class PlanError(DscError):
    """A saved plan is missing, corrupted, truncated or of another schema version."""


class LimitError(DscError, ValueError):
    """A request exceeds a limit the plan was compiled with (batch, sequence length, vocabulary)."""


class InputError(DscError, ValueError):
    """Inputs that cannot be run: wrong rank or dtype, an empty prompt, ids outside the vocabulary."""
