"""Turning metric inputs (tensors or arrays) into float64 / integer numpy arrays on the CPU."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(x, name: str) -> np.ndarray:
    """``x`` (tensor or array-like) as a numpy array, detached and on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - message only
        raise TypeError(f"{name} must be a tensor or an array, got {type(x).__name__}") from e


def check_finite(pred: np.ndarray, meter: str, allow_inf: bool = False) -> None:
    """Every meter's rule for non-finite predictions: raise ValueError naming the meter.

    A NaN (or, unless ``allow_inf``, an infinite) prediction is a diverged model or a broken
    post-processing step; counting it as some error would hide that, and no count is right for
    every statistic. ``allow_inf`` is for scores ranked by argmax, where +-inf orders fine.
    """
    if not np.issubdtype(pred.dtype, np.floating):
        return
    bad = np.isnan(pred) if allow_inf else ~np.isfinite(pred)
    count = int(np.count_nonzero(bad))
    if count:
        what = "NaN" if allow_inf else "non-finite (NaN or inf)"
        raise ValueError(
            f"{meter}.update: pred holds {count} {what} value(s) of {pred.size}; a meter cannot "
            f"score them (is the model diverging?)"
        )


def single_channel(x: np.ndarray, name: str) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) -> (N, H, W)."""
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 3:
        return x
    raise ValueError(f"{name} must be (N, 1, H, W) or (N, H, W), got {tuple(x.shape)}")


def same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
