"""A learned background: a small MLP of the view direction (an environment map at infinity).

What the official CFD NeRF stages composite behind the object (threestudio's neural environment
map: tiny-cuda-nn's spherical-harmonics encoding of "degree 3", which is 9 values, bands 0-2;
a 2-layer MLP of 16 units; sigmoid). It starts as the solid colour it replaces (kept 0.1 away
from black and white, where a sigmoid barely learns), so switching it on changes little at
step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError

from ..cameras import Cameras
from .sh import sh_basis


@dataclass
class BackgroundMLPConfig:
    sh_degree: int = 2  # direction encoding: real SH bands 0..sh_degree, (degree + 1)^2 values
    hidden: int = 16
    n_hidden_layers: int = 2
    lr: float = 1e-3  # Adam, as the official background group


class MLPBackground(nn.Module):
    """RGB in [0, 1] of each viewing direction; ``forward(directions [...,3]) -> [...,3]``."""

    def __init__(self, cfg: BackgroundMLPConfig, initial_colour: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0 <= cfg.sh_degree <= 3:
            raise UserError(f"background sh_degree is 0..3, got {cfg.sh_degree}")
        if not 0.0 <= initial_colour <= 1.0:
            raise UserError(f"a learned background starts from a grey level in [0, 1], got "
                            f"{initial_colour}")
        self.cfg = cfg
        widths = [(cfg.sh_degree + 1) ** 2] + [cfg.hidden] * cfg.n_hidden_layers
        layers = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 3))
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
            # zero output weights: every direction starts at initial_colour
            self.net[-1].weight.zero_()
            start = min(max(initial_colour, 0.1), 0.9)
            self.net[-1].bias.fill_(math.log(start / (1 - start)))

    def forward(self, directions: Tensor) -> Tensor:
        basis = sh_basis(self.cfg.sh_degree, F.normalize(directions, dim=-1))
        return torch.sigmoid(self.net(basis))

    def image(self, cameras: Cameras) -> Tensor:
        """The background each camera sees, ``[B,H,W,3]``."""
        return self(cameras.ray_directions())

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, betas=(0.9, 0.99), eps=1e-15)
