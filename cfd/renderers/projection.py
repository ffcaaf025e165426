"""EWA projection of 3D Gaussians and spherical-harmonics colour, in plain PyTorch.

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


# Real spherical-harmonics basis up to degree 3 (the convention of 3D Gaussian Splatting and gsplat).
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
          0.5462742152960396)
_SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
          -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis values for unit directions. ``[..., 3] -> [..., (degree+1)^2]``."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    out = [torch.full_like(dirs[..., 0], _SH_C0)]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_SH_C2[0] * xy, _SH_C2[1] * yz, _SH_C2[2] * (2 * zz - xx - yy),
                _SH_C2[3] * xz, _SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _SH_C3[0] * y * (3 * xx - yy),
            _SH_C3[1] * xy * z,
            _SH_C3[2] * y * (4 * zz - xx - yy),
            _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _SH_C3[4] * x * (4 * zz - xx - yy),
            _SH_C3[5] * z * (xx - yy),
            _SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """DC coefficient that renders as ``rgb`` (inverse of ``C0 * sh0 + 0.5``)."""
    return (rgb - 0.5) / _SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    return sh0 * _SH_C0 + 0.5


def sh_to_rgb(coeffs: Tensor, means: Tensor, camera_centers: Tensor, degree: int) -> Tensor:
    """View-dependent colour per camera, as gsplat: ``max(SH(dir) + 0.5, 0)``.

    Args:
        coeffs ``[N,K,3]`` with ``K >= (degree+1)^2``; means ``[N,3]``; camera_centers ``[B,3]``.
    Returns:
        ``[B,N,3]``.
    """
    n_basis = (degree + 1) ** 2
    if degree == 0:
        return (coeffs[None, :, 0, :] * _SH_C0 + 0.5).clamp(min=0.0).expand(
            camera_centers.shape[0], -1, -1
        )
    dirs = torch.nn.functional.normalize(means[None] - camera_centers[:, None], dim=-1)
    basis = sh_basis(degree, dirs)  # [B,N,n_basis]
    rgb = torch.einsum("bnk,nkc->bnc", basis, coeffs[:, :n_basis, :])
    return (rgb + 0.5).clamp(min=0.0)
