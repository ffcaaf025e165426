"""Renders of a scene in GPTEval3D's layout, for its judge or any tool that reads that layout.

What GPTEval3D expects (github.com/3DTopia/GPTEval3D, read 2026-12):

* README, "Preparing the data": for each prompt, render 120 evenly spaced views "using the
  camera angle chosen by the threestudio codebase", at 512 x 512, each RGB render with its
  surface-normal render, into ``<method>/<prompt-id>/<seed>/rgb_<i>.png`` and
  ``normal_<i>.png``; prompt ids count from 0 in the tournament's ``prompts.json``.
* ``gpteval3d/utils/t23d_tournament.py`` (``T23DMethod``): the loader parses *every* entry of
  the method folder as an integer prompt id (so nothing else may sit there), globs
  ``rgb_*.png`` / ``normal_*.png`` in the seed folder and opens ``rgb_%d.png``: the view index
  is written unpadded (the README's ``rgb_001.png`` example is padded, the loader is not). It
  shows views ``0, 120/n, 2*120/n, ...`` for n views per comparison.

threestudio's test cameras (``threestudio/data/uncond.py``, ``RandomCameraDataModuleConfig``
and ``RandomCameraDataset``): ``n_test_views = 120`` at azimuths
``torch.linspace(0, 360, 120)`` (so the first and last views coincide: 360/119 degrees apart),
``eval_elevation_deg = 15``, ``eval_camera_distance = 1.5``, ``eval_fovy_deg = 70``, 512 x 512,
world z up, looking at the origin; its poses are OpenGL camera-to-world matrices with columns
(right, up, backward, position). Its normal images (``comp_normal`` in its NeRF renderer) are
world-frame unit normals encoded as ``(n + 1) / 2`` times the opacity: black where empty.
:func:`gpteval3d_cameras` rebuilds those cameras (the engine's orbit cameras place and turn a
camera exactly as threestudio does), and the seed folder also gets ``cameras.json`` with each
view's threestudio pose.

Splats render no normals, so theirs come from the rendered depth (:func:`depth_to_normals`):
each pixel is lifted to a camera-space point, the surface tangents are finite differences to
the neighbouring pixels (of the two one-sided differences, the one with the smaller depth step,
so the silhouette of a nearer surface is not differenced across), and the normal is their
cross product, turned to the world frame. A NeRF renders its normals (``render(...,
normals=True)``: the field's ``-grad density``, alpha-weighted), normalised here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from core.runtime import write_json

from ..cameras import Cameras, orbit_cameras, viewmats_to_opengl_c2w
from ..renderers import render
from ..scene import NeRFField
from ..utils.media import save_image

GPTEVAL3D_VIEWS = 120
GPTEVAL3D_RESOLUTION = 512
THREESTUDIO_ELEVATION_DEG = 15.0
THREESTUDIO_DISTANCE = 1.5
THREESTUDIO_FOV_Y_DEG = 70.0


def gpteval3d_cameras(n_views: int = GPTEVAL3D_VIEWS, resolution: int = GPTEVAL3D_RESOLUTION,
                      elevation_deg: float = THREESTUDIO_ELEVATION_DEG,
                      distance: float = THREESTUDIO_DISTANCE,
                      fov_y_deg: float = THREESTUDIO_FOV_Y_DEG,
                      device: Union[str, torch.device] = "cpu") -> Cameras:
    """threestudio's test orbit: ``n_views`` cameras at azimuths ``linspace(0, 360, n_views)``
    (degrees, both ends included as threestudio does), one elevation, distance and vertical
    field of view, ``resolution`` pixels square (module docstring)."""
    if n_views < 2:
        raise ValueError(f"n_views must be >= 2 (threestudio's orbit spans 0 to 360 degrees), "
                         f"got {n_views}")
    azimuth = torch.linspace(0.0, 360.0, n_views)
    full = torch.full((n_views,), 1.0)
    return orbit_cameras(full * elevation_deg, azimuth, full * distance, full * fov_y_deg,
                         resolution, resolution).to(device)


def _one_sided_difference(points: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Finite difference of ``points [B,H,W,3]`` along pixel axis ``dim`` (1 rows, 2 columns)
    to a valid neighbour: the forward or backward one with the smaller depth step, the only
    valid one, or 0 with neither. ``valid [B,H,W]``."""
    size = points.shape[dim]
    index = torch.arange(size, device=points.device)
    shape = [1, 1, 1]
    shape[dim] = size
    has_next, has_previous = (index < size - 1).reshape(shape), (index > 0).reshape(shape)
    forward = torch.roll(points, -1, dim) - points
    backward = points - torch.roll(points, 1, dim)
    next_valid = torch.roll(valid, -1, dim) & has_next & valid
    previous_valid = torch.roll(valid, 1, dim) & has_previous & valid
    use_forward = next_valid & (~previous_valid | (forward[..., 2].abs() <= backward[..., 2].abs()))
    zero = torch.zeros_like(points)
    return torch.where(use_forward[..., None], forward,
                       torch.where(previous_valid[..., None], backward, zero))


def depth_to_normals(depth: Tensor, alpha: Tensor, cameras: Cameras,
                     alpha_threshold: float = 0.5) -> Tensor:
    """World-frame unit normals from rendered camera-z depth (module docstring), facing the
    camera; 0 where ``alpha <= alpha_threshold`` or no neighbour is on the surface.

    Args:
        depth, alpha: ``[B,H,W,1]`` as the renderers return them; cameras: the B cameras.
    Returns:
        ``[B,H,W,3]``.
    """
    B, H, W = len(cameras), cameras.height, cameras.width
    if depth.shape != (B, H, W, 1) or alpha.shape != (B, H, W, 1):
        raise ValueError(f"depth and alpha must be [B,H,W,1] = {(B, H, W, 1)}, got "
                         f"{tuple(depth.shape)} and {tuple(alpha.shape)}")
    Ks = cameras.Ks.to(depth.dtype)
    rows, cols = torch.meshgrid(torch.arange(H, dtype=depth.dtype, device=depth.device) + 0.5,
                                torch.arange(W, dtype=depth.dtype, device=depth.device) + 0.5,
                                indexing="ij")
    x = (cols[None] - Ks[:, 0, 2, None, None]) / Ks[:, 0, 0, None, None]
    y = (rows[None] - Ks[:, 1, 2, None, None]) / Ks[:, 1, 1, None, None]
    points = torch.stack([x, y, torch.ones_like(x)], -1) * depth  # camera space (OpenCV)
    valid = (alpha[..., 0] > alpha_threshold) & (depth[..., 0] > 0)
    along_columns = _one_sided_difference(points, valid, 2)
    along_rows = _one_sided_difference(points, valid, 1)
    # x right, y down: rows x columns points towards the camera for a surface facing it
    normals = F.normalize(torch.cross(along_rows, along_columns, dim=-1), dim=-1)
    # the visible side of a surface faces the camera; flip any rounding strays
    normals = torch.where(((normals * points).sum(-1, keepdim=True) > 0), -normals, normals)
    normals = normals * valid[..., None]
    rotations = cameras.viewmats[:, :3, :3].to(depth.dtype)  # rows: camera axes in world
    return torch.einsum("bji,bhwj->bhwi", rotations, normals)


def encode_normals(normals: Tensor, alpha: Tensor) -> Tensor:
    """threestudio's normal image: ``(n + 1) / 2 * alpha`` (black where empty).
    ``[B,H,W,3]``, ``[B,H,W,1] -> [B,H,W,3]`` in [0, 1]."""
    return ((normals + 1) / 2 * alpha).clamp(0, 1)


def _threestudio_poses(cameras: Cameras) -> list:
    """Each camera as threestudio describes it: OpenGL camera-to-world, angles, field of
    view (degrees)."""
    c2w = viewmats_to_opengl_c2w(cameras.viewmats.double())
    fov_y = torch.rad2deg(2 * torch.atan(0.5 * cameras.height / cameras.Ks[:, 1, 1].double()))
    return [{"c2w": c2w[i].tolist(), "elevation_deg": float(cameras.elevation[i]),
             "azimuth_deg": float(cameras.azimuth[i]),
             "camera_distance": float(cameras.distance[i]), "fovy_deg": float(fov_y[i])}
            for i in range(len(cameras))]


@torch.no_grad()
def export_gpteval3d(scene, method_dir: Union[str, os.PathLike], prompt_id: int, seed: int = 0,
                     n_views: int = GPTEVAL3D_VIEWS, resolution: int = GPTEVAL3D_RESOLUTION,
                     elevation_deg: float = THREESTUDIO_ELEVATION_DEG,
                     distance: float = THREESTUDIO_DISTANCE,
                     fov_y_deg: float = THREESTUDIO_FOV_Y_DEG, background: float = 1.0,
                     batch_size: int = 8, render_options: Optional[dict] = None) -> Path:
    """Render a scene (splats or NeRF) on threestudio's test orbit into
    ``method_dir/<prompt_id>/<seed>/``: ``rgb_<i>.png`` and ``normal_<i>.png`` for
    ``i = 0 .. n_views - 1``, and ``cameras.json`` (``{"width", "height", "convention",
    "views": [{"c2w" 4x4, "elevation_deg", "azimuth_deg", "camera_distance", "fovy_deg"}]}``).

    Args:
        scene: :class:`cfd.scene.Splats` or :class:`cfd.scene.NeRFField`.
        method_dir: the method's folder (GPTEval3D's ``data/<method>``); only prompt-id
            folders go in it.
        prompt_id: index of the prompt in the tournament's ``prompts.json`` (>= 0).
        n_views, resolution: 120 and 512 for GPTEval3D; fewer and smaller for tests.
        background: RGB behind the object in the colour renders (white by default).
        batch_size: views rendered at once (bounds memory).
        render_options: more ``render`` arguments (a NeRF's ``n_samples``, ``occupancy``).
    Returns:
        the seed folder.
    """
    if int(prompt_id) != prompt_id or prompt_id < 0 or int(seed) != seed or seed < 0:
        raise ValueError(f"prompt_id and seed name folders GPTEval3D reads as integers >= 0, "
                         f"got prompt_id={prompt_id!r}, seed={seed!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cameras = gpteval3d_cameras(n_views, resolution, elevation_deg, distance, fov_y_deg,
                                scene.device)
    folder = Path(method_dir) / str(int(prompt_id)) / str(int(seed))
    is_field = isinstance(scene, NeRFField)
    options = {**(render_options or {}), **({"normals": True} if is_field else {})}
    for start in range(0, n_views, batch_size):
        views = cameras[start:start + batch_size]
        out = render(scene, views, background=background, **options)
        normals = (F.normalize(out.normal, dim=-1) if is_field
                   else depth_to_normals(out.depth, out.alpha, views))
        normal_images = encode_normals(normals, out.alpha)
        for offset in range(len(views)):
            save_image(out.rgb[offset], folder / f"rgb_{start + offset}.png")
            save_image(normal_images[offset], folder / f"normal_{start + offset}.png")
    write_json(folder / "cameras.json", {
        "width": resolution, "height": resolution,
        "convention": "threestudio: OpenGL camera-to-world (columns right, up, backward, "
                      "position), world z up, cameras looking at the origin",
        "views": _threestudio_poses(cameras)})
    return folder
