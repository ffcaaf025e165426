"""Stage 2's training data: per instance its active voxels with the encoder's input features,
and multi-view ground-truth renders with their cameras, in the generator's box.

Cached as stage 1's dataset is (``relaxflow.training.data.build_cached``: one build per
(settings, code), a lock, an atomic publish), under a fingerprint of its own.

* **Voxels**: the occupancy grid at ``resolution`` (stage 1's occupancy, the same cells), its
  cells ``[x, y, z]``.
* **Features** (:data:`VOXEL_FEATURES`), from the ground-truth splats whose centres fall in each
  voxel: their mean colour (RGB, what the renders show: the shape world's splats are unlit),
  mean unit normal, mean position in the voxel (from its centre, in voxel sides), and
  ``log(1 + count) / log(1 + 64)``; a voxel with no splat centre in it (inside a solid part)
  has zeros. TRELLIS averages DINOv2 features of 150 renders projected onto each voxel: what an
  image model sees of the surface there. Here the ground truth is at hand and exact: the
  encoder gets the appearance and the fine placement of the surface in each voxel for a
  bincount (no image model, no renders), the same on every machine and thread count (renders'
  float sums are not). The encoder is used in training only, so its inputs need not be what a
  user could give.
* **Views**: ``views`` renders ``[H, W, 4]`` uint8 (RGB on the dataset's grey background, alpha
  the coverage) from the prior dataset's camera ranges, and their cameras moved into the
  generator's box [-0.5, 0.5]^3 (``GENERATOR_SCALE``): a world-to-camera ``[R | t]`` becomes
  ``[R | s t]``, which projects every scaled point where the original camera projected it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from cfd.renderers.projection import quat_to_rotmat
from cfd.scene.sh import sh0_to_rgb
from cfd.shapes import CATEGORIES, category, occupancy_grid, render_views
from cfd.shapes.categories import GENERATOR_SCALE, GRID_HALF_EXTENT
from cfd.shapes.world import object_splats

from .data import (build_cached, category_names, check_categories, check_counts,
                   check_render_resolution, read_split, view_seed)

VOXEL_FEATURES = ("red", "green", "blue", "normal_x", "normal_y", "normal_z", "offset_x",
                  "offset_y", "offset_z", "density")
DENSITY_SCALE = math.log(1 + 64)  # log(1 + count) of a voxel with 64 splat centres is 1


@dataclass
class SlatDataConfig:
    """What stage 2's dataset holds. Sizes: see ``configs/train-generator-slat.yaml``."""

    train_seeds: int = 64  # instances per category for training
    held_out_seeds: int = 2  # instances per category for held-out metrics
    categories: List[str] = field(default_factory=list)  # empty: all of them
    resolution: int = 32  # voxels per side: stage 1's occupancy resolution
    views: int = 8  # ground-truth renders per instance
    render_resolution: int = 64  # pixels per side of the renders
    cache_dir: Optional[str] = None  # null: core.runtime.cache_root()


@dataclass
class VoxelSet:
    """One split: N instances, M voxels in all (instance ``i``'s are rows
    ``start[i]:start[i] + count[i]``)."""

    coords: Tensor  # [M, 3] int64 voxel cells (x, y, z) at the dataset's resolution
    feats: Tensor  # [M, F] float32: VOXEL_FEATURES
    count: Tensor  # [N] int64 voxels per instance
    rgba: Tensor  # [N, V, H, W, 4] uint8 ground-truth renders
    viewmats: Tensor  # [N, V, 4, 4] world-to-camera (OpenCV), in the generator's box
    Ks: Tensor  # [N, V, 3, 3] intrinsics in pixels
    category: Tensor  # [N] int64, index into ``categories``
    seed: Tensor  # [N] int64
    categories: List[str]

    def __post_init__(self):
        self.start = torch.cumsum(self.count, 0) - self.count

    def __len__(self) -> int:
        return len(self.count)

    def rows(self, index: Tensor) -> Tensor:
        """The voxel rows ``[m]`` of instances ``index [b]``, item after item."""
        return torch.cat([torch.arange(int(self.start[i]), int(self.start[i] + self.count[i]))
                          for i in index.tolist()])

    def batch_coords(self, index: Tensor) -> Tensor:
        """``[m, 4]`` int32 rows ``(item, x, y, z)`` of instances ``index [b]``, items
        numbered ``0..b-1`` in that order."""
        item = torch.repeat_interleave(torch.arange(len(index)), self.count[index])
        return torch.cat([item[:, None], self.coords[self.rows(index)]], 1).int()


def check_slat_data(c: SlatDataConfig, key: str = "slat.data") -> None:
    """A :class:`UserError` naming the setting for values that cannot build the dataset."""
    check_categories(c.categories, f"{key}.categories")
    check_counts(c, ("train_seeds", "held_out_seeds", "resolution", "views",
                     "render_resolution"), key)
    check_render_resolution(c.render_resolution, key)


def voxel_features(obj, coords: Tensor, resolution: int) -> Tensor:
    """:data:`VOXEL_FEATURES` of the voxels ``coords [M, 3]`` (cells ``(x, y, z)`` of a
    ``resolution``^3 grid over the generator's cube, ``occupancy_grid``'s) from the object's
    ground-truth splats. ``[M, F]`` float32."""
    splats = object_splats(obj)
    with torch.no_grad():
        means = splats.means.double()
        colours = sh0_to_rgb(splats.params["sh0"][:, 0]).double()
        normals = quat_to_rotmat(splats.quats)[:, :, 2].double()
    side = 2 * GRID_HALF_EXTENT / resolution
    cells = torch.floor((means + GRID_HALF_EXTENT) / side).long()
    inside = ((cells >= 0) & (cells < resolution)).all(1)
    row_of_cell = torch.full((resolution ** 3,), -1, dtype=torch.long)
    row_of_cell[(coords[:, 0] * resolution + coords[:, 1]) * resolution + coords[:, 2]] = \
        torch.arange(len(coords))
    flat = (cells[:, 0] * resolution + cells[:, 1]) * resolution + cells[:, 2]
    row = torch.where(inside, row_of_cell[flat.clamp(0, resolution ** 3 - 1)], -1)
    kept = row >= 0
    row, cells = row[kept], cells[kept]
    offsets = (means[kept] + GRID_HALF_EXTENT) / side - cells - 0.5  # in voxel sides
    values = torch.cat([colours[kept], normals[kept], offsets], 1)
    sums = torch.zeros(len(coords), values.shape[1], dtype=torch.float64).index_add_(0, row,
                                                                                     values)
    count = torch.bincount(row, minlength=len(coords)).double()[:, None]
    means_per_voxel = sums / count.clamp(min=1)
    density = torch.log1p(count) / DENSITY_SCALE
    return torch.cat([means_per_voxel, density], 1).float()


def build_slat_data(c: SlatDataConfig) -> Path:
    """Draw (or find in the cache) the dataset ``c`` describes; returns its folder."""
    return build_cached(c, _draw_split, [Path(__file__), Path(__file__).with_name("data.py")],
                        "drawing stage 2's shapes")


def load_voxel_set(folder: Path, split: str) -> VoxelSet:
    """Split ``split`` (``train`` or ``held_out``) of a built stage-2 dataset folder."""
    t, categories = read_split(folder, split)
    return VoxelSet(coords=t["coords"].long(), feats=t["feats"], count=t["count"],
                    rgba=t["rgba"], viewmats=t["viewmats"], Ks=t["Ks"], category=t["category"],
                    seed=t["seed"], categories=categories)


def _draw_split(c: SlatDataConfig, seeds: List[int], bar: tqdm) -> Dict[str, Tensor]:
    """Voxels, features, renders, cameras and labels of every category's instances of
    ``seeds``."""
    out: Dict[str, List[Tensor]] = {key: [] for key in ("coords", "feats", "count", "rgba",
                                                         "viewmats", "Ks", "category", "seed")}
    for index, name in enumerate(category_names(c)):
        for seed in seeds:
            obj = category(name).sample(seed)
            coords = torch.argwhere(occupancy_grid(obj, c.resolution))
            views, cameras = render_views(obj, c.views, c.render_resolution,
                                          seed=view_seed(list(CATEGORIES).index(name), seed))
            viewmats = cameras.viewmats.clone()
            viewmats[:, :3, 3] *= GENERATOR_SCALE
            for key, value in (("coords", coords.to(torch.uint8)),
                               ("feats", voxel_features(obj, coords, c.resolution)),
                               ("count", torch.tensor([len(coords)])),
                               ("rgba", (views * 255 + 0.5).to(torch.uint8)[None]),
                               ("viewmats", viewmats[None]), ("Ks", cameras.Ks[None]),
                               ("category", torch.tensor([index])),
                               ("seed", torch.tensor([seed]))):
                out[key].append(value)
            bar.update(1)
    return {key: torch.cat(values) for key, values in out.items()}
