"""Multi-view-consistent Gaussian noise for distillation.

The noise of a view is a fixed function of the visible surface: every latent cell's footprint on
the surface is rasterised into fixed world-space white-noise textures, and the cell's noise is the
sum of the texels it owns divided by the square root of their number. So:

* each cell is exactly N(0, 1) (a normalised sum of i.i.d. N(0, 1) texels);
* the cells of one view are independent: per (view, map, shell) a depth test gives every texel
  to at most one triangle, hence to at most one cell;
* a surface patch owns the same texels from every camera, so it gets the same noise in every view.

Textures are indexed by an equal-area map of the direction from the origin (``sphere_map``),
``n_maps`` axis orders / depth-test signs and ``n_shells`` radial shells of the ``bound`` ball (a
triangle belongs to the shell of its centroid). Cells that own no texel (background, footprints
too small, slivers across a map seam) take a background noise fixed in screen space for the run.
``refresh(gamma)`` moves textures and background by ``eps <- sqrt(1-gamma) eps + sqrt(gamma) xi``.
The rasterisation is plain PyTorch; it runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .sphere_map import MAP_LAYOUTS, sphere_to_square

# Triangles whose texel bounding boxes fit these squares are enumerated as dense blocks.
_BLOCK_SIZES = (2, 4, 8)


@dataclass
class NoiseConfig:
    """``mode``: "consistent" (CFD) or "iid" (fresh noise every call: the SDS baseline)."""

    mode: str = "consistent"
    texture_resolution: int = 256
    n_maps: int = 6
    n_shells: int = 4
    bound: float = 1.0
    opacity_threshold: float = 0.1
    smooth_footprints: bool = True
    # Triangles longer than this fraction of the texture side (slivers across a map seam) are
    # left out of that map rather than allowed to claim a long strip of texels.
    max_triangle_extent: float = 0.125
    gamma: float = 0.0


def _cover(row: Tensor, px: Tensor, py: Tensor):
    """Whether texel centres lie in a triangle, and the interpolated depth there (inf outside).

    ``row`` holds (u0, v0, u1, v1, u2, v2, z0, z1, z2) along dim 0, broadcastable to ``px``.
    """
    ax, ay, bx, by, cx, cy, z0, z1, z2 = row
    qx, qy = px.to(ax.dtype) + 0.5, py.to(ax.dtype) + 0.5
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    w0 = ((cx - bx) * (qy - by) - (cy - by) * (qx - bx)) / area
    w1 = ((ax - cx) * (qy - cy) - (ay - cy) * (qx - cx)) / area
    w2 = 1 - w0 - w1
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (area.abs() > 1e-12)
    return inside, torch.where(inside, w0 * z0 + w1 * z1 + w2 * z2, torch.inf)


class IIDNoise:
    """Fresh i.i.d. N(0, 1) noise on every call (SDS)."""

    def __init__(self, cfg: NoiseConfig, channels: int, device, seed: int = 0):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self, points: Tensor, opacity: Tensor, latent_shape) -> Tensor:
        B = points.shape[0]
        return torch.randn((B, *latent_shape), generator=self.generator, device=self.device)

    def refresh(self, gamma: float) -> None:
        """Nothing to refresh: every call is fresh."""

    def state_dict(self) -> Dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


class ConsistentNoise:
    """World-space noise textures and the per-view cell noise built from them."""

    def __init__(self, cfg: NoiseConfig, channels: int, device, seed: int = 0):
        if not 1 <= cfg.n_maps <= len(MAP_LAYOUTS):
            raise ValueError(f"n_maps must be in 1..{len(MAP_LAYOUTS)}, got {cfg.n_maps}")
        if cfg.texture_resolution < 8 or cfg.n_shells < 1:
            raise ValueError("texture_resolution must be >= 8 and n_shells >= 1")
        self.cfg = cfg
        self.channels = channels
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        R = cfg.texture_resolution
        self.textures = torch.randn((cfg.n_maps, cfg.n_shells, R * R, channels),
                                    generator=self.generator, device=self.device)
        self.background: Optional[Tensor] = None  # [C,h,w], made on first use

    # -- state ----------------------------------------------------------------------------------
    def refresh(self, gamma: float) -> None:
        """SDE step of the noise: ``eps <- sqrt(1-gamma) eps + sqrt(gamma) xi``."""
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if gamma == 0.0:
            return
        keep, add = math.sqrt(1.0 - gamma), math.sqrt(gamma)
        fresh = torch.randn(self.textures.shape, generator=self.generator, device=self.device)
        self.textures.mul_(keep).add_(fresh, alpha=add)
        if self.background is not None:
            fresh = torch.randn(self.background.shape, generator=self.generator, device=self.device)
            self.background.mul_(keep).add_(fresh, alpha=add)

    def state_dict(self) -> Dict[str, Tensor]:
        state = {"textures": self.textures.clone(), "generator": self.generator.get_state()}
        if self.background is not None:
            state["background"] = self.background.clone()
        return state

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.textures = state["textures"].to(self.device).clone()
        self.generator.set_state(state["generator"])
        self.background = state["background"].to(self.device).clone() if "background" in state else None

    def _background(self, latent_shape: Tuple[int, int, int]) -> Tensor:
        if self.background is None or tuple(self.background.shape) != tuple(latent_shape):
            self.background = torch.randn(latent_shape, generator=self.generator, device=self.device)
        return self.background

    # -- noise ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, points: Tensor, opacity: Tensor, latent_shape) -> Tensor:
        """Noise for B views.

        Args:
            points: world-space surface point per pixel ``[B,H,W,3]`` (camera centre plus
                expected depth times the ray); opacity ``[B,H,W]`` or ``[B,H,W,1]``;
            latent_shape: ``(C, h, w)`` with ``H % h == W % w == 0`` and ``H/h == W/w``.
        Returns:
            ``[B, C, h, w]``.
        """
        C, h, w = latent_shape
        B, H, W = points.shape[:3]
        if C != self.channels:
            raise ValueError(f"noise textures have {self.channels} channels, latents {C}")
        if H % h or W % w or H // h != W // w:
            raise ValueError(f"render {H}x{W} must be an integer multiple of the latent grid {h}x{w}")
        opacity = opacity.reshape(B, H, W).float()
        corners, corner_opacity = self._corners(points.float(), opacity, H // h)  # [B,h+1,w+1,.]
        tri_vertices, tri_cells = self._triangles(corners, corner_opacity)
        sums = torch.zeros(B * h * w, C, device=self.device)
        counts = torch.zeros(B * h * w, device=self.device)
        if tri_cells.numel():
            texels, cells, maps, shells = self._rasterise(tri_vertices, tri_cells, B, h * w)
            values = self.textures[maps, shells, texels]
            sums.index_add_(0, cells, values)
            counts.index_add_(0, cells, torch.ones_like(cells, dtype=counts.dtype))
        noise = sums / counts.clamp(min=1).sqrt()[:, None]
        noise = noise.reshape(B, h, w, C).permute(0, 3, 1, 2)
        empty = (counts == 0).reshape(B, 1, h, w)
        return torch.where(empty, self._background(latent_shape)[None], noise)

    def _corners(self, points: Tensor, opacity: Tensor, stride: int):
        """Footprint corners ``[B,h+1,w+1,3]`` and their opacities ``[B,h+1,w+1]``."""
        B, H, W = opacity.shape
        if self.cfg.smooth_footprints:
            k = 2 * ((stride + 1) // 2)
            mask = (opacity > self.cfg.opacity_threshold).float()[:, None]
            pts = points.permute(0, 3, 1, 2)
            pool = lambda x: F.avg_pool2d(x, k, stride, padding=k // 2)  # noqa: E731
            weight = pool(mask)
            corners = pool(pts * mask) / weight.clamp(min=1e-8)
            corner_opacity = F.avg_pool2d(opacity[:, None], k, stride, padding=k // 2,
                                          count_include_pad=False)
            return corners.permute(0, 2, 3, 1), corner_opacity[:, 0]
        ys = torch.arange(0, H + 1, stride, device=points.device).clamp(max=H - 1)
        xs = torch.arange(0, W + 1, stride, device=points.device).clamp(max=W - 1)
        return points[:, ys][:, :, xs], opacity[:, ys][:, :, xs]

    def _triangles(self, corners: Tensor, corner_opacity: Tensor):
        """Two triangles per cell over the corner grid; those with all corners opaque.

        Returns vertices ``[T,3,3]`` and the flat cell index ``b*h*w + i*w + j`` of each.
        """
        B, h1, w1 = corner_opacity.shape
        h, w = h1 - 1, w1 - 1
        c00, c01 = corners[:, :-1, :-1], corners[:, :-1, 1:]
        c10, c11 = corners[:, 1:, :-1], corners[:, 1:, 1:]
        o00, o01 = corner_opacity[:, :-1, :-1], corner_opacity[:, :-1, 1:]
        o10, o11 = corner_opacity[:, 1:, :-1], corner_opacity[:, 1:, 1:]
        thr = self.cfg.opacity_threshold
        verts = torch.stack([torch.stack([c00, c01, c10], -2), torch.stack([c01, c10, c11], -2)], 3)
        opaque = torch.stack([(o00 > thr) & (o01 > thr) & (o10 > thr),
                              (o01 > thr) & (o10 > thr) & (o11 > thr)], -1)  # [B,h,w,2]
        cell = torch.arange(B * h * w, device=corners.device).reshape(B, h, w, 1).expand(B, h, w, 2)
        return verts[opaque], cell[opaque]

    def _rasterise(self, vertices: Tensor, cells: Tensor, n_views: int, cells_per_view: int):
        """Texels owned by each triangle in every (view, map, shell) pass, after the depth test.

        Returns flat texel index, cell, map and shell per owned texel.
        """
        cfg, R = self.cfg, self.cfg.texture_resolution
        T, device = vertices.shape[0], vertices.device
        radius = vertices.mean(1).norm(dim=-1)
        shell = (radius / cfg.bound * cfg.n_shells).long().clamp(0, cfg.n_shells - 1)
        # One row per (map, triangle): texel coordinates of the corners and their depths.
        perms = torch.tensor([MAP_LAYOUTS[m][0] for m in range(cfg.n_maps)], device=device)
        signs = torch.tensor([MAP_LAYOUTS[m][1] for m in range(cfg.n_maps)], device=device)
        p = vertices[:, :, perms].permute(2, 0, 1, 3)  # [M,T,3,3]
        uv = (sphere_to_square(p) + 1) * (0.5 * R)
        z = signs[:, None, None] * vertices.norm(dim=-1)[None]
        rows = torch.cat([uv.reshape(-1, 6), z.reshape(-1, 3)], -1)
        tri = torch.arange(T, device=device).repeat(cfg.n_maps)
        map_index = torch.arange(cfg.n_maps, device=device).repeat_interleave(T)
        view_shell = (cells // cells_per_view * cfg.n_maps * cfg.n_shells + shell).repeat(cfg.n_maps)
        key_base = (view_shell + map_index * cfg.n_shells) * (R * R)
        meta = torch.stack([tri, map_index, key_base], -1)
        uv = rows[:, :6].reshape(-1, 3, 2)
        lo = torch.ceil(uv.min(1).values - 0.5).long().clamp(0, R - 1)
        hi = torch.floor(uv.max(1).values - 0.5).long().clamp(0, R - 1)
        span = (hi - lo + 1).clamp(min=0)
        extent = (uv.max(1).values - uv.min(1).values).max(-1).values
        span = span * (extent <= cfg.max_triangle_extent * R)[:, None]
        counts = span[:, 0] * span[:, 1]

        # One candidate per texel centre in each row's bounding box. Small boxes go as dense
        # blocks (row values broadcast, no per-candidate gathers), grouped by size so little of
        # each block is wasted; the few large boxes as a ragged list.
        hits = []
        assigned = counts == 0
        for size in _BLOCK_SIZES:
            fits = ~assigned & (span <= size).all(-1)
            assigned |= fits
            sel = torch.nonzero(fits)[:, 0]
            offsets = torch.arange(size * size, device=device)
            ox, oy = offsets % size, offsets // size
            px, py = lo[sel, 0:1] + ox, lo[sel, 1:2] + oy
            inside, depth = _cover(rows[sel].T[:, :, None], px, py)
            hit = torch.nonzero((inside & (ox < span[sel, 0:1]) & (oy < span[sel, 1:2])).reshape(-1))[:, 0]
            hits.append((sel[hit // (size * size)], (py * R + px).reshape(-1)[hit],
                         depth.reshape(-1)[hit]))
        big = torch.nonzero(~assigned)[:, 0]
        big_owner = torch.repeat_interleave(big, counts[big])
        local = torch.arange(big_owner.shape[0], device=device) - torch.repeat_interleave(
            torch.cumsum(counts[big], 0) - counts[big], counts[big])
        sx = span[big_owner, 0]
        px, py = lo[big_owner, 0] + local % sx, lo[big_owner, 1] + local // sx
        inside, depth = _cover(rows[big_owner].T, px, py)
        hit = torch.nonzero(inside)[:, 0]
        hits.append((big_owner[hit], (py * R + px)[hit], depth[hit]))
        owner, texel, depth = (torch.cat(parts) for parts in zip(*hits))
        m = meta[owner]

        # Depth test per (view, map, shell): each texel goes to the nearest candidate, ties to
        # the lowest triangle index, so no texel feeds two cells of one view.
        key = m[:, 2] + texel
        n_keys = n_views * cfg.n_maps * cfg.n_shells * R * R
        zbuf = torch.full((n_keys,), torch.inf, device=device)
        zbuf.scatter_reduce_(0, key, depth, reduce="amin")
        win = depth == zbuf[key]
        first = torch.full((n_keys,), T, device=device, dtype=torch.long)
        first.scatter_reduce_(0, key, torch.where(win, m[:, 0], T), reduce="amin")
        win &= m[:, 0] == first[key]
        idx = torch.nonzero(win)[:, 0]
        t = m[idx, 0]
        return texel[idx], cells[t], m[idx, 1], shell[t]
