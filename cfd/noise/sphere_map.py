"""Equal-area maps from directions around the origin to the square [-1, 1]^2.

A point ``p`` (after an axis permutation) is mapped by the Lambert azimuthal equal-area
projection of its direction, folded so both hemispheres of the third axis land on one disc, and
then by an inverse concentric map from the disc to the square. Both steps have constant
Jacobians, so the area a surface patch covers in the square is proportional to the solid angle it
subtends from the origin: a fixed world-space white-noise texture sampled this way assigns every
patch the same texels from every camera.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

# (permutation, sign) of each map: three axis orders (so each map's seams are covered by the
# others), first with the nearest (+1), then with the farthest (-1) surface winning the depth
# test. Configs using fewer maps take a prefix.
MAP_LAYOUTS: Tuple[Tuple[Tuple[int, int, int], float], ...] = (
    ((0, 1, 2), 1.0), ((2, 0, 1), 1.0), ((1, 2, 0), 1.0),
    ((0, 1, 2), -1.0), ((2, 0, 1), -1.0), ((1, 2, 0), -1.0),
)


def sphere_to_square(points: Tensor) -> Tensor:
    """``[..., 3]`` points (not at the origin) -> ``[..., 2]`` in [-1, 1]^2, equal-area in the
    direction of each point (the sign of the third coordinate is folded away)."""
    # Contiguous coordinates: strided inputs make the elementwise kernels several times slower.
    p0, p1, p2 = points.movedim(-1, 0).contiguous()
    cos_theta = p2.abs() / points.norm(dim=-1).clamp(min=1e-12)
    d = torch.sqrt((1 - cos_theta).clamp(min=0))  # Lambert radius / sqrt(2), in [0, 1]
    phi = torch.atan2(p0, p1)  # (-pi, pi]
    q = 2.0 / math.pi  # maps a quarter turn onto a full side of the square (-1..1 is 2 units)
    wedge = torch.floor((phi + math.pi) / (0.5 * math.pi)).clamp(max=3)  # 0..3
    u = (phi + math.pi - wedge * 0.5 * math.pi) * 2 * q - 1  # position along the side, [-1, 1]
    # Wedge k is wedge 0's side of the square, (-d, -d u), turned k quarter turns:
    # cos = 1, 0, -1, 0 and sin = 0, 1, 0, -1 for k = 0..3.
    odd = wedge % 2
    cos_k, sin_k = (1 - wedge) * (1 - odd), (2 - wedge) * odd
    x, y = -d, -d * u
    return torch.stack([cos_k * x - sin_k * y, sin_k * x + cos_k * y], -1)
