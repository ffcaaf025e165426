"""Which voxels the observation shows: project voxel centres into the observation camera.

Per voxel: its centre ``(v + 0.5) / R - 0.5`` in the generator's box goes through the camera
(OpenCV convention, ``cfd.cameras.Cameras``); a z-buffer keeps each pixel's nearest voxel depth,
widened by a min-pool over about ``dilate_scale`` voxel footprints (so the surface has no holes
between voxel centres); a voxel at depth ``d`` behind the surface depth ``d_s`` at its pixel is
visible with weight ``exp(-falloff (max(0, d - d_s) / tau)^2)``, ``tau = tolerance_scale``
voxel sizes. Voxels behind the camera or outside the image get 0. An optional image mask
(the object's alpha) multiplies the result, so voxels seen through the background count as
unseen.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cfd.cameras import Cameras


@torch.no_grad()
def voxel_visibility(coords: Tensor, resolution: int, camera: Cameras,
                     image_mask: Optional[Tensor] = None, dilate_scale: float = 1.5,
                     tolerance_scale: float = 1.5, falloff: float = 3.0) -> Tensor:
    """Visibility in [0, 1] of voxels ``coords [N, 3]`` (grid indices at ``resolution``) from one
    camera (``len(camera) == 1``); ``image_mask [H, W]`` in [0, 1]. Returns ``[N]``."""
    if len(camera) != 1:
        raise ValueError(f"visibility needs exactly one observation camera, got {len(camera)}")
    H, W = camera.height, camera.width
    if image_mask is not None and tuple(image_mask.shape) != (H, W):
        raise ValueError(f"image mask is {tuple(image_mask.shape)}, the camera {H}x{W}")
    voxel = 1.0 / resolution
    centres = (coords.float() + 0.5) * voxel - 0.5
    viewmat, K = camera.viewmats[0].to(centres), camera.Ks[0].to(centres)
    cam = centres @ viewmat[:3, :3].T + viewmat[:3, 3]
    depth = cam[:, 2]
    front = depth > 1e-4
    safe = torch.where(front, depth, torch.ones_like(depth))
    u = K[0, 0] * cam[:, 0] / safe + K[0, 2]
    v = K[1, 1] * cam[:, 1] / safe + K[1, 2]
    px, py = u.floor().long(), v.floor().long()
    inside = front & (px >= 0) & (px < W) & (py >= 0) & (py < H)
    pixel = (py * W + px).clamp(0, H * W - 1)
    zbuffer = torch.full((H * W,), float("inf"), device=centres.device)
    zbuffer.scatter_reduce_(0, pixel[inside], depth[inside], reduce="amin")
    # min-pool over about dilate_scale voxel footprints at the object's depth
    footprint = float(K[0, 0]) * voxel / float(depth[inside].median()) if inside.any() else 1.0
    size = max(1, int(round(dilate_scale * footprint)))
    size += 1 - size % 2
    surface = -F.max_pool2d(-zbuffer.view(1, 1, H, W), size, stride=1, padding=size // 2).view(-1)
    behind = (depth - surface[pixel]).clamp(min=0) / (tolerance_scale * voxel)
    visibility = torch.where(inside, torch.exp(-falloff * behind ** 2), torch.zeros_like(depth))
    if image_mask is not None:
        visibility = visibility * torch.where(inside, image_mask.reshape(-1).to(visibility)[pixel],
                                              torch.zeros_like(visibility))
    return visibility
