"""TRELLIS's rectified-flow Euler sampler with classifier-free guidance inside an interval.

Convention (t = 1 is noise): ``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``, the
model predicts ``v = (1 - sigma_min) eps - x_0`` from ``(x_t, 1000 t, cond)``. Steps run on the
rescaled grid ``t <- r t / (1 + (r - 1) t)`` of ``linspace(1, 0, steps + 1)`` (r > 1 spends more
steps near the noise), ``x_{t'} = x_t - (t - t') v``. Guidance is ``(1 + w) v_cond - w v_uncond``
for ``t`` inside ``cfg_interval`` and ``v_cond`` outside it. ``sigma_min`` shapes the path but not
the Euler step (a straight-line update needs only ``v``), so sampling does not read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

# (x_t, t [B] in [0, 1000], cond [B, ...]) -> v. x_t is [B, ...] for dense latents, or the
# [N, C] features of B items' voxels (the model knows their coordinates); guidance doubles
# both along dim 0, conditional half first.
VelocityModel = Callable[[Tensor, Tensor, Tensor], Tensor]


def rescaled_timesteps(steps: int, rescale_t: float = 1.0) -> Tensor:
    """``[steps + 1]`` times from 1 to 0: ``r t / (1 + (r - 1) t)`` of a uniform grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rescale_t <= 0:
        raise ValueError(f"rescale_t must be > 0, got {rescale_t}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return rescale_t * t / (1 + (rescale_t - 1) * t)


@dataclass
class FlowEulerSampler:
    """One stage's sampler settings, ``pipeline.json``'s per stage. The defaults are the
    released image pipeline's ``FlowEulerGuidanceIntervalSampler`` (sigma_min 1e-5, steps 25,
    cfg strength 5, interval [0.5, 1], rescale_t 3; TRELLIS's examples use 12 steps)."""

    sigma_min: float = 1e-5  # the flow's, as pipeline.json states it (see the module docstring)
    steps: int = 25
    cfg_strength: float = 5.0
    cfg_interval: Tuple[float, float] = (0.5, 1.0)
    rescale_t: float = 3.0

    def guided_velocity(self, model: VelocityModel, x_t: Tensor, t: float, cond: Tensor,
                        neg_cond: Tensor) -> Tensor:
        """One guided velocity; both branches in one batched forward when guidance is on."""
        B = cond.shape[0]
        lo, hi = self.cfg_interval
        guided = self.cfg_strength != 0 and lo <= t <= hi
        if not guided:
            return model(x_t, torch.full((B,), 1000.0 * t, device=x_t.device), cond)
        v = model(torch.cat([x_t, x_t]), torch.full((2 * B,), 1000.0 * t, device=x_t.device),
                  torch.cat([cond, neg_cond]))
        v_cond, v_uncond = v.chunk(2)
        return (1 + self.cfg_strength) * v_cond - self.cfg_strength * v_uncond

    @torch.no_grad()
    def sample(self, model: VelocityModel, noise: Tensor, cond: Tensor, neg_cond: Tensor,
               progress: bool = False) -> Tensor:
        """Integrate from ``noise`` (t = 1) to a sample (t = 0). ``cond`` and ``neg_cond`` are
        the model's condition inputs for the batch."""
        times: Sequence[float] = rescaled_timesteps(self.steps, self.rescale_t).tolist()
        x = noise
        for i in tqdm(range(self.steps), desc="flow sampling", disable=not progress):
            t, t_next = times[i], times[i + 1]
            x = x - (t - t_next) * self.guided_velocity(model, x, t, cond, neg_cond)
        return x


@dataclass
class StageOverrides:
    """Sampler settings that replace ``pipeline.json``'s for one stage (null: keep)."""

    steps: Optional[int] = None
    cfg_strength: Optional[float] = None


def with_overrides(sampler: FlowEulerSampler, overrides: StageOverrides) -> FlowEulerSampler:
    """``pipeline.json``'s sampler with the config's non-null overrides."""
    return replace(sampler, **{k: v for k, v in vars(overrides).items() if v is not None})
