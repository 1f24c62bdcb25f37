"""mtlfast: fast, memory-lean multi-task dense prediction for PyTorch."""

from . import data, engine, nn, ops

__version__ = "0.1.0"

__all__ = ["data", "engine", "ops", "nn", "__version__"]
