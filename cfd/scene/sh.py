"""Real spherical harmonics up to degree 3: the scene's view-dependent colour representation.

The convention of 3D Gaussian Splatting and gsplat: colour = ``max(sum_k SH_k(dir) c_k + 0.5, 0)``
with ``dir`` the unit vector from the camera centre to the point. Splats store their coefficients
in it (``sh0``, ``shN``) and the learned background reads its directions through the same basis.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
