"""Surface samplers of analytic primitives: points and outward normals, area-proportional.

Every sampler takes a point count and a torch generator and returns ``(points [n,3], normals
[n,3])`` in the primitive's local frame (z up).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

Surface = Tuple[Tensor, Tensor]


def _uniform(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def sphere(n: int, g: torch.Generator, radius: float = 1.0, z_min: float = -1.0) -> Surface:
    """Sphere of ``radius`` at the origin; ``z_min`` in [-1, 1] keeps only the cap z/r >= z_min."""
    z = z_min + (1 - z_min) * _uniform(n, g)  # uniform in z is uniform in area (Archimedes)
    phi = 2 * math.pi * _uniform(n, g)
    r = torch.sqrt((1 - z * z).clamp(min=0))
    normals = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    return radius * normals, normals


def ellipsoid(n: int, g: torch.Generator, radii=(1.0, 1.0, 1.0), z_min: float = -1.0) -> Surface:
    """Axis-aligned ellipsoid (a stretched sphere; sampling is close to area-uniform)."""
    p, nrm = sphere(n, g, 1.0, z_min)
    radii = torch.tensor(radii, dtype=torch.float64)
    normals = torch.nn.functional.normalize(nrm / radii, dim=-1)
    return p * radii, normals


def cylinder(n: int, g: torch.Generator, radius: float = 1.0, height: float = 1.0,
             caps: Tuple[bool, bool] = (True, True)) -> Surface:
    """Cylinder along z from 0 to ``height``; ``caps`` = (bottom, top) discs."""
    side = 2 * math.pi * radius * height
    cap = math.pi * radius * radius
    areas = torch.tensor([side, cap * caps[0], cap * caps[1]], dtype=torch.float64)
    which = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=g)
    phi = 2 * math.pi * _uniform(n, g)
    u = _uniform(n, g)
    rho = radius * torch.sqrt(_uniform(n, g))
    c, s = torch.cos(phi), torch.sin(phi)
    pts = torch.where(
        (which == 0)[:, None],
        torch.stack([radius * c, radius * s, height * u], -1),
        torch.stack([rho * c, rho * s, torch.where(which == 1, 0.0, height)], -1),
    )
    zero = torch.zeros_like(u)
    cap_normal = torch.stack([zero, zero, torch.where(which == 1, -1.0, 1.0)], -1)
    normals = torch.where((which == 0)[:, None], torch.stack([c, s, zero], -1), cap_normal)
    return pts, normals


def cone(n: int, g: torch.Generator, radius: float = 1.0, height: float = 1.0,
         base: bool = True) -> Surface:
    """Cone with its base disc at z = 0 and apex at z = ``height``."""
    slant = math.hypot(radius, height)
    areas = torch.tensor([math.pi * radius * slant, math.pi * radius * radius * base],
                         dtype=torch.float64)
    which = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=g)
    phi = 2 * math.pi * _uniform(n, g)
    c, s = torch.cos(phi), torch.sin(phi)
    frac = torch.sqrt(_uniform(n, g))  # distance from the apex (side) or centre (base)
    side_pts = torch.stack([radius * frac * c, radius * frac * s, height * (1 - frac)], -1)
    base_pts = torch.stack([radius * frac * c, radius * frac * s, torch.zeros_like(c)], -1)
    side_n = torch.nn.functional.normalize(
        torch.stack([height * c, height * s, torch.full_like(c, radius)], -1), dim=-1)
    base_n = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64).expand(n, 3)
    is_side = (which == 0)[:, None]
    return torch.where(is_side, side_pts, base_pts), torch.where(is_side, side_n, base_n)


def box(n: int, g: torch.Generator, size=(1.0, 1.0, 1.0)) -> Surface:
    """Axis-aligned box centred at the origin with edge lengths ``size``."""
    sx, sy, sz = size
    areas = torch.tensor([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy],
                         dtype=torch.float64)
    face = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=g)
    uvw = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor(
        size, dtype=torch.float64)
    axis = face // 2
    sign = torch.where(face % 2 == 0, 1.0, -1.0).to(torch.float64)
    half = torch.tensor(size, dtype=torch.float64)[axis] / 2
    uvw[torch.arange(n), axis] = sign * half
    normals = torch.zeros(n, 3, dtype=torch.float64)
    normals[torch.arange(n), axis] = sign
    return uvw, normals


def torus(n: int, g: torch.Generator, major: float = 1.0, minor: float = 0.25) -> Surface:
    """Torus around the z axis (rejection sampling keeps it area-uniform)."""
    pts, normals, have = [], [], 0
    while have < n:
        m = 2 * (n - have) + 16
        theta = 2 * math.pi * _uniform(m, g)
        phi = 2 * math.pi * _uniform(m, g)
        keep = _uniform(m, g) < (major + minor * torch.cos(phi)) / (major + minor)
        theta, phi = theta[keep], phi[keep]
        nrm = torch.stack([torch.cos(phi) * torch.cos(theta), torch.cos(phi) * torch.sin(theta),
                           torch.sin(phi)], -1)
        ring = torch.stack([major * torch.cos(theta), major * torch.sin(theta),
                            torch.zeros_like(theta)], -1)
        pts.append(ring + minor * nrm)
        normals.append(nrm)
        have += theta.shape[0]
    return torch.cat(pts)[:n], torch.cat(normals)[:n]


def prism(n: int, g: torch.Generator, width: float = 1.0, depth: float = 1.0,
          height: float = 0.5) -> Surface:
    """Gable roof: a triangular prism with its ridge along y, base at z = 0 spanning x in
    [-width/2, width/2] and y in [-depth/2, depth/2]."""
    slope = math.hypot(width / 2, height)
    tri = width * height / 2
    areas = torch.tensor([slope * depth, slope * depth, tri, tri], dtype=torch.float64)
    face = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=g)
    u, v = _uniform(n, g), _uniform(n, g)
    # Sloped faces: x from the eave (u=0) to the ridge (u=1).
    sx = torch.where(face == 0, 1.0, -1.0).to(torch.float64)
    slope_pts = torch.stack([sx * width / 2 * (1 - u), (v - 0.5) * depth, height * u], -1)
    slope_n = torch.nn.functional.normalize(
        torch.stack([sx * height, torch.zeros_like(u), torch.full_like(u, width / 2)], -1), -1)
    # Gable triangles at y = +-depth/2: fold (u, v) into the triangle.
    flip = u + v > 1
    a = torch.where(flip, 1 - u, u)
    b = torch.where(flip, 1 - v, v)
    sy = torch.where(face == 2, 1.0, -1.0).to(torch.float64)
    tri_pts = torch.stack([(a - b) * width / 2, sy * depth / 2, height * (1 - a - b)], -1)
    tri_n = torch.stack([torch.zeros_like(u), sy, torch.zeros_like(u)], -1)
    is_slope = (face < 2)[:, None]
    return torch.where(is_slope, slope_pts, tri_pts), torch.where(is_slope, slope_n, tri_n)
