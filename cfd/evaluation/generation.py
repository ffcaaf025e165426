"""Scores of a generated object against the shape-world instance its input image shows.

Frames: the generator works in TRELLIS's box [-0.5, 0.5]^3, the world scaled by
``cfd.shapes.GENERATOR_SCALE`` about the origin. Its voxels ``coords [N, 3]`` index the ``[x, y, z]``
cells of that box at its resolution, the cells of :func:`cfd.shapes.occupancy_grid` at the same
resolution (the generator was trained on those grids), so the structure's IoU needs no
alignment. Its splats are scaled back into the world by ``1 / GENERATOR_SCALE``
(:func:`to_world`) and rendered beside the instance's own splats from the same cameras: PSNR of
the colours composited on the same background, and IoU of the silhouettes (alpha > 0.5).

An instance is named ``<category>/<seed>`` (``chair/1000003``; ``cfd.shapes.held_out_seeds``
gives seeds no generator trained on).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cameras import Cameras, orbit_cameras
from ..renderers import render
from ..scene import Splats
from ..shapes import CATEGORIES, GENERATOR_SCALE, category, object_splats, occupancy_grid
from ..shapes.categories import CategoryObject
from .images import mask_iou, psnr

# Around the object: 8 azimuths, the dataset's distance and field of view, a little above it.
AROUND_ELEVATION, AROUND_DISTANCE, AROUND_FOV = 20.0, 2.5, 40.0


def parse_instance(ref: str) -> Tuple[str, int]:
    """``"chair/1000003"`` -> ``("chair", 1000003)``; a ``ValueError`` saying the form and the
    categories otherwise."""
    name, _, seed = ref.partition("/")
    if name not in CATEGORIES or not seed.isdigit():
        raise ValueError(f"{ref!r} is not a shape-world instance: write <category>/<seed> "
                         f"(e.g. chair/1000003) with a category of {', '.join(CATEGORIES)}")
    return name, int(seed)


def instance(ref: str) -> CategoryObject:
    """The shape-world instance ``ref`` names (:func:`parse_instance`)."""
    name, seed = parse_instance(ref)
    return category(name).sample(seed)


def _grid(coords: Tensor, resolution: int) -> Tensor:
    """Voxels ``coords [N, 3]`` as an occupancy grid ``[R, R, R]`` bool."""
    grid = torch.zeros((resolution,) * 3, dtype=torch.bool)
    cells = coords.long().cpu()
    grid[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    return grid


def structure_iou(coords: Tensor, resolution: int, obj: CategoryObject) -> float:
    """IoU of generated voxels ``coords [N, 3]`` (cells at ``resolution``) with the instance's
    analytic occupancy at that resolution."""
    truth = occupancy_grid(obj, resolution)
    pred = _grid(coords, resolution)
    union = int((pred | truth).sum())
    return int((pred & truth).sum()) / union if union else 1.0


def _dilate(grid: Tensor) -> Tensor:
    """The cells within one voxel (the 26 neighbours and itself) of an occupied one."""
    return F.max_pool3d(grid[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def structure_f_score(coords: Tensor, resolution: int, obj: CategoryObject) -> float:
    """F-score of generated voxels ``coords [N, 3]`` against the instance's occupancy with one
    voxel of tolerance: precision = generated cells within one voxel of a true one, recall = true
    cells within one voxel of a generated one. IoU halves when a thin part is one voxel off
    (a leg two cells wide); this does not, so the two together tell a misplaced part from a
    wrong shape."""
    truth = occupancy_grid(obj, resolution)
    pred = _grid(coords, resolution)
    if not pred.any() or not truth.any():
        return float(pred.any() == truth.any())
    precision = float((pred & _dilate(truth)).sum() / pred.sum())
    recall = float((truth & _dilate(pred)).sum() / truth.sum())
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def cameras_around(n: int = 8, resolution: int = 96) -> Cameras:
    """``n`` cameras at evenly spaced azimuths around the object (starting at its front,
    azimuth 0), :data:`AROUND_ELEVATION` up, at the shape dataset's distance and field of view."""
    full = lambda value: torch.full((n,), float(value))  # noqa: E731
    azimuths = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return orbit_cameras(full(AROUND_ELEVATION), azimuths, full(AROUND_DISTANCE),
                         full(AROUND_FOV), resolution, resolution)


def to_world(splats: Splats) -> Splats:
    """A generator's splats (in its box) in the shape world's frame."""
    return splats.scaled(1.0 / GENERATOR_SCALE)


def view_scores(world: Splats, obj: CategoryObject, cameras: Cameras,
                background: float = 0.5) -> Dict[str, List[float]]:
    """Per camera, ``psnr`` (dB, every pixel) and ``mask_iou`` of splats in the world's frame
    (a generator's through :func:`to_world`) against the instance's own, both rendered from
    ``cameras`` (on the splats' device) on ``background``."""
    own = object_splats(obj)
    truth_splats = Splats({k: v.to(world.device) for k, v in own.params.items()},
                          own.sh_degree)
    with torch.no_grad():
        pred = render(world, cameras, background=background)
        truth = render(truth_splats, cameras, background=background)
    return {"psnr": [psnr(pred.rgb[i], truth.rgb[i]) for i in range(len(cameras))],
            "mask_iou": [mask_iou(pred.alpha[i], truth.alpha[i]) for i in range(len(cameras))]}
