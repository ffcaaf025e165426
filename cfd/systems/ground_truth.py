"""Ground-truth metrics of a result against the shape world (embedded-prior runs only).

Held-out views on a fixed orbit are compared with every variant of the prompt, under every
global azimuth rotation (the prior cannot fix the absolute azimuth of a symmetric object, and a
run may settle on any rotation); the best PSNR is reported with its mask IoU. The surface is
compared the same way: the Chamfer distance and F-score against the variant and turn whose
surface is nearest (:func:`geometry_against_shape_world`). The empty prompt (unconditional: the
prior draws from every object) has no ground truth to compare with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..cameras import Cameras, fixed_orbit_cameras, orbit_cameras
from ..evaluation import chamfer_distance, f_score, splat_surface_points
from ..renderers import render
from ..shapes import object_splats, objects_for
from ..utils.media import save_grid


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = torch.mean((pred.clamp(0, 1) - target.clamp(0, 1)) ** 2).item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def mask_iou(alpha_pred: torch.Tensor, alpha_target: torch.Tensor, threshold: float = 0.5) -> float:
    a, b = alpha_pred > threshold, alpha_target > threshold
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


NO_GROUND_TRUTH = ("none: the empty prompt is unconditional (the prior draws from every "
                   "object), so there is no one object to compare the result with")


def has_ground_truth(prompt: str) -> bool:
    """Whether a result for ``prompt`` can be measured against the shape world: False for the
    empty (unconditional) prompt, True for a known one; an unknown prompt is an error that lists
    the known ones."""
    if not prompt.strip():  # as the embedded prior reads it: blank is unconditional
        return False
    objects_for(prompt)
    return True


@torch.no_grad()
def truth_renders(prompt: str, cams: Cameras, fov: float, rotation_step: float = 10.0,
                  background: float = 1.0, device: torch.device | str = "cpu"
                  ) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Every variant of the prompt seen from ``cams`` (V orbit cameras whose vertical field of
    view is ``fov`` degrees) turned about the up axis by each multiple of ``rotation_step``
    degrees (R turns): ``{variant name: (rgb [R,V,H,W,3], alpha [R,V,H,W,1])}``, in
    :func:`cfd.shapes.objects_for` order.

    A camera that two turns share is rendered once (an orbit's views 45 degrees apart turned in
    steps of 10 degrees: 126 distinct cameras, not 288), V a call as the turns were; a few pixels
    then round slightly differently than in their own turn's batch (the rasteriser's chunking
    depends on the batch).
    """
    turns = torch.arange(0.0, 360.0, rotation_step)
    # Every turned camera as (elevation, azimuth, distance), then the distinct ones.
    V = cams.azimuth.shape[0]
    turned = torch.stack([cams.elevation.cpu().expand(len(turns), V),
                          cams.azimuth.cpu()[None] + turns[:, None],
                          cams.distance.cpu().expand(len(turns), V)], -1).reshape(-1, 3)
    distinct, which = torch.unique(turned, dim=0, return_inverse=True)
    truth = {}
    for obj in objects_for(prompt):
        target = object_splats(obj).to(device)
        rgb, alpha = [], []
        for start in range(0, len(distinct), V):  # V cameras a call, as the orbit itself
            el, az, dist = distinct[start:start + V].unbind(-1)
            views = render(target, orbit_cameras(el, az, dist, torch.full_like(dist, fov),
                                                 cams.width, cams.height).to(device),
                           background=background)
            rgb.append(views.rgb)
            alpha.append(views.alpha)
        truth[obj.name] = (torch.cat(rgb)[which].reshape(len(turns), V, *rgb[0].shape[1:]),
                           torch.cat(alpha)[which].reshape(len(turns), V, *alpha[0].shape[1:]))
    return truth


@torch.no_grad()
def evaluate_against_shape_world(scene, prompt: str, n_views: int = 8, resolution: int = 64,
                                 elevation: float = 20.0, distance: float = 2.5, fov: float = 40.0,
                                 background: float = 1.0, rotation_step: float = 10.0,
                                 comparison_path: Optional[Path] = None,
                                 render_options: Optional[dict] = None) -> dict:
    """PSNR and mask IoU of held-out views of a scene (splats or NeRF), best over the prompt's
    variants and rotations.

    ``comparison_path``: where to write an image grid of the result's views above the best
    match's (rgb, then alpha), to see what the numbers measure. ``render_options``: extra
    ``render`` arguments for the scene (a NeRF's ``n_samples``, ``occupancy``).
    """
    cams = fixed_orbit_cameras(n_views, resolution, resolution, elevation, distance, fov,
                               device=scene.device)
    ours = render(scene, cams, background=background, **(render_options or {}))
    turns = torch.arange(0.0, 360.0, rotation_step)
    best = {"psnr": -math.inf}
    for name, (rgb, alpha) in truth_renders(prompt, cams, fov, rotation_step, background,
                                            scene.device).items():
        for k, delta in enumerate(turns):
            value = psnr(ours.rgb, rgb[k])
            if value > best["psnr"]:
                best = {"psnr": value, "mask_iou": mask_iou(ours.alpha, alpha[k]),
                        "variant": name, "rotation_deg": float(delta)}
                best_truth = (rgb[k], alpha[k])
    if comparison_path is not None:
        save_grid([ours.rgb, best_truth[0], ours.alpha, best_truth[1]], comparison_path)
    return best


def turned_points(points: Tensor, degrees: float) -> Tensor:
    """Points turned by ``degrees`` about the up (z) axis through the origin, as
    :meth:`cfd.scene.Splats.turned` turns a scene. ``[N,3] -> [N,3]``."""
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = points.unbind(-1)
    return torch.stack([c * x - s * y, s * x + c * y, z], -1)


def truth_surface_points(prompt: str, n: int, seed: int = 0) -> Dict[str, Tensor]:
    """``n`` points on each variant of the prompt (drawn from its splats' Gaussians, which lie
    flat on its surfaces), by variant name; the same points for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {obj.name: splat_surface_points(object_splats(obj), n, generator)
            for obj in objects_for(prompt)}


@torch.no_grad()
def geometry_against_shape_world(points: Tensor, prompt: str, tau: float, n_truth: int = 5000,
                                 rotation_step: float = 10.0, search_points: int = 1000) -> dict:
    """Chamfer distance and F-score at ``tau`` of a result's surface points against the
    prompt's ground truth: of its variants, each turned about the up axis in steps of
    ``rotation_step`` degrees, the one at the smallest Chamfer distance (searched on the first
    ``search_points`` points of both sets, then measured on all of them).

    Args:
        points: ``[N,3]`` on the result's surface (CPU); N = 0 is an empty result.
        n_truth: points drawn on each variant (:func:`truth_surface_points`, seed 0).
    Returns:
        ``{"chamfer", "f_score", "precision", "recall", "gt_variant", "gt_rotation_deg"}``:
        the variant's name and the turn of the ground truth that matched; an empty result has
        Chamfer ``inf``, F-score 0 and no variant.
    """
    if len(points) == 0:
        return {"chamfer": math.inf, "f_score": 0.0, "precision": 0.0, "recall": 0.0,
                "gt_variant": None, "gt_rotation_deg": None}
    truths = truth_surface_points(prompt, n_truth)
    points = points.float()
    candidates = [(chamfer_distance(points[:search_points],
                                    turned_points(truth[:search_points], float(delta))),
                   name, float(delta))
                  for name, truth in truths.items()
                  for delta in torch.arange(0.0, 360.0, rotation_step)]
    _, name, delta = min(candidates, key=lambda c: c[0])
    truth = turned_points(truths[name], delta)
    return {"chamfer": chamfer_distance(points, truth), **f_score(points, truth, tau),
            "gt_variant": name, "gt_rotation_deg": delta}
