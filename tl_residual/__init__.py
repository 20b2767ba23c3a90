"""tl-residual: exact residual-stream decomposition and neuron-level attribution for TransformerLens models.

Quick start::

    from tl_residual import load_model, explain
    model = load_model("smollm2-135m")
    explain(model, "The capital of France is")
"""

from tl_residual.errors import (
    InvalidInputError,
    MissingHookError,
    TLResidualError,
    UnsupportedArchitectureError,
)
from tl_residual.explanation import Explanation, explain
from tl_residual.lens import Lens
from tl_residual.model import load_model, model_spec
from tl_residual.scorers import SCORERS, make_context, register_scorer

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "InvalidInputError",
    "Lens",
    "MissingHookError",
    "SCORERS",
    "TLResidualError",
    "UnsupportedArchitectureError",
    "__version__",
    "explain",
    "load_model",
    "make_context",
    "model_spec",
    "register_scorer",
]
