"""Multi-task dense-prediction models."""

from .mtinet import MTINet

__all__ = ["MTINet"]
