"""mtlfast: fast, memory-lean multi-task dense prediction for PyTorch."""

from . import backbones, balancing, data, engine, losses, metrics, models, nn, ops, profiling

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "backbones",
    "balancing",
    "data",
    "engine",
    "losses",
    "metrics",
    "models",
    "nn",
    "ops",
    "profiling",
]
