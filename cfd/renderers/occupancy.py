"""A CPU-friendly occupancy grid: which cells of the scene box may hold density.

The volume renderer queries the field only at samples in occupied cells; everywhere else the
density is 0 without a query, which is most of the box around an object. nerfacc's
``OccGridEstimator`` does this with CUDA kernels; this one is plain tensor indexing.

Each update evaluates the field at one jittered point per cell and keeps a decaying maximum
``d <- max(decay * d, density)``; a cell is occupied while one render step through it, of
length ``step_size``, would be at least ``alpha_threshold`` opaque. Before the first update
every cell is occupied, so nothing is skipped that the field has not been asked about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from core.errors import UserError


@dataclass
class OccupancyConfig:
    enabled: bool = True
    resolution: int = 32
    update_every: int = 16
    decay: float = 0.95
    alpha_threshold: float = 0.01


class OccupancyGrid:
    """Occupancy of ``resolution^3`` cells over ``[-radius, radius]^3``."""

    def __init__(self, radius: float, cfg: OccupancyConfig, device="cpu"):
        if cfg.resolution < 1:
            raise UserError(f"occupancy.resolution must be >= 1, got {cfg.resolution}: at "
                            "least 1 cell per axis (the default is 32)")
        if cfg.update_every < 1:
            raise UserError(f"occupancy.update_every must be >= 1, got {cfg.update_every}: at "
                            "least 1 step between updates; to skip no empty space at all, set "
                            "occupancy.enabled=false instead")
        self.radius, self.cfg = float(radius), cfg
        G = cfg.resolution
        self.density = torch.full((G, G, G), torch.inf, device=device)
        self.occupied = torch.ones((G, G, G), dtype=torch.bool, device=device)

    def cells(self, points: Tensor) -> Tensor:
        """Flat cell index of world points ``[...,3]`` (clamped into the box) ``-> [...]``."""
        G = self.cfg.resolution
        ijk = ((points / self.radius + 1) / 2 * G).long().clamp(0, G - 1)
        return (ijk[..., 0] * G + ijk[..., 1]) * G + ijk[..., 2]

    def lookup(self, points: Tensor) -> Tensor:
        """Whether each point ``[...,3]`` lies in an occupied cell ``-> [...]`` bool."""
        return self.occupied.reshape(-1)[self.cells(points)]

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step_size: float,
               generator: Optional[torch.Generator] = None) -> float:
        """Refresh from ``density_fn(points [N,3]) -> [N]``; returns the occupied fraction."""
        G, device = self.cfg.resolution, self.density.device
        index = torch.arange(G, device=device, dtype=torch.float32)
        corner = torch.stack(torch.meshgrid(index, index, index, indexing="ij"), -1).reshape(-1, 3)
        jitter = torch.rand(corner.shape, generator=generator).to(device)
        points = ((corner + jitter) / G * 2 - 1) * self.radius
        fresh = density_fn(points).reshape(G, G, G).float()
        previous = torch.where(torch.isinf(self.density), torch.zeros_like(fresh), self.density)
        self.density = torch.maximum(previous * self.cfg.decay, fresh)
        self.occupied = (1 - torch.exp(-self.density * step_size)) >= self.cfg.alpha_threshold
        return self.occupied.float().mean().item()

    def state_dict(self) -> dict:
        return {"density": self.density.clone(), "occupied": self.occupied.clone()}

    def load_state_dict(self, state: dict) -> None:
        G = self.cfg.resolution
        for key in ("density", "occupied"):
            if tuple(state[key].shape) != (G, G, G):
                raise ValueError(f"the occupancy state's {key} has shape "
                                 f"{tuple(state[key].shape)} but this grid is {(G, G, G)} "
                                 f"(occupancy.resolution={G}); set occupancy.resolution to "
                                 "the value the state was saved with")
        self.density = state["density"].to(self.density.device)
        self.occupied = state["occupied"].to(self.occupied.device)
