"""The check every model's forward makes on its input images, so that a wrong input fails with an
error naming the argument and what was expected, not deep inside the first convolution."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_images"]


def check_images(images: Any, where: str, arg: str = "x", channels: int = 3) -> None:
    """Raise unless ``images`` is a floating-point (N, channels, H, W) tensor.

    ``where`` names the model (``"MTINet"``), ``arg`` its forward's argument. TypeError for a
    non-tensor or a non-floating dtype (a uint8 image must be scaled to floats first), ValueError
    for another number of dimensions or of channels. N = 0 passes: an empty batch is valid.

    Shapes: images (N, channels, H, W).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{where}: {arg} must be a tensor of images (N, {channels}, H, W), "
            f"got {type(images).__name__}"
        )
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(
            f"{where}: {arg} must have shape (N, {channels}, H, W) (a batch of images with "
            f"{channels} channels), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"{where}: {arg} must be a floating-point tensor of images, got {images.dtype} "
            "(scale integer images to floats first, e.g. x.float() / 255, then normalize)"
        )
