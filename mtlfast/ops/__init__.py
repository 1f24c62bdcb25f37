"""Fused ops of mtlfast, each a ``torch.library`` custom op in the ``mtlfast`` namespace.

Backends and their selection: see :mod:`mtlfast.ops.backends`. Pure-PyTorch references with the
same names live in :mod:`mtlfast.ops.reference`.
"""

from . import reference
from .atrous_conv import atrous_conv2d
from .attention_distill import attention_distill
from .backends import BACKENDS, available_backends, current_backend, use_backend
from .batch_norm_train import batch_norm
from .channel_norm import channel_norm
from .max_pool import max_pool2d
from .resize import resize_bilinear
from .skip_fusion import skip_fusion
from .task_se import task_se
from .winograd_conv import set_winograd_autotune, winograd_autotune_choices, winograd_conv3x3

__all__ = [
    "BACKENDS",
    "atrous_conv2d",
    "attention_distill",
    "available_backends",
    "batch_norm",
    "channel_norm",
    "current_backend",
    "max_pool2d",
    "reference",
    "resize_bilinear",
    "set_winograd_autotune",
    "skip_fusion",
    "task_se",
    "use_backend",
    "winograd_autotune_choices",
    "winograd_conv3x3",
]
