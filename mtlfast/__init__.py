"""mtlfast: fast, memory-lean multi-task dense prediction for PyTorch."""

from . import engine, losses, metrics, nn, ops

__version__ = "0.1.0"

__all__ = ["engine", "ops", "nn", "losses", "metrics", "__version__"]
