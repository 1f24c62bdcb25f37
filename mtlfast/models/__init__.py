"""Multi-task dense-prediction models."""

from .mtinet import MTINet
from .padnet import PADNet

__all__ = ["MTINet", "PADNet"]
