"""Errors raised by tl-residual.

Every error names what was wrong and what would be right. All derive from
:class:`TLResidualError` (itself a :class:`ValueError`), so callers can catch one type.
"""

from __future__ import annotations


class TLResidualError(ValueError):
    """Base class for all tl-residual errors."""


class UnsupportedArchitectureError(TLResidualError):
    """The model uses a feature the exact decomposition does not cover (e.g. parallel attention+MLP)."""


class InvalidInputError(TLResidualError):
    """An argument is out of range or malformed (position, layer, target token, prompt, name)."""


class MissingHookError(TLResidualError):
    """The ActivationCache lacks a hook the computation needs."""


class DecompositionError(TLResidualError):
    """The parts of a decomposition do not sum to the cached vector they decompose (the safety net).

    Raised instead of returning a number that would be silently wrong: the cache comes from another model, a
    hook edited an activation without being registered as a source, or the model has a feature the
    decomposition does not model.
    """
