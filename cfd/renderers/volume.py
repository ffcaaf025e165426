"""Volume rendering of a field (density + colour) with nerfacc's batched functions.

Each ray is clipped to the scene box and cut into ``n_samples`` equal intervals in camera-z
units (rays use ``Cameras.ray_directions``, whose camera-space z is 1, so a sample's ``t`` is its
camera-z depth and the expected depth matches the splat renderer's). The field is queried once
per interval, at its midpoint or, with a ``generator``, at a uniform point inside it (stratified
sampling); nerfacc's ``render_weight_from_density`` turns densities into compositing weights.
These batched functions run on any device; the packed ones and nerfacc's occupancy-grid
estimator need its CUDA build, so empty space is skipped with our own
:class:`~cfd.renderers.occupancy.OccupancyGrid` (samples in empty cells get density 0 without a
field query). Rays are processed in chunks so the temporaries stay bounded.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cameras import Cameras
from .occupancy import OccupancyGrid
from .rasterize import RenderOutput


def ray_box_interval(origins: Tensor, directions: Tensor, radius: float):
    """Entry and exit ``t`` of rays ``o + t d`` through the cube ``[-radius, radius]^3``,
    ``[R]`` each; ``t_far <= t_near`` where a ray misses. ``t_near >= 0``."""
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far


def query_occupied(field, points: Tensor, occupancy: Optional[OccupancyGrid]):
    """``field.query`` at the points in occupied cells; density 0 and colour 0 elsewhere."""
    if occupancy is None:
        return field.query(points)
    keep = torch.nonzero(occupancy.lookup(points)).squeeze(1)
    density = points.new_zeros(points.shape[0])
    rgb = points.new_zeros(points.shape[0], 3)
    if keep.numel():
        d, c = field.query(points[keep])
        density = density.index_put((keep,), d)
        rgb = rgb.index_put((keep,), c)
    return density, rgb


def render_field(field, cameras: Cameras, n_samples: int = 64,
                 background: Optional[Tensor] = None, chunk_rays: int = 8192,
                 generator: Optional[torch.Generator] = None,
                 occupancy: Optional[OccupancyGrid] = None) -> RenderOutput:
    """Render ``field`` (anything with ``query(points [N,3]) -> (density [N], rgb [N,3])`` and
    ``cfg.radius``) from B cameras.

    Args:
        background: ``[B,3]`` colour behind the field, or None (black).
        generator: stratified sample positions from it; None samples interval midpoints.
        occupancy: query the field only at samples in its occupied cells (density 0 elsewhere).
    Returns:
        ``rgb [B,H,W,3]``, ``alpha [B,H,W,1]``, ``depth [B,H,W,1]`` (camera z, 0 where alpha is 0).
    """
    from nerfacc import render_weight_from_density

    B, H, W = len(cameras), cameras.height, cameras.width
    directions = cameras.ray_directions().reshape(B, H * W, 3)
    origins = cameras.centers[:, None, :].expand(B, H * W, 3)
    directions, origins = directions.reshape(-1, 3), origins.reshape(-1, 3)
    steps = torch.linspace(0.0, 1.0, n_samples + 1, device=cameras.device,
                           dtype=directions.dtype)
    rgb_chunks, alpha_chunks, depth_chunks = [], [], []
    for start in range(0, directions.shape[0], chunk_rays):
        d, o = directions[start:start + chunk_rays], origins[start:start + chunk_rays]
        t_near, t_far = ray_box_interval(o, d, field.cfg.radius)
        length = (t_far - t_near).clamp(min=0.0)
        edges = t_near[:, None] + length[:, None] * steps[None]  # [R, S+1]
        t_starts, t_ends = edges[:, :-1], edges[:, 1:]
        if generator is None:
            u = torch.full_like(t_starts, 0.5)
        else:
            u = torch.rand(t_starts.shape, generator=generator, device="cpu").to(t_starts)
        t_mid = t_starts + u * (t_ends - t_starts)
        points = o[:, None, :] + t_mid[..., None] * d[:, None, :]
        density, rgb = query_occupied(field, points.reshape(-1, 3), occupancy)
        # densities are per world unit; the intervals are in camera-z units, |d| world units each
        sigmas = density.reshape(t_mid.shape) * d.norm(dim=-1, keepdim=True)
        weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas)
        alpha = weights.sum(-1, keepdim=True)
        rgb_chunks.append((weights[..., None] * rgb.reshape(*t_mid.shape, 3)).sum(1))
        alpha_chunks.append(alpha)
        depth = (weights * t_mid).sum(-1, keepdim=True)
        depth_chunks.append(torch.where(alpha > 0, depth / alpha.clamp(min=1e-10), 0.0))
    rgb = torch.cat(rgb_chunks).reshape(B, H, W, 3)
    alpha = torch.cat(alpha_chunks).reshape(B, H, W, 1)
    depth = torch.cat(depth_chunks).reshape(B, H, W, 1)
    if background is not None:
        rgb = rgb + (1 - alpha) * background[:, None, None, :]
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth,
                        info={"width": W, "height": H, "n_cameras": B, "n_samples": n_samples})
