"""Timestep schedules for distillation: the annealed schedule of CFD and uniform sampling (SDS).

``anneal``: t is piecewise linear in training progress through ``knots`` of (progress, t) pairs;
CFD's official stage-1 schedule is ``t = 0.98 - 0.96 p``: knots ``[[0, 0.98], [1, 0.02]]``.
``uniform``: t ~ U[t_min, t_max] each step, from the run's generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List

import torch

from core.errors import UserError


class TimestepKind(Enum):
    anneal = "anneal"  # t follows the piecewise-linear ``knots`` over the run's progress
    uniform = "uniform"  # t drawn uniformly from [t_min, t_max] each step (SDS)


@dataclass
class TimestepConfig:
    kind: TimestepKind = TimestepKind.anneal
    knots: List[List[float]] = field(default_factory=lambda: [[0.0, 0.98], [1.0, 0.02]])
    t_min: float = 0.02
    t_max: float = 0.98


class TimestepSchedule:
    """t for each step. Every t lies in the open interval (0, 1): the guidance's noise is
    undefined at t = 0 (NaN) and its weight infinite at t = 1."""

    def __init__(self, cfg: TimestepConfig, total_steps: int):
        knots = sorted((float(p), float(t)) for p, t in cfg.knots)
        if TimestepKind(cfg.kind) is TimestepKind.anneal:
            if len(knots) < 2 or knots[0][0] > 0 or knots[-1][0] < 1:
                raise UserError("timesteps.knots must cover progress 0..1, e.g. "
                                "[[0, 0.98], [1, 0.02]]")
            if not all(0.0 < t < 1.0 for _, t in knots):
                raise UserError(f"timesteps.knots: every t must lie strictly between 0 and 1 "
                                f"(e.g. 0.02 .. 0.98), got {[t for _, t in knots]}")
        elif not 0.0 < cfg.t_min <= cfg.t_max < 1.0:
            raise UserError(f"timesteps.t_min and t_max must satisfy 0 < t_min <= t_max < 1 "
                            f"(e.g. 0.02 and 0.98), got {cfg.t_min} and {cfg.t_max}")
        self.cfg, self.knots, self.total = cfg, knots, max(total_steps, 1)
        self.uniform = TimestepKind(cfg.kind) is TimestepKind.uniform

    def __call__(self, step: int, generator: torch.Generator) -> float:
        if self.uniform:
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
            return self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * u
        progress = min(max(step / max(self.total - 1, 1), 0.0), 1.0)
        for (p0, t0), (p1, t1) in zip(self.knots, self.knots[1:]):
            if progress <= p1:
                return t0 + (t1 - t0) * (progress - p0) / max(p1 - p0, 1e-12)
        return self.knots[-1][1]
