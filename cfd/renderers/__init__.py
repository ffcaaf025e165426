"""Differentiable renderers: scene + cameras -> (rgb, alpha, depth). They know nothing of guidance.

``render(scene, cameras)`` is the entry point; ``rasterization(...)`` is the functional splat
rasteriser on plain tensors (the shape of gsplat's API), with a pure-PyTorch backend for CPU.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..cameras import Cameras
from ..scene import NeRFField, Splats
from .rasterize import Backend, rasterization, resolve_backend
from .types import RenderOutput
from .volume import render_field

BackgroundLike = Union[None, float, Sequence[float], Tensor]


def _background(background: BackgroundLike, cameras: Cameras, like: Tensor) -> Optional[Tensor]:
    """The background as ``[B,3]`` (one colour per view) or ``[B,H,W,3]`` (an image per view)."""
    if background is None:
        return None
    B, H, W = len(cameras), cameras.height, cameras.width
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.ndim == 0:
        bg = bg.expand(3)
    if bg.shape not in ((3,), (B, 3), (B, H, W, 3)):
        raise ValueError(f"background must be a scalar, [3] or [B,3] RGB, or a [B,H,W,3] image "
                         f"(B={B}, H={H}, W={W}), got {tuple(bg.shape)}")
    return bg if bg.ndim == 4 else bg.expand(B, 3)


def render(
    scene,
    cameras: Cameras,
    backend: Backend = "auto",
    background: BackgroundLike = None,
    **kwargs,
) -> RenderOutput:
    """Render a scene from a batch of cameras.

    Args:
        scene: a :class:`cfd.scene.Splats` or :class:`cfd.scene.NeRFField` (on the cameras'
            device).
        cameras: B cameras, all ``W x H``.
        backend: ``"auto"`` (gsplat on CUDA, torch otherwise), ``"torch"`` or ``"gsplat"``.
        background: RGB behind the scene: a scalar, ``[3]``, ``[B,3]`` or a ``[B,H,W,3]`` image
            (a learned background's); default black.
        kwargs: passed to :func:`rasterization` (near_plane, far_plane, eps2d, tile_size, ...)
            or, for a NeRF, to :func:`render_field` (n_samples, chunk_rays, generator,
            occupancy, normals, lighting, max_grad_samples).
    Returns:
        :class:`RenderOutput` with ``rgb [B,H,W,3]``, ``alpha [B,H,W,1]``, ``depth [B,H,W,1]``
        (and a field's ``normal [B,H,W,3]`` when asked for).
    """
    if isinstance(scene, NeRFField):
        if scene.device != cameras.device:
            raise ValueError(f"field is on {scene.device} but cameras are on {cameras.device}; "
                             "move one with .to()")
        bad = scene.check_finite()
        if bad is not None:
            raise ValueError(f"NeRF parameter '{bad}' contains NaN or Inf; the optimisation "
                             "diverged (lower the learning rates) or the weights are broken")
        if backend not in ("auto", "torch"):
            raise ValueError(f"a NeRF renders with nerfacc; backend {backend!r} is for splats")
        background = _background(background, cameras, cameras.viewmats)
        return render_field(scene, cameras, background=background, **kwargs)
    if not isinstance(scene, Splats):
        raise TypeError(f"render() takes a Splats or NeRFField scene, got {type(scene).__name__}")
    if scene.device != cameras.device:
        raise ValueError(
            f"scene is on {scene.device} but cameras are on {cameras.device}; move one with .to()"
        )
    viewmats = cameras.viewmats.to(scene.means.dtype)
    background = _background(background, cameras, viewmats)
    per_pixel = background is not None and background.ndim == 4
    out = rasterization(
        scene.means, scene.quats, scene.scales, scene.opacities, scene.sh_coeffs,
        viewmats, cameras.Ks.to(viewmats.dtype), cameras.width, cameras.height,
        sh_degree=scene.sh_degree,
        backgrounds=None if per_pixel else background,
        backend=backend,
        **kwargs,
    )
    if per_pixel:  # the rasterisers take one colour per view; an image goes on afterwards
        out.rgb = out.rgb + (1 - out.alpha) * background
    return out


__all__ = ["render", "rasterization", "render_field", "RenderOutput", "resolve_backend"]
