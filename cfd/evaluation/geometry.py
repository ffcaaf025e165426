"""Geometry metrics: voxel IoU, Chamfer distance, F-score, surface points, nearest category.

Conventions
-----------
* Occupancy grids are ``[R,R,R]`` bool, indexed (x, y, z), of ``R^3`` equal cells tiling the
  box ``[-radius, radius]^3`` (as :class:`cfd.renderers.occupancy.OccupancyGrid`): cell
  ``(i, j, k)`` has its centre at ``-radius + (ijk + 0.5) * 2 * radius / R``.
* Distances are plain Euclidean (not squared), in world units. The **Chamfer distance** is the
  mean of the two directed mean nearest distances,
  ``CD(P, G) = (mean_p min_g |p - g| + mean_g min_p |g - p|) / 2``: two concentric sphere
  surfaces of radii r and r + d are at CD = d.
* The **F-score** at ``tau`` is the harmonic mean of precision (the share of predicted points
  within ``tau`` of the ground truth) and recall (the share of ground-truth points within
  ``tau`` of the prediction).

Nearest neighbours are found by brute force, block by block (``chunk_elements`` distances at
a time, sized to stay in a CPU cache), so memory beyond the inputs is a few megabytes: the
Chamfer distance of two sets of 100k points took under a minute on one shared CPU core.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..renderers.projection import quat_to_rotmat
from ..scene import NeRFField
from ..scene.mesh import density_grid, surface_density

DEFAULT_CHUNK_ELEMENTS = 1 << 18  # distances per block: 1 MB of float32, stays in cache


def _check_points(name: str, points: Tensor) -> None:
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"{name} must be a point set [N,3], got {tuple(points.shape)}")


def _check_grid(name: str, grid: Tensor) -> None:
    if grid.ndim != 3 or grid.dtype != torch.bool:
        raise ValueError(f"{name} must be an occupancy grid [R,R,R] of bool, got "
                         f"{tuple(grid.shape)} {grid.dtype}; threshold a density grid first")


# -- voxels ---------------------------------------------------------------------------------------
def voxel_iou(pred: Tensor, target: Tensor, region: Optional[Tensor] = None) -> float:
    """Intersection over union of two occupancy grids, counted inside ``region`` only.

    Args:
        pred, target: ``[R,R,R]`` bool.
        region: ``[R,R,R]`` bool, the cells that count (e.g. the region hidden from the
            observation camera); None counts every cell.
    Returns:
        ``|pred & target & region| / |(pred | target) & region|``; 1.0 when both grids are
        empty inside the region (they agree that nothing is there).
    """
    _check_grid("pred", pred)
    _check_grid("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"grids differ in size: pred {tuple(pred.shape)}, target "
                         f"{tuple(target.shape)}")
    if region is not None:
        _check_grid("region", region)
        if region.shape != pred.shape:
            raise ValueError(f"region {tuple(region.shape)} must match the grids "
                             f"{tuple(pred.shape)}")
        pred, target = pred & region, target & region
    union = int((pred | target).sum())
    return int((pred & target).sum()) / union if union else 1.0


def grid_cell_centres(resolution: int, radius: float, device=None) -> Tensor:
    """Centres of the cells along one axis of a grid over ``[-radius, radius]``. ``[R]``."""
    return -radius + (torch.arange(resolution, device=device) + 0.5) * (2 * radius / resolution)


def points_in_grid(points: Tensor, grid: Tensor, radius: float) -> Tensor:
    """Whether each point lies in an occupied cell of ``grid`` (a region mask, say).

    Args:
        points: ``[N,3]`` world points; those outside the box ``[-radius, radius]^3`` are
            outside every cell.
        grid: ``[R,R,R]`` bool over that box.
    Returns:
        ``[N]`` bool.
    """
    _check_points("points", points)
    _check_grid("grid", grid)
    R = grid.shape[0]
    ijk = torch.floor((points / radius + 1) / 2 * R).long()
    inside = ((ijk >= 0) & (ijk < R)).all(-1)
    ijk = ijk.clamp(0, R - 1)
    return inside & grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]]


def grid_surface_points(grid: Tensor, radius: float) -> Tensor:
    """Centres of the boundary cells of an occupancy grid: occupied cells with at least one
    empty face neighbour (cells outside the grid count as empty).

    The points lie within half a cell of the voxelised surface, so Chamfer distances against
    them carry up to ``radius / R`` of discretisation error.

    Args:
        grid: ``[R,R,R]`` bool over ``[-radius, radius]^3``.
    Returns:
        ``[K,3]`` world points, K the number of boundary cells.
    """
    _check_grid("grid", grid)
    padded = F.pad(grid[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0] > 0
    core = (slice(1, -1),) * 3
    all_neighbours_full = torch.ones_like(grid)
    for axis in range(3):
        for step in (-1, 1):
            all_neighbours_full &= torch.roll(padded, step, dims=axis)[core]
    ijk = torch.nonzero(grid & ~all_neighbours_full)
    centres = grid_cell_centres(grid.shape[0], radius, grid.device)
    return centres[ijk]


# -- points ---------------------------------------------------------------------------------------
def nearest_neighbours(queries: Tensor, points: Tensor,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tuple[Tensor, Tensor]:
    """For each query, its nearest point and the distance to it.

    Blocks of at most ``chunk_elements`` squared distances are formed with a matrix product
    (fast, but cancellation makes small distances inexact), so the distance to each block
    winner is then recomputed directly: returned distances are exact, and 0 for a point
    queried against itself.

    Args:
        queries: ``[N,3]``; points: ``[M,3]`` with M >= 1.
    Returns:
        ``distances [N]`` (Euclidean, queries' dtype), ``indices [N]`` (int64, into points).
    """
    _check_points("queries", queries)
    _check_points("points", points)
    if len(points) == 0:
        raise ValueError("nearest_neighbours needs at least one point to search")
    points = points.to(queries.dtype)
    cols = min(len(points), 1 << 14)
    rows = max(1, chunk_elements // cols)
    squared_norms = (points * points).sum(-1)
    indices = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    for r0 in range(0, len(queries), rows):
        block = queries[r0:r0 + rows]
        best = torch.full((len(block),), torch.inf, dtype=queries.dtype, device=queries.device)
        best_index = torch.zeros(len(block), dtype=torch.long, device=queries.device)
        for c0 in range(0, len(points), cols):
            # |q - p|^2 - |q|^2: the query's own norm is the same for every candidate
            score = torch.addmm(squared_norms[None, c0:c0 + cols], block,
                                points[c0:c0 + cols].T, alpha=-2.0)
            value, index = score.min(dim=1)
            better = value < best
            best = torch.where(better, value, best)
            best_index = torch.where(better, index + c0, best_index)
        indices[r0:r0 + rows] = best_index
    distances = (queries - points[indices]).norm(dim=-1)
    return distances, indices


def chamfer_distance(pred: Tensor, gt: Tensor,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> float:
    """Symmetric Chamfer distance: the mean of the two directed means of plain (unsquared)
    nearest distances (module docstring).

    Args:
        pred: ``[N,3]`` predicted surface points; gt: ``[M,3]`` ground-truth surface points,
            M >= 1.
    Returns:
        The distance in world units; ``inf`` for an empty prediction (nothing is near the
        ground truth).
    """
    _check_points("gt", gt)
    if len(gt) == 0:
        raise ValueError("the ground truth has no points: there is no surface to compare with")
    if len(pred) == 0:
        return float("inf")
    accuracy = nearest_neighbours(pred, gt, chunk_elements)[0].double().mean()
    completeness = nearest_neighbours(gt, pred, chunk_elements)[0].double().mean()
    return float((accuracy + completeness) / 2)


def f_score(pred: Tensor, gt: Tensor, tau: float,
            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Dict[str, float]:
    """Precision, recall and F-score of predicted points at distance threshold ``tau``.

    Args:
        pred: ``[N,3]``; gt: ``[M,3]``, M >= 1; tau: > 0, world units (a point within
            ``tau``, inclusive, counts).
    Returns:
        ``{"precision", "recall", "f_score"}`` in [0, 1]; all 0 for an empty prediction.
    """
    if not tau > 0:
        raise ValueError(f"the F-score threshold tau must be > 0, got {tau}")
    _check_points("gt", gt)
    if len(gt) == 0:
        raise ValueError("the ground truth has no points: there is no surface to compare with")
    if len(pred) == 0:
        return {"precision": 0.0, "recall": 0.0, "f_score": 0.0}
    precision = float((nearest_neighbours(pred, gt, chunk_elements)[0] <= tau).double().mean())
    recall = float((nearest_neighbours(gt, pred, chunk_elements)[0] <= tau).double().mean())
    total = precision + recall
    return {"precision": precision, "recall": recall,
            "f_score": 2 * precision * recall / total if total else 0.0}


def restrict_to_region(pred: Tensor, gt: Tensor, gt_in_region: Tensor,
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tuple[Tensor, Tensor]:
    """The part of both point sets that concerns one region of the ground truth, for
    Chamfer distance and F-score there (the region hidden from the observation, say).

    The ground truth keeps its points in the region; the prediction keeps the points whose
    nearest ground-truth point is in the region: each predicted point is judged against the
    part of the true surface it is closest to. A prediction with nothing there keeps no
    points (Chamfer ``inf``, F-score 0).

    Args:
        pred: ``[N,3]``; gt: ``[M,3]``; gt_in_region: ``[M]`` bool (see
            :func:`points_in_grid`), at least one True.
    Returns:
        ``pred_in_region [N',3]``, ``gt_in_region [M',3]``.
    """
    _check_points("pred", pred)
    _check_points("gt", gt)
    if gt_in_region.shape != (len(gt),) or gt_in_region.dtype != torch.bool:
        raise ValueError(f"gt_in_region must be [M]={len(gt)} bool, got "
                         f"{tuple(gt_in_region.shape)} {gt_in_region.dtype}")
    if not gt_in_region.any():
        raise ValueError("no ground-truth point lies in the region: there is nothing to "
                         "measure there (check the region mask and its radius)")
    if len(pred) == 0:
        return pred, gt[gt_in_region]
    nearest = nearest_neighbours(pred, gt, chunk_elements)[1]
    return pred[gt_in_region[nearest]], gt[gt_in_region]


@torch.no_grad()
def splat_surface_points(splats, n: int, generator: Optional[torch.Generator] = None,
                         from_gaussians: bool = True) -> Tensor:
    """``n`` points on a splat scene's surface: splats drawn in proportion to their opacity
    (with replacement), then either their centres or a point drawn from each one's Gaussian
    ``N(mean, R diag(scale)^2 R^T)`` (flat splats give points on the surface they tile).

    Args:
        splats: a :class:`cfd.scene.Splats` with at least one splat of non-zero opacity.
        n: points to draw, >= 1.
        generator: on the scene's device, for reproducible draws.
        from_gaussians: sample inside each Gaussian; False returns the drawn centres.
    Returns:
        ``[n,3]`` world points on the scene's device.
    """
    if n < 1:
        raise ValueError(f"n (points to sample) must be >= 1, got {n}")
    weights = splats.opacities.detach().double()
    if len(weights) == 0 or not weights.sum() > 0:
        raise ValueError(f"the scene has no visible splats to sample ({len(weights)} splats)")
    index = torch.multinomial(weights, n, replacement=True, generator=generator)
    means = splats.means.detach()[index]
    if not from_gaussians:
        return means
    offsets = torch.randn(n, 3, generator=generator, device=means.device, dtype=means.dtype)
    offsets = offsets * splats.scales.detach()[index]
    rotations = quat_to_rotmat(splats.quats.detach()[index])
    return means + (rotations @ offsets[:, :, None])[:, :, 0]


@torch.no_grad()
def field_surface_points(field: NeRFField, resolution: int = 96) -> Tensor:
    """Points on a NeRF's surface: :func:`grid_surface_points` of the field's occupancy on
    ``resolution^3`` cells tiling its box, a cell occupied where the density at its centre is
    above the level its mesh is cut at (:func:`cfd.scene.mesh.surface_density`).

    Returns:
        ``[K,3]`` world points (K = 0 for a field with no surface).
    """
    radius = field.cfg.radius
    cell = 2 * radius / resolution
    # the grid's points, spanning [-radius + cell/2, radius - cell/2], are the cells' centres
    density = torch.nan_to_num(density_grid(lambda p: field.query(p)[0], radius - cell / 2,
                                            resolution, field.device))
    return grid_surface_points(density > surface_density(density, cell), radius)


def scene_surface_points(scene, n: int, generator: Optional[torch.Generator] = None,
                         grid_resolution: int = 96) -> Tensor:
    """Up to ``n`` points on the surface of splats (:func:`splat_surface_points`, exactly
    ``n``) or a NeRF (:func:`field_surface_points`, a random ``n`` of them when there are
    more); none for splats with no visible splat or a field with no surface.

    Returns:
        ``[K,3]``, K <= n, on the scene's device.
    """
    if isinstance(scene, NeRFField):
        points = field_surface_points(scene, grid_resolution)
        if len(points) > n:
            points = points[torch.randperm(len(points), generator=generator,
                                           device=points.device)[:n]]
        return points
    if len(scene) == 0 or not scene.opacities.detach().sum() > 0:
        return scene.means.detach().new_zeros(0, 3)
    return splat_surface_points(scene, n, generator)


# -- text adherence -------------------------------------------------------------------------------
def nearest_category(pred: Tensor, references: Mapping[str, Sequence[Tensor]],
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
                     ) -> Tuple[str, Dict[str, float]]:
    """The category whose nearest instance is nearest to a prediction by Chamfer distance:
    which object the result looks like, for the accuracy over ambiguous prompts.

    Args:
        pred: ``[N,3]`` predicted surface points.
        references: ``{category: [instance points [M_i,3], ...]}``, every category with at
            least one instance.
    Returns:
        the nearest category (the first listed on a tie) and ``{category: Chamfer distance
        to its nearest instance}``.
    """
    if not references:
        raise ValueError("references must hold at least one category")
    distances = {}
    for category, instances in references.items():
        if len(instances) == 0:
            raise ValueError(f"category {category!r} has no reference instances")
        distances[category] = min(chamfer_distance(pred, points, chunk_elements)
                                  for points in instances)
    return min(distances, key=distances.get), distances


def adherence_accuracy(predictions: Sequence[Tensor], expected: Sequence[str],
                       references: Mapping[str, Sequence[Tensor]],
                       chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> float:
    """Share of predictions whose :func:`nearest_category` is the expected one.

    Args:
        predictions: point sets ``[N_i,3]``; expected: one category per prediction, each a
            key of ``references``.
    """
    if len(predictions) != len(expected) or not predictions:
        raise ValueError(f"need one expected category per prediction (and at least one), got "
                         f"{len(predictions)} predictions and {len(expected)} categories")
    unknown = sorted(set(expected) - set(references))
    if unknown:
        raise ValueError(f"expected categories {unknown} have no references; known: "
                         f"{sorted(references)}")
    hits = [nearest_category(points, references, chunk_elements)[0] == category
            for points, category in zip(predictions, expected)]
    return sum(hits) / len(hits)
