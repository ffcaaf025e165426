"""Functional splat rasterisation with one contract and two backends.

``rasterization(...)`` takes plain tensors (the activated values gsplat's ``rasterization`` takes)
and returns a :class:`RenderOutput`. ``backend="torch"`` is our pure-PyTorch tile rasteriser
(CPU or CUDA); ``backend="gsplat"`` calls gsplat's CUDA kernels; ``"auto"`` picks gsplat on CUDA
tensors and torch otherwise.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
from torch import Tensor

from ..cameras import camera_centers
from ..scene.sh import sh_to_rgb
from .composite import composite, tiles_to_images
from .gsplat_backend import rasterize_gsplat
from .projection import project_gaussians
from .tiles import bin_gaussians
from .types import RenderOutput

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "gsplat"]
_LOGGED_CHOICES: set = set()


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend; refuse gsplat where it cannot run."""
    if backend not in ("auto", "torch", "gsplat"):
        raise ValueError(f"unknown render backend {backend!r}; use 'auto', 'torch' or 'gsplat'")
    if backend == "auto":
        chosen = "gsplat" if device.type == "cuda" else "torch"
        if (device.type, chosen) not in _LOGGED_CHOICES:
            _LOGGED_CHOICES.add((device.type, chosen))
            log.info("render backend auto -> %s (device %s)", chosen, device)
        return chosen
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError(
            f"backend='gsplat' needs CUDA tensors, but the scene is on {device}: gsplat has no "
            "CPU rasteriser. Use backend='torch' (or 'auto'), or move the scene to a CUDA device."
        )
    return backend


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  sh_degree) -> None:
    """The contract both backends share: shapes, SH degree against the coefficients given, and
    finite values (the one finiteness check of a splat render)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    N = means.shape[0]
    named = {"means": means, "quats": quats, "scales": scales, "opacities": opacities}
    expected = {"means": (N, 3), "quats": (N, 4), "scales": (N, 3), "opacities": (N,)}
    for name, value in named.items():
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(value.shape)}")
    if colors.ndim not in (2, 3) or colors.shape[0] != N or colors.shape[-1] != 3:
        raise ValueError(f"colors must be [N,3] RGB or [N,K,3] SH, got {tuple(colors.shape)}")
    if colors.ndim == 2 and sh_degree is not None:
        raise ValueError(f"sh_degree={sh_degree} is set but colors are RGB [N,3]; pass SH "
                         "coefficients [N,K,3] or sh_degree=None")
    if colors.ndim == 3:
        K = colors.shape[1]
        if sh_degree is None or not 0 <= sh_degree <= 3 or (sh_degree + 1) ** 2 > K:
            raise ValueError(f"colors are {K} SH coefficients per splat [N,K,3]: pass sh_degree "
                             f"in 0..3 with (sh_degree+1)^2 <= K, got sh_degree={sh_degree}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"viewmats must be [B,4,4] (a batch, even of one camera), got "
                         f"{tuple(viewmats.shape)}")
    if tuple(Ks.shape) != (viewmats.shape[0], 3, 3):
        raise ValueError(f"Ks must be [B,3,3] with B={viewmats.shape[0]} as viewmats, got "
                         f"{tuple(Ks.shape)}")
    checked = {**named, "colors": colors, "viewmats": viewmats, "Ks": Ks}
    # one host read for all of them: each read waits for the GPU
    finite = torch.stack([torch.isfinite(v).all() for v in checked.values()]).tolist()
    for name, ok in zip(checked, finite):
        if ok:
            continue
        if name in ("viewmats", "Ks"):
            raise ValueError(f"{name} contains NaN or Inf; check the camera poses you built")
        raise ValueError(
            f"{name} contains NaN or Inf; the scene diverged or was loaded from a broken "
            "file (lower the learning rate or re-initialise the splats)"
        )


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    backgrounds: Optional[Tensor] = None,
    backend: Backend = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 8,
    chunk_size: int = 32,
) -> RenderOutput:
    """Render N Gaussians into B pinhole cameras.

    Args:
        means ``[N,3]``; quats ``[N,4]`` wxyz (normalised inside); scales ``[N,3]`` > 0;
        opacities ``[N]`` in (0,1); colors ``[N,3]`` RGB, or ``[N,K,3]`` SH coefficients with
        ``sh_degree`` set (``K >= (sh_degree+1)^2``; colour ``= max(SH + 0.5, 0)``; leave
        ``sh_degree`` None with RGB); viewmats ``[B,4,4]`` world-to-camera (OpenCV); Ks
        ``[B,3,3]``;
        backgrounds ``[B,3]`` or ``[3]`` RGB composited behind (default black).
        tile_size, chunk_size: torch-backend tiling (results do not depend on them).
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  sh_degree)
    B = viewmats.shape[0]
    if backgrounds is not None:
        backgrounds = torch.as_tensor(backgrounds, dtype=means.dtype, device=means.device)
        backgrounds = backgrounds.expand(B, 3)
    chosen = resolve_backend(backend, means.device)
    if means.shape[0] == 0:
        return _empty(B, width, height, means, backgrounds)
    if chosen == "gsplat":
        return rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
            backgrounds, near_plane, far_plane, eps2d,
        )

    proj = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d
    )
    if colors.ndim == 3:
        rgb = sh_to_rgb(colors, means, camera_centers(viewmats), sh_degree)
    else:
        rgb = colors[None].expand(B, -1, -1)
    features = torch.cat([rgb, proj.depths[..., None]], dim=-1).reshape(-1, 4)
    opac = opacities[None].expand(B, -1).reshape(-1)
    bins = bin_gaussians(proj.means2d, proj.radii, proj.depths, width, height, tile_size, chunk_size)
    feat_tiles, t_tiles = composite(
        proj.means2d.reshape(-1, 2), proj.conics.reshape(-1, 3), opac, features, bins
    )
    accum = tiles_to_images(feat_tiles, bins, width, height)  # [B,H,W,4]
    transmittance = tiles_to_images(t_tiles, bins, width, height)[..., None]
    alpha = 1.0 - transmittance
    rgb_img = accum[..., :3]
    if backgrounds is not None:
        rgb_img = rgb_img + transmittance * backgrounds[:, None, None, :]
    depth = accum[..., 3:] / alpha.clamp(min=1e-10)
    info = {
        "means2d": proj.means2d, "radii": proj.radii, "depths": proj.depths, "gaussian_ids": None,
        "width": width, "height": height, "n_cameras": B,
        "n_intersections": bins.n_intersections, "backend": "torch",
    }
    return RenderOutput(rgb_img, alpha, depth, proj.means2d, proj.radii, info=info)


def _empty(B: int, width: int, height: int, like: Tensor, backgrounds: Optional[Tensor]):
    """An empty scene renders the background with zero alpha and depth. Nothing in it depends
    on a parameter, so it has no autograd graph: the training loops refuse empty scenes."""
    zeros = like.new_zeros(B, height, width, 1)
    rgb = like.new_zeros(B, height, width, 3)
    if backgrounds is not None:
        rgb = rgb + backgrounds[:, None, None, :]
    info = {"width": width, "height": height, "n_cameras": B, "n_intersections": 0}
    return RenderOutput(rgb, zeros, zeros.clone(), info=info)
