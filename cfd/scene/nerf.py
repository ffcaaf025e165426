"""A NeRF scene: a hash-grid field of density and colour inside a cube ``[-radius, radius]^3``.

``query(points)`` gives what the volume renderer composites: density (per world unit) and RGB;
``query_with_normals`` adds the surface normal that shading needs.
The density starts as a blob, ``blob_density * (1 - |x| / blob_radius)`` added to the raw
density before the activation, so the first renders show an object to refine rather than
empty space (as threestudio's ``density_bias: blob_magic3d``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError

from .hash_grid import HashGridConfig, hash_grid


class _TruncExp(torch.autograd.Function):
    """``exp`` whose backward clamps its input at 15, so one large raw density cannot blow up
    a step's gradient (Instant-NGP's density activation)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


class DensityActivation(Enum):
    trunc_exp = "trunc_exp"  # exp with its gradient clamped (instant-ngp, the official CFD)
    softplus = "softplus"


DENSITY_ACTIVATIONS = {DensityActivation.trunc_exp: trunc_exp,
                       DensityActivation.softplus: F.softplus}


@dataclass
class NeRFLearningRates:
    """Adam learning rate per parameter group (the official CFD NeRF stages')."""

    encoding: float = 1e-2
    density: float = 1e-3
    colour: float = 1e-3


@dataclass
class NeRFConfig:
    radius: float = 1.0
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden: int = 64
    n_features: int = 15  # geometry features handed from the density head to the colour head
    density_activation: DensityActivation = DensityActivation.trunc_exp
    blob_density: float = 10.0
    blob_radius: float = 0.5


class NeRFField(nn.Module):
    """Density and colour of points in the scene box.

    Parameter groups (one optimiser group each, as the official CFD's learning rates):
    ``encoding`` (the hash grid), ``density`` (its MLP head), ``colour`` (the colour head).
    """

    def __init__(self, cfg: NeRFConfig, device="cpu", generator: torch.Generator | None = None):
        super().__init__()
        if not cfg.radius > 0:
            raise UserError(f"nerf.radius (half the side of the scene box) must be positive, "
                            f"got {cfg.radius}")
        # A zero blob radius divides by zero (density -inf, NaN at the centre) rather than
        # meaning "no blob", which is blob_density = 0.
        if not cfg.blob_radius > 0:
            raise UserError(f"nerf.blob_radius must be positive, got {cfg.blob_radius}; to "
                            "start without a blob set nerf.blob_density=0 instead")
        self.cfg = cfg
        self.density_activation = DENSITY_ACTIVATIONS[DensityActivation(cfg.density_activation)]
        self.encoding = hash_grid(cfg.grid, device, generator)
        self.density_net = nn.Sequential(
            nn.Linear(self.encoding.n_output_dims, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, 1 + cfg.n_features)).to(device)
        self.colour_net = nn.Sequential(
            nn.Linear(cfg.n_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 3)).to(device)

    @property
    def device(self) -> torch.device:
        return self.density_net[0].weight.device

    def param_groups(self) -> Dict[str, list]:
        return {"encoding": list(self.encoding.parameters()),
                "density": list(self.density_net.parameters()),
                "colour": list(self.colour_net.parameters())}

    def make_optimizers(self, lrs: Dict[str, float]) -> Dict[str, torch.optim.Optimizer]:
        """One Adam per group, betas (0.9, 0.99) and eps 1e-15 as the official NeRF stages."""
        groups = self.param_groups()
        unknown = set(lrs) - set(groups)
        if unknown:
            raise ValueError(f"learning rates for unknown NeRF groups {sorted(unknown)}; valid "
                             f"groups are {sorted(groups)}")
        return {name: torch.optim.Adam([{"params": params, "lr": lrs.get(name, 0.0),
                                         "name": name}], betas=(0.9, 0.99), eps=1e-15)
                for name, params in groups.items()}

    def check_finite(self) -> Optional[str]:
        """Name of the first parameter holding NaN/Inf, or None (one device sync per call: it
        runs before every render)."""
        names, params = zip(*self.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()
        return next((name for name, ok in zip(names, finite) if not ok), None)

    def contract(self, points: Tensor) -> Tensor:
        """World points ``[N,3]`` -> the grid's unit cube ``[N,3]`` (clamped to it)."""
        return ((points / self.cfg.radius + 1) / 2).clamp(0.0, 1.0)

    def query(self, points: Tensor) -> Tuple[Tensor, Tensor]:
        """``points [N,3]`` (world) -> ``density [N]`` (per world unit, 0 outside the box),
        ``rgb [N,3]`` in [0, 1]."""
        inside = (points.abs() <= self.cfg.radius).all(-1)
        head = self.density_net(self.encoding(self.contract(points)))
        blob = self.cfg.blob_density * (1 - points.norm(dim=-1) / self.cfg.blob_radius)
        density = self.density_activation(head[:, 0] + blob)
        rgb = torch.sigmoid(self.colour_net(head[:, 1:]))
        return torch.where(inside, density, torch.zeros_like(density)), rgb

    def query_with_normals(self, points: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``query`` plus ``normal [N,3]``: the unit ``-grad density`` (outward; 0 where the
        density is flat), by autograd as the official shading stages. With autograd on, the
        normals are differentiable (double backward, so shading trains the geometry)."""
        train = torch.is_grad_enabled()
        with torch.enable_grad():
            at = points.detach().requires_grad_(True)
            density, rgb = self.query(at)
            (grad,) = torch.autograd.grad(density, at, torch.ones_like(density),
                                          create_graph=train)
        normal = -F.normalize(grad, dim=-1)
        if not train:
            density, rgb = density.detach(), rgb.detach()
        return density, rgb, normal
