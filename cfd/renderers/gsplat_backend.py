"""gsplat's CUDA rasteriser behind our contract. Imported only when the gsplat backend runs."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .types import RenderOutput


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    sh_degree: Optional[int],
    backgrounds: Optional[Tensor],
    near_plane: float,
    far_plane: float,
    eps2d: float,
):
    """Same arguments and result as ``rasterization(..., backend="torch")``; CUDA tensors only,
    already checked by ``rasterization``."""
    try:
        import gsplat
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "backend='gsplat' needs the gsplat package (pip install gsplat); "
            "use backend='torch' instead"
        ) from err

    render, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, backgrounds=backgrounds, render_mode="RGB+ED",
    )
    meta = dict(meta)
    meta.update(backend="gsplat", n_intersections=int(meta["isect_ids"].numel()))
    return RenderOutput(render[..., :3], alphas, render[..., 3:], meta["means2d"], meta["radii"],
                        info=meta)
