"""Image metrics inside a mask, and confidence intervals for tables.

Visible fidelity compares a result's render at the observation camera with the observation,
only where the observation holds the object (``mask``); the rest of the image is the hidden
part's business, measured by the geometry metrics.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from scipy import stats
from torch import Tensor


def _check_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` shaped as ``like`` without its channel axis, or with a channel of 1, as bool
    expanded to ``like``'s shape (values > 0.5 select a pixel)."""
    if mask.ndim == like.ndim - 1:
        mask = mask[..., None]
    try:
        mask = mask.expand_as(like)
    except RuntimeError:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the images "
                         f"{tuple(like.shape)}; give [..., H, W] or [..., H, W, 1]") from None
    return mask if mask.dtype == torch.bool else mask > 0.5


def psnr(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (both clamped to it), over the
    pixels in ``mask``.

    Args:
        pred, target: ``[..., H, W, C]``.
        mask: ``[..., H, W]`` or ``[..., H, W, 1]``, bool or values > 0.5 selecting pixels
            (e.g. the observation's alpha); None uses every pixel. Every channel of a
            selected pixel counts.
    Returns:
        ``10 log10(1 / MSE)``; the MSE is floored at 1e-12 (120 dB for identical images).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    squared_error = (pred.double().clamp(0, 1) - target.double().clamp(0, 1)) ** 2
    if mask is None:
        mse = squared_error.mean()
    else:
        selected = _check_mask(mask, pred)
        if not selected.any():
            raise ValueError("the mask selects no pixel: PSNR inside it is undefined")
        mse = squared_error[selected].mean()
    return 10.0 * math.log10(1.0 / max(float(mse), 1e-12))


def mask_iou(alpha_pred: Tensor, alpha_target: Tensor, mask: Optional[Tensor] = None,
             threshold: float = 0.5) -> float:
    """IoU of two silhouettes (alpha above ``threshold``), counted inside ``mask``.

    Args:
        alpha_pred, alpha_target: ``[..., H, W, 1]`` (or ``[..., H, W]``) in [0, 1].
        mask: same shape, bool or values > 0.5 selecting the pixels that count; None counts
            all.
    Returns:
        IoU in [0, 1]; 1.0 when neither silhouette covers a counted pixel.
    """
    if alpha_pred.shape != alpha_target.shape:
        raise ValueError(f"alpha_pred {tuple(alpha_pred.shape)} and alpha_target "
                         f"{tuple(alpha_target.shape)} differ")
    a, b = alpha_pred > threshold, alpha_target > threshold
    if mask is not None:
        selected = _check_mask(mask, a)
        a, b = a & selected, b & selected
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def confidence_interval(samples: Sequence[float], confidence: float = 0.95
                        ) -> Tuple[float, float]:
    """Mean and half-width of the two-sided ``confidence`` interval of the mean, from
    Student's t-distribution with n - 1 degrees of freedom: ``t * s / sqrt(n)``, s the sample
    standard deviation (n - 1 in its denominator). Report as ``mean ± half_width``.

    Args:
        samples: n >= 1 finite values (one per seed, say).
    Returns:
        ``(mean, half_width)``; the half-width is ``inf`` for a single sample (one value says
        nothing about the spread).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    values = torch.as_tensor(list(samples), dtype=torch.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a flat list of at least one sample, got shape "
                         f"{tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"samples must be finite, got {values.tolist()}")
    n, mean = len(values), float(values.mean())
    if n == 1:
        return mean, math.inf
    t = float(stats.t.ppf((1 + confidence) / 2, df=n - 1))
    return mean, t * float(values.std(correction=1)) / math.sqrt(n)
