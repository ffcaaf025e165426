"""Conversions between what networks predict and the noise ``eps``: the one place they live.

With ``x_t = a x_0 + s eps``:

* ``epsilon``: the prediction is ``eps``.
* ``v_prediction`` (variance preserving, ``a^2 + s^2 = 1``): ``v = a eps - s x_0``, so
  ``eps = s x_t + a v`` and ``x_0 = a x_t - s v``.
* ``flow`` (rectified flow, ``a = 1 - s``): velocity ``u = dx_t/ds = eps - x_0``, so
  ``eps = x_t + a u`` and ``x_0 = x_t - s u``.
* ``sample``: the prediction is ``x_0``, so ``eps = (x_t - a x_0) / s``.
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample")


def eps_from_prediction(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, kind: str) -> Tensor:
    """Noise implied by a network prediction of type ``kind``; alpha, sigma broadcast to x_t."""
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        return sigma * x_t + alpha * pred
    if kind == "flow":
        return x_t + alpha * pred
    if kind == "sample":
        return (x_t - alpha * pred) / sigma
    raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def x0_from_eps(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Clean sample implied by a noise estimate (what a DDIM step moves towards)."""
    return (x_t - sigma * eps) / alpha
