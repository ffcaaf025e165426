"""RelaxFlow's dual-branch sampler over one shared rectified-flow trajectory.

Each step evaluates, on the same ``x_t``:

* the observation branch: the occluded image's tokens, guided as TRELLIS guides
  (``(1 + s) v_cond - s v_uncond`` inside the guidance interval);
* the prior branch: tokens of images that show the prompt (pooled, :func:`pool_priors`), the
  same guidance, its cross-attention relaxed (:mod:`relaxflow.relaxation`);

and fuses them per token with the visibility ``m`` (1 = seen in the observation):
``v = v_obs + (1 - m) alpha_k (w v_prior - v_obs)``. Where ``alpha_k`` or ``w`` is 0 only the
observation branch runs, exactly as plain sampling.

The branches run as one batched forward. Image models' negative conditions are all-zero tokens:
every key then comes from the same zero input (its projection bias), all values are equal, and
the attention output is that value whatever the number of tokens, the padding or the blur. One
unconditional forward therefore serves both branches: three items a step, not four
(``test_shared_unconditional`` checks it). Non-zero negatives (text models' empty prompt) get
their own items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .relaxation import AttentionRelaxation
from .sampler import FlowEulerSampler, rescaled_timesteps


class Schedule(Enum):
    """The prior branch's weight over the steps (``alpha_schedule``)."""

    linear_cutoff = "linear_cutoff"
    cosine = "cosine"
    exponential = "exponential"
    sigmoid = "sigmoid"
    two_stage = "two_stage"
    inverse_sqrt = "inverse_sqrt"


class Pooling(Enum):
    """How N prior images' tokens become one condition (``pool_priors``)."""

    concat = "concat"
    mean = "mean"
    consensus = "consensus"


SCHEDULES = tuple(s.value for s in Schedule)


def alpha_schedule(steps: int, kind: str = "linear_cutoff", alpha0: float = 1.0,
                   cutoff: float = 0.4) -> List[float]:
    """``alpha_k`` for steps ``k = 0..steps-1`` (0 is the noisiest), clamped to [0, 1].

    ``linear_cutoff`` (default): ``alpha0 (1 - k / K)`` up to ``k = int(cutoff K)``, then 0;
    ``cosine``: ``alpha0 (1 + cos(pi k / k_cut)) / 2`` up to the same cutoff, then 0;
    ``exponential``: ``alpha0 exp(-4 k / K)``; ``sigmoid``: ``alpha0 / (1 + exp(10 (k / K -
    0.5)))``; ``two_stage``: a ramp ``alpha0 (k + 1) / W`` over the first ``W = int(0.1 K)``
    steps, ``alpha0`` for the next ``int(0.2 K)``, then linear down to 0 at ``K``;
    ``inverse_sqrt``: ``alpha0 / sqrt(1 + 5 k / K)``. These are the released code's gating
    schedules with its default parameters (``cutoff`` is its ``mid_ratio``).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown alpha schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    last = int(cutoff * steps)
    values = []
    for k in range(steps):
        if kind == "linear_cutoff":
            a = alpha0 * (1 - k / steps) if k <= last else 0.0
        elif kind == "cosine":
            a = alpha0 * (1 + math.cos(math.pi * k / max(last, 1))) / 2 if k <= last else 0.0
        elif kind == "exponential":
            a = alpha0 * math.exp(-4 * k / steps)
        elif kind == "two_stage":
            warmup, decay_start = int(0.1 * steps), int(0.1 * steps) + int(0.2 * steps)
            if k < warmup:
                a = alpha0 * (k + 1) / warmup
            elif k < decay_start:
                a = alpha0
            else:
                a = alpha0 * (1 - (k - decay_start) / (steps - decay_start))
        elif kind == "inverse_sqrt":
            a = alpha0 / math.sqrt(1 + 5 * k / steps)
        else:  # sigmoid
            a = alpha0 / (1 + math.exp(10 * (k / steps - 0.5)))
        values.append(min(max(a, 0.0), 1.0))
    return values


def pool_priors(tokens: Tensor, mode: str = "concat", temperature: float = 0.1) -> Tensor:
    """Condition tokens of N prior images ``[N, T, C]`` -> one prior condition ``[1, L, C]``.

    ``concat`` (default): all N T tokens, so the cross-attention's softmax spans every prior;
    ``mean``: the token-wise mean; ``consensus``: per token, a softmax over priors (with
    ``temperature``) of each prior's cosine similarity to the mean token, then the weighted sum.
    """
    if mode == "concat":
        return tokens.reshape(1, -1, tokens.shape[-1])
    if mode == "mean":
        return tokens.mean(0, keepdim=True)
    if mode == "consensus":
        mean = F.normalize(tokens.mean(0, keepdim=True), dim=-1)
        agreement = (F.normalize(tokens, dim=-1) * mean).sum(-1, keepdim=True)  # [N, T, 1]
        weights = torch.softmax(agreement / temperature, dim=0)
        return (weights * tokens).sum(0, keepdim=True)
    raise ValueError(f"prior pooling is 'concat', 'mean' or 'consensus', got {mode!r}")


def pad_conditions(conds: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Stack conditions ``[b_i, S_i, C]`` into ``[sum b_i, max S, C]`` with a key mask."""
    length = max(c.shape[1] for c in conds)
    padded = torch.cat([F.pad(c, (0, 0, 0, length - c.shape[1])) for c in conds])
    mask = torch.cat([torch.arange(length, device=c.device)[None].expand(c.shape[0], -1)
                      < c.shape[1] for c in conds])
    return padded, mask


@dataclass
class RelaxFlowSampler:
    """Settings of one stage: the base sampler, the alpha schedule, the prior weight ``w`` and
    the prior branch's relaxation (``items`` is set per call)."""

    base: FlowEulerSampler = field(default_factory=FlowEulerSampler)
    schedule: str = "linear_cutoff"
    alpha0: float = 1.0
    cutoff: float = 0.4
    prior_weight: float = 1.0
    relaxation: Optional[AttentionRelaxation] = field(default_factory=AttentionRelaxation)

    def alphas(self) -> List[float]:
        return alpha_schedule(self.base.steps, self.schedule, self.alpha0, self.cutoff)

    def fused_velocity(self, model: Callable, x_t: Tensor, t: float, alpha: float,
                       obs: Tuple[Tensor, Tensor], prior: Tuple[Tensor, Tensor],
                       visibility: Optional[Tensor] = None) -> Tensor:
        """One step's velocity. ``obs`` and ``prior``: (condition, negative condition), each
        ``[B, S, C]`` (the prior's S may differ); ``visibility``: ``m`` broadcastable to
        ``x_t`` (None: 0 everywhere)."""
        if alpha <= 0 or self.prior_weight <= 0:
            return self.base.guided_velocity(model, x_t, t, *obs)
        (obs_cond, obs_neg), (prior_cond, prior_neg) = obs, prior
        B = obs_cond.shape[0]
        lo, hi = self.base.cfg_interval
        guided = self.base.cfg_strength != 0 and lo <= t <= hi
        conds = [obs_cond, prior_cond]
        shared_negative = not obs_neg.any() and not prior_neg.any()
        if guided:
            conds += [obs_neg] if shared_negative else [obs_neg, prior_neg]
        cond, mask = pad_conditions(conds)
        items = torch.zeros(len(conds) * B, dtype=torch.bool, device=x_t.device)
        items[B:2 * B] = True
        if guided and not shared_negative:
            items[3 * B:] = True  # the prior's own negative is relaxed like its condition
        relaxation = None if self.relaxation is None else replace(self.relaxation, items=items)
        times = torch.full((len(conds) * B,), 1000.0 * t, device=x_t.device)
        v = model(torch.cat([x_t] * len(conds)), times, cond, cond_mask=mask,
                  relaxation=relaxation).chunk(len(conds))
        v_obs, v_prior = v[0], v[1]
        if guided:
            s = self.base.cfg_strength
            v_obs_neg = v[2]
            v_prior_neg = v[2] if shared_negative else v[3]
            v_obs = (1 + s) * v_obs - s * v_obs_neg
            v_prior = (1 + s) * v_prior - s * v_prior_neg
        keep = 1.0 if visibility is None else 1.0 - visibility
        return v_obs + keep * alpha * (self.prior_weight * v_prior - v_obs)

    @torch.no_grad()
    def sample(self, model: Callable, noise: Tensor, obs: Tuple[Tensor, Tensor],
               prior: Tuple[Tensor, Tensor], visibility: Optional[Tensor] = None,
               progress: bool = False) -> Tensor:
        """Integrate the fused velocity from ``noise`` (t = 1) to t = 0 on the base sampler's
        rescaled grid."""
        times = rescaled_timesteps(self.base.steps, self.base.rescale_t).tolist()
        x = noise
        for k, alpha in enumerate(tqdm(self.alphas(), desc="relaxflow", disable=not progress)):
            v = self.fused_velocity(model, x, times[k], alpha, obs, prior, visibility)
            x = x - (times[k] - times[k + 1]) * v
        return x
