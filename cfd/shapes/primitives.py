"""Surface samplers of analytic primitives and their inside-tests.

Every sampler takes a point count and a torch generator and returns ``(points [n,3], normals
[n,3])`` in the primitive's local frame (z up), area-proportional.

Next to each sampler, ``<kind>_inside(points [..., 3], **params, thickness) -> bool [...]`` says
which local points lie inside the solid the sampled surface bounds, with the sampler's
parameters (``INSIDE_TESTS`` maps kinds to them). A closed surface bounds a solid. An open one
(a cylinder without a cap, a cone without its base, a sphere or ellipsoid cut at ``z_min``) is a
shell: the points within ``thickness`` inside the sampled surface (measured along its normal), so
a mug is its wall and floor and a mushroom cap a dome, as the splats show them. A thin solid is
thickened about its middle so that a grid of cell centres ``thickness`` apart sees every cross
section of it wherever it lies: a box's sides and a closed cylinder's height to ``thickness``, a
rod's radius (a cylinder's, a closed cone's all along it, a torus's tube) to
``thickness / sqrt 2`` (half a cell's diagonal) and a ball's radii to ``thickness sqrt 3 / 2``
(half a cube's). Roofs (``prism``) are never thin.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

Surface = Tuple[Tensor, Tensor]

# World units; a mug's wall. Occupancy grids pass at least their cell size (``thickness``).
SHELL_THICKNESS = 0.05


def _rod_radius(radius: float, thickness: float) -> float:
    return max(radius, thickness / math.sqrt(2))


def _ball_radius(radius: float, thickness: float) -> float:
    return max(radius, thickness * math.sqrt(3) / 2)


def _uniform(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def sphere(n: int, g: torch.Generator, radius: float = 1.0, z_min: float = -1.0) -> Surface:
    """Sphere of ``radius`` at the origin; ``z_min`` in [-1, 1] keeps only the cap z/r >= z_min."""
    z = z_min + (1 - z_min) * _uniform(n, g)  # uniform in z is uniform in area (Archimedes)
    phi = 2 * math.pi * _uniform(n, g)
    r = torch.sqrt((1 - z * z).clamp(min=0))
    normals = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    return radius * normals, normals


def sphere_inside(points: Tensor, radius: float = 1.0, z_min: float = -1.0,
                  thickness: float = SHELL_THICKNESS) -> Tensor:
    """Ball, or (``z_min > -1``) the shell under the cap z/r >= ``z_min``."""
    dist = points.norm(dim=-1)
    if z_min <= -1:
        return dist <= _ball_radius(radius, thickness)
    return (dist <= radius) & (dist >= radius - thickness) & (points[..., 2] >= z_min * dist)


def ellipsoid(n: int, g: torch.Generator, radii=(1.0, 1.0, 1.0), z_min: float = -1.0) -> Surface:
    """Axis-aligned ellipsoid (a stretched sphere; sampling is close to area-uniform)."""
    p, nrm = sphere(n, g, 1.0, z_min)
    radii = torch.tensor(radii, dtype=torch.float64)
    normals = torch.nn.functional.normalize(nrm / radii, dim=-1)
    return p * radii, normals


def ellipsoid_inside(points: Tensor, radii=(1.0, 1.0, 1.0), z_min: float = -1.0,
                     thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid ellipsoid, or (``z_min > -1``) the shell under its cap; the shell's depth is the
    first-order distance to the surface, f / |grad f| for f = |p / radii| - 1."""
    if z_min <= -1:
        radii = [_ball_radius(r, thickness) for r in radii]
    radii = torch.tensor(radii, dtype=points.dtype)
    unit = (points / radii).norm(dim=-1)  # 1 on the surface
    if z_min <= -1:
        return unit <= 1
    grad = (points / radii ** 2).norm(dim=-1) / unit.clamp(min=1e-12)
    depth = (1 - unit) / grad.clamp(min=1e-12)
    on_cap = points[..., 2] / radii[2] >= z_min * unit
    return (unit <= 1) & (depth <= thickness) & on_cap


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


def cylinder_inside(points: Tensor, radius: float = 1.0, height: float = 1.0,
                    caps: Tuple[bool, bool] = (True, True),
                    thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid cylinder with both caps; without one, a cup-shaped shell: the wall and the caps
    it has, each ``thickness`` thick."""
    rho = torch.hypot(points[..., 0], points[..., 1])
    z = points[..., 2]
    if all(caps):
        half = max(height, thickness) / 2
        return (rho <= _rod_radius(radius, thickness)) & ((z - height / 2).abs() <= half)
    within = (rho <= radius) & (z >= 0) & (z <= height)
    shell = rho >= radius - thickness
    if caps[0]:
        shell = shell | (z <= thickness)
    if caps[1]:
        shell = shell | (z >= height - thickness)
    return within & shell


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


def cone_inside(points: Tensor, radius: float = 1.0, height: float = 1.0, base: bool = True,
                thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid cone with its base; without it, the shell under its side."""
    rho = torch.hypot(points[..., 0], points[..., 1])
    z = points[..., 2]
    room = radius * (1 - z / height) - rho  # horizontal distance in from the side
    along = (z >= 0) & (z <= height)
    if base:  # thickened to a rod all along, up to its thin tip
        return along & ((room >= 0) | (rho <= _rod_radius(0.0, thickness)))
    return along & (room >= 0) & (room * height / math.hypot(radius, height) <= thickness)


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


def box_inside(points: Tensor, size=(1.0, 1.0, 1.0),
               thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid box."""
    half = torch.tensor([max(s, thickness) / 2 for s in size], dtype=points.dtype)
    return (points.abs() <= half).all(-1)


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


def torus_inside(points: Tensor, major: float = 1.0, minor: float = 0.25,
                 thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid torus."""
    rho = torch.hypot(points[..., 0], points[..., 1])
    return (rho - major) ** 2 + points[..., 2] ** 2 <= _rod_radius(minor, thickness) ** 2


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


def prism_inside(points: Tensor, width: float = 1.0, depth: float = 1.0, height: float = 0.5,
                 thickness: float = SHELL_THICKNESS) -> Tensor:
    """Solid gable roof (``thickness`` is unused: a roof is never thin)."""
    x, y, z = points.unbind(-1)
    return ((z >= 0) & (z <= height) & (y.abs() <= depth / 2)
            & (x.abs() <= width / 2 * (1 - z / height)))


INSIDE_TESTS = {
    "sphere": sphere_inside, "ellipsoid": ellipsoid_inside, "cylinder": cylinder_inside,
    "cone": cone_inside, "box": box_inside, "torus": torus_inside, "prism": prism_inside,
}
