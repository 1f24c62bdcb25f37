"""mtlfast: fast, memory-lean multi-task dense prediction for PyTorch."""

from . import nn, ops, profiling

__version__ = "0.1.0"

__all__ = ["ops", "nn", "profiling", "__version__"]
