"""Volume rendering of a field (density + colour) with nerfacc's batched functions.

Each ray is clipped to the scene box and cut into ``n_samples`` equal intervals in camera-z
units (rays use ``Cameras.ray_directions``, whose camera-space z is 1, so a sample's ``t`` is its
camera-z depth and the expected depth matches the splat renderer's). The field is queried once
per interval, at its midpoint or, with a ``generator``, at a uniform point inside it (stratified
sampling); nerfacc's ``render_weight_from_density`` turns densities into compositing weights.
These batched functions run on any device; the packed ones and nerfacc's occupancy-grid
estimator need its CUDA build, so empty space is skipped with our own
:class:`~cfd.renderers.occupancy.OccupancyGrid` (samples in empty cells get density 0 without a
field query). Rays are processed in chunks so the temporaries stay bounded. A gradient budget
bounds the per-sample tensors the backward keeps to those of the rays that hold the budget's
samples; what it keeps per pixel (a few values) still grows with the image.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..cameras import Cameras
from .occupancy import OccupancyGrid
from .shading import Lighting
from .types import RenderOutput


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
    """Shares ``total`` gradient-carrying samples over the ``n_queried`` samples a render
    queries: the same fraction ``total / n_queried`` of every chunk's queried samples (in
    integers, the rounding carried from chunk to chunk), so dense and empty parts of the image
    are thinned alike and the render's chunks together grant exactly
    ``min(total, n_queried)``."""

    def __init__(self, total: int, n_queried: int):
        self.n_queried = max(n_queried, 1)
        self.total = min(total, self.n_queried)
        self.queried = self.granted = 0

    def take(self, n_queried: int) -> int:
        """How many of a chunk's ``n_queried`` samples carry gradients."""
        self.queried += n_queried
        due = self.total * self.queried // self.n_queried
        count, self.granted = due - self.granted, due
        return count


def _evaluate(field, points: Tensor, normals: bool):
    if normals:
        return field.query_with_normals(points)
    return (*field.query(points), None)


def _budget_order(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """The random order ``[n]`` in which a chunk's queried samples are offered gradients."""
    return torch.randperm(n, generator=generator)


def query_samples(field, points: Tensor, occupancy: Optional[OccupancyGrid] = None,
                  normals: bool = False, budget: Optional[GradientBudget] = None,
                  generator: Optional[torch.Generator] = None):
    """The field at sample points ``[N,3]``: ``density [N]``, ``rgb [N,3]``, with ``normals``
    ``normal [N,3]`` (else None), and the indices ``[n]`` of the samples that carry gradients
    (None when every queried sample does).

    Samples in empty ``occupancy`` cells are not queried (density, colour and normal 0). With a
    ``budget`` (and autograd on), only its share of the queried samples, drawn at random from
    ``generator``, carry gradients; the rest are evaluated without autograd. This is the
    official code's "gradient budget": the rendered values are those of a full-gradient render
    at the same samples, and the field's part of the backward is that of the budget's samples.
    """
    with_grad = torch.is_grad_enabled()
    limited = with_grad and budget is not None
    if occupancy is None and not limited:
        return (*_evaluate(field, points, normals), None)
    keep = (torch.arange(points.shape[0], device=points.device) if occupancy is None
            else torch.nonzero(occupancy.lookup(points)).squeeze(1))
    density = points.new_zeros(points.shape[0])
    rgb = points.new_zeros(points.shape[0], 3)
    normal = points.new_zeros(points.shape[0], 3) if normals else None
    grad_index = None
    if limited:
        n_grad = budget.take(keep.numel())
        order = _budget_order(keep.numel(), generator).to(keep.device)
        # a chunk whose queried samples all carry gradients is evaluated as without a budget
        if n_grad < keep.numel():
            keep, plain = keep[order[:n_grad]], keep[order[n_grad:]]
            grad_index = keep
            # written in place before any autograd op touches the outputs, so the backward
            # saves no index for these samples
            with torch.no_grad():
                d, c, n = _evaluate(field, points[plain], normals)
                density[plain], rgb[plain] = d, c
                if normals:
                    normal[plain] = n
    if keep.numel():
        d, c, n = _evaluate(field, points[keep], normals)
        density = density.index_put((keep,), d)
        rgb = rgb.index_put((keep,), c)
        if normals:
            normal = normal.index_put((keep,), n)
    return density, rgb, normal, grad_index


def _chunk_samples(origins: Tensor, directions: Tensor, radius: float, steps: Tensor,
                   generator: Optional[torch.Generator]):
    """Intervals of R rays (``origins``, ``directions [R,3]``) through the box, cut at the
    fractions ``steps [S+1]``: ``t_starts``, ``t_ends``, sample ``t_mid [R,S]`` (one uniform
    draw per interval from ``generator``, else midpoints) and sample points ``[R,S,3]``."""
    t_near, t_far = ray_box_interval(origins, directions, radius)
    length = (t_far - t_near).clamp(min=0.0)
    edges = t_near[:, None] + length[:, None] * steps[None]  # [R, S+1]
    t_starts, t_ends = edges[:, :-1], edges[:, 1:]
    if generator is None:
        u = torch.full_like(t_starts, 0.5)
    else:
        u = torch.rand(t_starts.shape, generator=generator, device="cpu").to(t_starts)
    t_mid = t_starts + u * (t_ends - t_starts)
    points = origins[:, None, :] + t_mid[..., None] * directions[:, None, :]
    return t_starts, t_ends, t_mid, points


def _count_queried(origins: Tensor, directions: Tensor, radius: float, steps: Tensor,
                   chunk_rays: int, occupancy: OccupancyGrid,
                   generator: Optional[torch.Generator]) -> int:
    """How many samples of the render ``occupancy`` lets through. The draws are those
    :func:`render_field` then makes (stratified positions, and the budget's order after each
    chunk, since the next chunk's positions follow it in the generator's stream); the generator
    is put back, so the render draws the same numbers and leaves it where it always did."""
    state = None if generator is None else generator.get_state()
    count = 0
    for start in range(0, origins.shape[0], chunk_rays):
        *_, points = _chunk_samples(origins[start:start + chunk_rays],
                                    directions[start:start + chunk_rays], radius, steps,
                                    generator)
        n = int(occupancy.lookup(points).sum())
        count += n
        if generator is not None:
            _budget_order(n, generator)
    if state is not None:
        generator.set_state(state)
    return count


def _composite(directions: Tensor, t_starts: Tensor, t_ends: Tensor, t_mid: Tensor,
               density: Tensor, rgb: Tensor, normal: Optional[Tensor],
               lighting: Optional[Lighting], view: Optional[Tensor]) -> dict:
    """Composite R rays' samples (``t_*`` ``[R,S]``; ``density [R*S]``; ``rgb``, ``normal``
    ``[R,S,3]``; ``directions [R,3]``; ``view [R]`` for lighting): ``rgb [R,3]``,
    ``alpha [R,1]``, ``depth [R,1]``, ``normal [R,3]`` (None without normals)."""
    from nerfacc import render_weight_from_density

    if lighting is not None:
        rgb = lighting.shade(rgb, normal, view)
    # densities are per world unit; the intervals are in camera-z units, |d| world units each.
    # Keep these operations in this order: autograd runs the backward by creation order, and
    # the order in which gradients add up decides their last bits (runs and resumes repeat).
    sigmas = density.reshape(t_mid.shape) * directions.norm(dim=-1, keepdim=True)
    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas)
    out = {"alpha": weights.sum(-1, keepdim=True)}
    out["rgb"] = (weights[..., None] * rgb).sum(1)
    depth = (weights * t_mid).sum(-1, keepdim=True)
    out["depth"] = torch.where(out["alpha"] > 0, depth / out["alpha"].clamp(min=1e-10), 0.0)
    out["normal"] = None if normal is None else (weights[..., None] * normal).sum(1)
    return out


def _composite_split(grad_index: Tensor, directions: Tensor, t_starts: Tensor, t_ends: Tensor,
                     t_mid: Tensor, density: Tensor, rgb: Tensor, normal: Optional[Tensor],
                     lighting: Optional[Lighting], view: Optional[Tensor]) -> dict:
    """:func:`_composite` of a chunk whose samples carry gradients only at the flat indices
    ``grad_index [n]`` (into ``density [R*S]``): the rays without such samples are
    composited without autograd, so the backward keeps per-sample tensors of at most ``n``
    rays."""
    n_rays, n_samples = t_mid.shape
    has_grad = torch.zeros(n_rays, dtype=torch.bool, device=density.device)
    has_grad[grad_index // n_samples] = True
    rays, rest = torch.nonzero(has_grad).squeeze(1), torch.nonzero(~has_grad).squeeze(1)

    def composite(index):
        return _composite(directions[index], t_starts[index], t_ends[index], t_mid[index],
                          density.reshape(n_rays, n_samples)[index].reshape(-1), rgb[index],
                          None if normal is None else normal[index], lighting,
                          None if view is None else view[index])

    with torch.no_grad():
        plain = composite(rest)
    traced = composite(rays)
    out = {}
    for key, value in traced.items():
        if value is not None:
            full = value.new_empty(n_rays, value.shape[-1])
            full[rest] = plain[key]
            value = full.index_put((rays,), value)
        out[key] = value
    return out


def render_field(field, cameras: Cameras, n_samples: int = 64,
                 background: Optional[Tensor] = None, chunk_rays: int = 8192,
                 generator: Optional[torch.Generator] = None,
                 occupancy: Optional[OccupancyGrid] = None, normals: bool = False,
                 lighting: Optional[Lighting] = None,
                 max_grad_samples: Optional[int] = None) -> RenderOutput:
    """Render ``field`` (anything with ``query(points [N,3]) -> (density [N], rgb [N,3])`` and
    ``cfg.radius``; for normals or lighting also ``query_with_normals``) from B cameras.

    Args:
        n_samples: samples per ray, at least 1.
        background: ``[B,3]`` colour or ``[B,H,W,3]`` image behind the field, or None (black).
        chunk_rays: rays rendered at once (bounds the temporaries), at least 1.
        generator: stratified sample positions (and the gradient budget's draw) from it; None
            samples interval midpoints.
        occupancy: query the field only at samples in its occupied cells (density 0 elsewhere).
        normals: also composite the field's normals (unit ``-grad density``) into ``normal``.
        lighting: shade each sample's albedo (:class:`~cfd.renderers.shading.Lighting`); None
            renders the albedo.
        max_grad_samples: at least 1, or None (all samples carry gradients). Exactly
            ``min(max_grad_samples, queried samples)`` samples of the whole render carry
            gradients, the same share of every chunk's queried samples (:class:`GradientBudget`;
            with ``occupancy`` a first pass over the rays counts the queried samples). The
            backward then keeps per-sample tensors only for the rays holding those samples
            (at most ``max_grad_samples * n_samples``), plus a few values per pixel.
    Returns:
        ``rgb [B,H,W,3]``, ``alpha [B,H,W,1]``, ``depth [B,H,W,1]`` (camera z, 0 where alpha is
        0) and, with normals or lighting, ``normal [B,H,W,3]`` (``sum_i w_i n_i``: world frame,
        alpha-weighted, so 0 on empty rays).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples (samples per ray) must be at least 1, got {n_samples}; "
                         "set n_samples to a positive count such as 64")
    if chunk_rays < 1:
        raise ValueError(f"chunk_rays (rays rendered at once) must be at least 1, got "
                         f"{chunk_rays}; leave it at its default or pass a positive count")
    if max_grad_samples is not None and max_grad_samples < 1:
        raise ValueError(f"max_grad_samples must be a positive sample count or None (every "
                         f"sample carries gradients), got {max_grad_samples}")
    B, H, W = len(cameras), cameras.height, cameras.width
    normals = normals or lighting is not None
    directions = cameras.ray_directions().reshape(B, H * W, 3)
    origins = cameras.centers[:, None, :].expand(B, H * W, 3)
    directions, origins = directions.reshape(-1, 3), origins.reshape(-1, 3)
    view = (torch.arange(B, device=cameras.device).repeat_interleave(H * W)
            if lighting is not None else None)
    steps = torch.linspace(0.0, 1.0, n_samples + 1, device=cameras.device,
                           dtype=directions.dtype)
    n_rays, radius = directions.shape[0], field.cfg.radius
    budget = None
    if (max_grad_samples is not None and torch.is_grad_enabled()
            and max_grad_samples < n_rays * n_samples):
        queried = (n_rays * n_samples if occupancy is None else
                   _count_queried(origins, directions, radius, steps, chunk_rays, occupancy,
                                  generator))
        if queried > max_grad_samples:  # else every queried sample carries gradients anyway
            budget = GradientBudget(max_grad_samples, queried)
    chunks = {"rgb": [], "alpha": [], "depth": [], "normal": []}
    for start in range(0, n_rays, chunk_rays):
        d, o = directions[start:start + chunk_rays], origins[start:start + chunk_rays]
        t_starts, t_ends, t_mid, points = _chunk_samples(o, d, radius, steps, generator)
        density, rgb, normal, grad_index = query_samples(
            field, points.reshape(-1, 3), occupancy, normals, budget, generator)
        samples = (d, t_starts, t_ends, t_mid, density, rgb.reshape(*t_mid.shape, 3),
                   normal.reshape(*t_mid.shape, 3) if normals else None, lighting,
                   None if view is None else view[start:start + chunk_rays])
        out = (_composite(*samples) if grad_index is None
               else _composite_split(grad_index, *samples))
        for key, value in out.items():
            chunks[key].append(value)
    rgb, alpha, depth = (torch.cat(chunks[k]).reshape(B, H, W, -1)
                         for k in ("rgb", "alpha", "depth"))
    if background is not None:
        rgb = rgb + (1 - alpha) * (background if background.ndim == 4
                                   else background[:, None, None, :])
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth,
                        normal=torch.cat(chunks["normal"]).reshape(B, H, W, 3) if normals
                        else None,
                        info={"width": W, "height": H, "n_cameras": B, "n_samples": n_samples})
