"""tl-residual: exact residual-stream decomposition and neuron-level attribution for TransformerLens models."""

__version__ = "0.1.0"
