"""What every renderer returns, shared by the splat backends and the volume renderer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import Tensor


@dataclass
class RenderOutput:
    """What a renderer returns for B views.

    Attributes:
        rgb: composited colour over the background ``[B,H,W,3]``.
        alpha: accumulated opacity ``[B,H,W,1]``.
        depth: expected camera-z depth ``sum w_i z_i / alpha`` (0 where alpha is 0) ``[B,H,W,1]``.
        means2d: projected centres ``[B,N,2]``; call ``retain_grad()`` before backward to read
            the screen-space gradients densification needs (``None`` for scenes without splats).
        radii: per-axis screen radii ``[B,N,2]`` int32, 0 where culled.
        normal: alpha-weighted world-frame normals ``[B,H,W,3]`` (fields rendered with
            normals; None otherwise).
        info: what gsplat's strategies read (``means2d``, ``radii``, ``width``, ``height``,
            ``n_cameras``) plus backend statistics.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    means2d: Optional[Tensor] = None
    radii: Optional[Tensor] = None
    normal: Optional[Tensor] = None
    info: Dict[str, Any] = field(default_factory=dict)
