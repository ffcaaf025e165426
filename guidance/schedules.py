"""Noise schedules on a continuous time t in [0, 1]: ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every guidance model exposes one of these. ``model_time(t)`` is the timestep value a network
takes (``0..N-1`` for discrete diffusion models, ``1000 * sigma`` for flow transformers); the
embedded prior's schedule has none, as it has no network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class NoiseSchedule:
    """Base class; subclasses define ``alpha`` and ``sigma``, and ``model_time`` when a network
    takes the time."""

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``alpha(t) x0 + sigma(t) noise``; ``t`` is a scalar or ``[B]``."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        shape = (-1,) + (1,) * (x0.ndim - 1) if t.ndim else ()
        a = self.alpha(t).to(x0.dtype).reshape(shape)
        s = self.sigma(t).to(x0.dtype).reshape(shape)
        return a * x0 + s * noise


class DiscreteVPSchedule(NoiseSchedule):
    """Variance-preserving schedule from a discrete ``alphas_cumprod`` table (DDPM / Stable Diffusion).

    ``t`` maps to the timestep ``tau = t * N`` clamped to ``[0, N-1]`` (N = table length), and
    ``alpha_bar`` is interpolated linearly in log space between integer timesteps, so integer
    timesteps reproduce the scheduler's ``add_noise`` exactly.
    """

    def __init__(self, alphas_cumprod: Tensor):
        self.log_alphas_cumprod = torch.log(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.num_timesteps = self.log_alphas_cumprod.shape[0]

    def _log_alpha_bar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        tau = self.model_time(t)
        lo = tau.floor().long().clamp(max=self.num_timesteps - 2)
        frac = tau - lo
        table = self.log_alphas_cumprod.to(tau.device)
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))

    def model_time(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return (t * self.num_timesteps).clamp(0.0, self.num_timesteps - 1)


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow ``x_t = (1 - s) x_0 + s eps`` with SD3's shift ``s = k t / (1 + (k - 1) t)``."""

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

    def noise_level(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.noise_level(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.noise_level(t)

    def model_time(self, t: Tensor) -> Tensor:
        return self.noise_level(t) * self.num_train_timesteps


class CosineSchedule(NoiseSchedule):
    """``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (the embedded prior's; it has no
    network, so no ``model_time``)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * torch.as_tensor(t, dtype=torch.float64))
