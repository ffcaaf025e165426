"""TRELLIS's rectified-flow Euler sampler with classifier-free guidance inside an interval.

Convention (t = 1 is noise): ``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``, the
model predicts ``v = (1 - sigma_min) eps - x_0`` from ``(x_t, 1000 t, cond)``. Steps run on the
rescaled grid ``t <- r t / (1 + (r - 1) t)`` of ``linspace(1, 0, steps + 1)`` (r > 1 spends more
steps near the noise), ``x_{t'} = x_t - (t - t') v``. Guidance is ``(1 + w) v_cond - w v_uncond``
for ``t`` inside ``cfg_interval`` (both ends included) and ``v_cond`` outside it. ``sigma_min``
shapes the path but not the Euler step (a straight-line update needs only ``v``); it enters only
the trajectory's predictions of ``x_0`` (:meth:`FlowEulerSampler.predict_x0`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

# (x_t, t [B] in [0, 1000], cond [B, ...]) -> v. x_t is [B, ...] for dense latents, or the
# [N, C] features of B items' voxels (the model knows their coordinates); guidance doubles
# both along dim 0, conditional half first.
VelocityModel = Callable[[Tensor, Tensor, Tensor], Tensor]


def rescaled_timesteps(steps: int, rescale_t: float = 1.0) -> Tensor:
    """``[steps + 1]`` float64 times from 1 to 0: ``r t / (1 + (r - 1) t)`` of a uniform grid.

    Built as TRELLIS's ``FlowEulerSampler.sample`` builds it (``np.linspace``, then the same
    expression in the same order): ``torch.linspace`` rounds some points differently, and the
    guidance interval includes its ends, so one ulp moves a step in or out of guidance (25
    steps, rescale 4: TRELLIS's step 20 is at 0.49999999999999994, unguided; a 0.5 is guided).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rescale_t <= 0:
        raise ValueError(f"rescale_t must be > 0, got {rescale_t}")
    t = np.linspace(1, 0, steps + 1)
    return torch.from_numpy(rescale_t * t / (1 + (rescale_t - 1) * t))


def condition_for_batch(cond: Tensor, items: int, name: str = "condition") -> Tensor:
    """``cond [b, ...]`` for a batch of ``items``: as it is when ``b == items``, repeated when
    ``b == 1`` (TRELLIS's sampler does this: one image, several samples), else a
    ``ValueError`` naming both sizes."""
    if cond.shape[0] == items:
        return cond
    if cond.shape[0] == 1:
        return cond.repeat(items, *([1] * (cond.dim() - 1)))
    raise ValueError(f"the {name} has a batch of {cond.shape[0]} but the noise holds {items} "
                     "items: give one per item, or one for all")


class Trajectory(NamedTuple):
    """A sampling run step by step, as TRELLIS's sampler returns it (``samples``, ``pred_x_t``,
    ``pred_x_0``). Each list holds ``steps`` tensors of the noise's shape."""

    samples: Tensor  # the result, the same tensor as ``pred_x_t[-1]``
    pred_x_t: List[Tensor]  # x after each step (at the step's next time)
    pred_x_0: List[Tensor]  # each step's x_0 predicted from its x_t and guided velocity


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

    def predict_x0(self, x_t: Tensor, t: float, v: Tensor) -> Tensor:
        """The data point ``v`` points at from ``x_t``: ``(1 - sigma_min) x_t - (sigma_min +
        (1 - sigma_min) t) v``, TRELLIS's ``FlowEulerSampler._v_to_xstart_eps`` (the path's
        ``x_t`` and ``v`` solved for ``x_0``). Any shape; ``x_t`` and ``v`` alike."""
        return (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * v

    @torch.no_grad()
    def sample(self, model: VelocityModel, noise: Tensor, cond: Tensor, neg_cond: Tensor,
               progress: bool = False, batch_size: Optional[int] = None,
               return_trajectory: bool = False) -> Union[Tensor, Trajectory]:
        """Integrate from ``noise`` (t = 1) to a sample (t = 0) of ``noise``'s shape.

        ``cond`` and ``neg_cond`` are the model's condition inputs, one per item or one for all
        (repeated, as TRELLIS does). ``batch_size``: the items ``noise`` holds; by default the
        first dimension of a dense latent ``[B, C, ...]`` (more than two dimensions), while for
        voxel features ``[N, C]``, whose items only the model knows, the conditions are taken
        as one per item. ``return_trajectory``: a :class:`Trajectory` instead of the sample
        (the same numbers, with every step's ``x_t`` and predicted ``x_0``)."""
        times: Sequence[float] = rescaled_timesteps(self.steps, self.rescale_t).tolist()
        if batch_size is None and noise.dim() > 2:
            batch_size = noise.shape[0]
        if batch_size is not None:
            cond = condition_for_batch(cond, batch_size)
            neg_cond = condition_for_batch(neg_cond, batch_size, "negative condition")
        x, pred_x_t, pred_x_0 = noise, [], []
        for i in tqdm(range(self.steps), desc="flow sampling", disable=not progress):
            t, t_next = times[i], times[i + 1]
            v = self.guided_velocity(model, x, t, cond, neg_cond)
            if return_trajectory:
                pred_x_0.append(self.predict_x0(x, t, v))
            x = x - (t - t_next) * v
            if return_trajectory:
                pred_x_t.append(x)
        return Trajectory(x, pred_x_t, pred_x_0) if return_trajectory else x


@dataclass
class StageOverrides:
    """Sampler settings that replace ``pipeline.json``'s for one stage (null: keep)."""

    steps: Optional[int] = None
    cfg_strength: Optional[float] = None


def with_overrides(sampler: FlowEulerSampler, overrides: StageOverrides) -> FlowEulerSampler:
    """``pipeline.json``'s sampler with the config's non-null overrides."""
    return replace(sampler, **{k: v for k, v in vars(overrides).items() if v is not None})
