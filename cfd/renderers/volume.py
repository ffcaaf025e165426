"""Volume rendering of a field (density + colour) with nerfacc's batched functions.

Each ray is clipped to the scene box and cut into ``n_samples`` equal intervals in camera-z
units (rays use ``Cameras.ray_directions``, whose camera-space z is 1, so a sample's ``t`` is its
camera-z depth and the expected depth matches the splat renderer's). The field is queried once
per interval, at its midpoint or, with a ``generator``, at a uniform point inside it (stratified
sampling); nerfacc's ``render_weight_from_density`` turns densities into compositing weights.
These batched functions run on any device; the packed ones and nerfacc's occupancy-grid
estimator need its CUDA build, so empty space is skipped with our own
:class:`~cfd.renderers.occupancy.OccupancyGrid` (samples in empty cells get density 0 without a
field query). Rays are processed in chunks so the temporaries stay bounded, and a gradient
budget bounds what the backward keeps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cameras import Cameras
from .occupancy import OccupancyGrid
from .rasterize import RenderOutput
from .shading import Lighting


def ray_box_interval(origins: Tensor, directions: Tensor, radius: float):
    """Entry and exit ``t`` of rays ``o + t d`` through the cube ``[-radius, radius]^3``,
    ``[R]`` each; ``t_far <= t_near`` where a ray misses. ``t_near >= 0``."""
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far


class GradientBudget:
    """Shares ``total`` gradient-carrying samples over a render's chunks: the same fraction
    ``total / n_samples`` of every chunk's queried samples (in integers, the rounding carried
    from chunk to chunk), so dense and empty parts of the image are thinned alike and the
    render never exceeds ``total``."""

    def __init__(self, total: int, n_samples: int):
        self.n_samples = max(n_samples, 1)
        self.total = min(total, self.n_samples)
        self.queried = self.granted = 0

    @property
    def unlimited(self) -> bool:
        return self.total == self.n_samples

    def take(self, n_queried: int) -> int:
        """How many of a chunk's ``n_queried`` samples carry gradients."""
        self.queried += n_queried
        due = self.total * self.queried // self.n_samples
        count, self.granted = due - self.granted, due
        return count


def _evaluate(field, points: Tensor, normals: bool):
    if normals:
        return field.query_with_normals(points)
    return (*field.query(points), None)


def query_samples(field, points: Tensor, occupancy: Optional[OccupancyGrid] = None,
                  normals: bool = False, budget: Optional[GradientBudget] = None,
                  generator: Optional[torch.Generator] = None):
    """The field at sample points ``[N,3]``: ``density [N]``, ``rgb [N,3]`` and, with
    ``normals``, ``normal [N,3]`` (else None).

    Samples in empty ``occupancy`` cells are not queried (density, colour and normal 0). With a
    ``budget`` (and autograd on), only its share of the queried samples, drawn at random from
    ``generator``, carry gradients; the rest are evaluated without autograd. This is the
    official code's "gradient budget": the rendered values are those of a full-gradient render
    at the same samples, and the backward's memory is bounded at any resolution.
    """
    with_grad = torch.is_grad_enabled()
    limited = with_grad and budget is not None and not budget.unlimited
    if occupancy is None and not limited:
        return _evaluate(field, points, normals)
    keep = (torch.arange(points.shape[0], device=points.device) if occupancy is None
            else torch.nonzero(occupancy.lookup(points)).squeeze(1))
    parts = [(keep, with_grad)]
    if limited:
        n_grad = budget.take(keep.numel())
        order = torch.randperm(keep.numel(), generator=generator).to(keep.device)
        parts = [(keep[order[:n_grad]], True), (keep[order[n_grad:]], False)]
    density = points.new_zeros(points.shape[0])
    rgb = points.new_zeros(points.shape[0], 3)
    normal = points.new_zeros(points.shape[0], 3) if normals else None
    for index, grad in parts:
        if not index.numel():
            continue
        with torch.set_grad_enabled(grad):
            d, c, n = _evaluate(field, points[index], normals)
        density = density.index_put((index,), d)
        rgb = rgb.index_put((index,), c)
        if normals:
            normal = normal.index_put((index,), n)
    return density, rgb, normal


def render_field(field, cameras: Cameras, n_samples: int = 64,
                 background: Optional[Tensor] = None, chunk_rays: int = 8192,
                 generator: Optional[torch.Generator] = None,
                 occupancy: Optional[OccupancyGrid] = None, normals: bool = False,
                 lighting: Optional[Lighting] = None,
                 max_grad_samples: Optional[int] = None) -> RenderOutput:
    """Render ``field`` (anything with ``query(points [N,3]) -> (density [N], rgb [N,3])`` and
    ``cfg.radius``; for normals or lighting also ``query_with_normals``) from B cameras.

    Args:
        background: ``[B,3]`` colour or ``[B,H,W,3]`` image behind the field, or None (black).
        generator: stratified sample positions (and the gradient budget's draw) from it; None
            samples interval midpoints.
        occupancy: query the field only at samples in its occupied cells (density 0 elsewhere).
        normals: also composite the field's normals (unit ``-grad density``) into ``normal``.
        lighting: shade each sample's albedo (:class:`~cfd.renderers.shading.Lighting`); None
            renders the albedo.
        max_grad_samples: at most this many samples of the whole render carry gradients (the
            same share of every chunk's queried samples, :class:`GradientBudget`); None: all.
    Returns:
        ``rgb [B,H,W,3]``, ``alpha [B,H,W,1]``, ``depth [B,H,W,1]`` (camera z, 0 where alpha is
        0) and, with normals or lighting, ``normal [B,H,W,3]`` (``sum_i w_i n_i``: world frame,
        alpha-weighted, so 0 on empty rays).
    """
    from nerfacc import render_weight_from_density

    B, H, W = len(cameras), cameras.height, cameras.width
    normals = normals or lighting is not None
    directions = cameras.ray_directions().reshape(B, H * W, 3)
    origins = cameras.centers[:, None, :].expand(B, H * W, 3)
    directions, origins = directions.reshape(-1, 3), origins.reshape(-1, 3)
    view = (torch.arange(B, device=cameras.device).repeat_interleave(H * W)
            if lighting is not None else None)
    steps = torch.linspace(0.0, 1.0, n_samples + 1, device=cameras.device,
                           dtype=directions.dtype)
    n_rays = directions.shape[0]
    budget = (None if max_grad_samples is None
              else GradientBudget(max_grad_samples, n_rays * n_samples))
    chunks = {"rgb": [], "alpha": [], "depth": [], "normal": []}
    for start in range(0, n_rays, chunk_rays):
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
        density, rgb, normal = query_samples(field, points.reshape(-1, 3), occupancy, normals,
                                             budget, generator)
        rgb = rgb.reshape(*t_mid.shape, 3)
        if normals:
            normal = normal.reshape(*t_mid.shape, 3)
        if lighting is not None:
            rgb = lighting.shade(rgb, normal, view[start:start + chunk_rays])
        # densities are per world unit; the intervals are in camera-z units, |d| world units each
        sigmas = density.reshape(t_mid.shape) * d.norm(dim=-1, keepdim=True)
        weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas)
        alpha = weights.sum(-1, keepdim=True)
        chunks["rgb"].append((weights[..., None] * rgb).sum(1))
        chunks["alpha"].append(alpha)
        depth = (weights * t_mid).sum(-1, keepdim=True)
        chunks["depth"].append(torch.where(alpha > 0, depth / alpha.clamp(min=1e-10), 0.0))
        if normals:
            chunks["normal"].append((weights[..., None] * normal).sum(1))
    rgb, alpha, depth = (torch.cat(chunks[k]).reshape(B, H, W, -1)
                         for k in ("rgb", "alpha", "depth"))
    if background is not None:
        rgb = rgb + (1 - alpha) * (background if background.ndim == 4
                                   else background[:, None, None, :])
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth,
                        normal=torch.cat(chunks["normal"]).reshape(B, H, W, 3) if normals
                        else None,
                        info={"width": W, "height": H, "n_cameras": B, "n_samples": n_samples})
