"""EWA projection of 3D Gaussians, in plain PyTorch.

Matches gsplat's pinhole ``fully_fused_projection`` (with opacities, no compensation): the
Jacobian clamps ``x/z`` and ``y/z`` at 1.3x the half field of view, a 0.3 px low-pass is added
to the 2D covariance, and the opacity-aware extent ``min(3.33, sqrt(2 log(255 o)))`` sets the
per-axis radii. Everything here is differentiable through autograd; the tensors are per Gaussian
(``[B, N, ...]``), small next to the per-pixel work of the rasteriser.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_EXTENT_SIGMAS = 3.33


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from (not necessarily unit) wxyz quaternions. ``[N,4] -> [N,3,3]``."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


class Projection(NamedTuple):
    """Per-camera projected Gaussians; entries with ``radii == 0`` are culled.

    means2d ``[B,N,2]`` pixels; conics ``[B,N,3]`` (upper triangle of the inverse 2D covariance:
    a, b, c); depths ``[B,N]`` camera z; radii ``[B,N,2]`` int32 (x, y) in pixels.
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projection:
    """Project N Gaussians into B pinhole cameras (EWA splatting).

    Args:
        means ``[N,3]``, quats ``[N,4]`` wxyz, scales ``[N,3]`` (activated, > 0),
        opacities ``[N]`` (activated), viewmats ``[B,4,4]`` world-to-camera (OpenCV),
        Ks ``[B,3,3]``.
    """
    R = viewmats[:, :3, :3]  # [B,3,3]
    t = viewmats[:, :3, 3]  # [B,3]
    means_c = torch.einsum("bij,nj->bni", R, means) + t[:, None, :]  # [B,N,3]
    x, y, z = means_c.unbind(-1)

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [B,1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    # Clamp where the Jacobian is evaluated so splats far outside the frustum stay bounded.
    safe_z = torch.where(z.abs() > 1e-6, z, torch.full_like(z, 1e-6))
    u = torch.clamp(x / safe_z, min=-(cx / fx + 0.3 * tan_x), max=(width - cx) / fx + 0.3 * tan_x)
    v = torch.clamp(y / safe_z, min=-(cy / fy + 0.3 * tan_y), max=(height - cy) / fy + 0.3 * tan_y)
    zeros = torch.zeros_like(z)
    J = torch.stack(
        [fx / safe_z, zeros, -fx * u / safe_z, zeros, fy / safe_z, -fy * v / safe_z], dim=-1
    ).reshape(z.shape + (2, 3))  # [B,N,2,3]

    # Sigma = (R_g S)(R_g S)^T, so J R Sigma R^T J^T = T T^T with T = J R R_g S.
    rs = quat_to_rotmat(quats) * scales[:, None, :]  # [N,3,3]
    T = J @ (R[:, None] @ rs[None])  # [B,N,2,3]
    cov_xx = (T[..., 0, :] * T[..., 0, :]).sum(-1) + eps2d
    cov_xy = (T[..., 0, :] * T[..., 1, :]).sum(-1)
    cov_yy = (T[..., 1, :] * T[..., 1, :]).sum(-1) + eps2d
    det = cov_xx * cov_yy - cov_xy * cov_xy
    inv_det = 1.0 / det.clamp(min=1e-10)
    conics = torch.stack([cov_yy * inv_det, -cov_xy * inv_det, cov_xx * inv_det], dim=-1)

    means2d = torch.stack([fx * x / safe_z + cx, fy * y / safe_z + cy], dim=-1)

    with torch.no_grad():
        opac = opacities.detach()[None, :].expand_as(z)
        extent = torch.sqrt(2.0 * torch.log(opac.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extent = extent.clamp(max=MAX_EXTENT_SIGMAS)
        radius_x = torch.ceil(extent * cov_xx.detach().sqrt())
        radius_y = torch.ceil(extent * cov_yy.detach().sqrt())
        mx, my = means2d.detach().unbind(-1)
        valid = (
            (det.detach() > 0)
            & (z.detach() > near_plane)
            & (z.detach() < far_plane)
            & (opac >= ALPHA_THRESHOLD)
            & (mx + radius_x > 0) & (mx - radius_x < width)
            & (my + radius_y > 0) & (my - radius_y < height)
        )
        radii = torch.stack([radius_x, radius_y], dim=-1) * valid[..., None]
        radii = radii.to(torch.int32)
    return Projection(means2d, conics, z, radii)
