"""Amodal completion cases: held-out shape-world objects seen through an occlusion, with ground
truth for what is hidden.

A case is a held-out instance (``cfd.shapes.held_out_seeds``: never trained on; or any other
seeds, such as the embedded prior's variants, for cases of what a model has seen), a camera drawn
in the shape dataset's ranges, and an occluder in image space: a **cut** (everything beyond a
line is lost, as at an image border) or a **card** (a rectangle in front of the object, painted
in :data:`CARD_COLOUR`). The visible mask is what remains of the object's silhouette (alpha >
0.5); the **hidden share** is ``1 - visible / silhouette`` pixels, and the case's band is one of
:data:`BANDS` (30-60%, 60-80%, over 80%: RelaxFlow's extreme occlusion). Cases are drawn from
one seed, so every method sees the same list (:func:`make_cases`; saved and read as JSON).

Ambiguity: a part of the object counts as visible when at least :data:`VISIBLE_PART_SHARE` of its
surface samples project into the visible mask in front of the rendered depth. The case is
ambiguous with every other category whose part builders include all the visible ones (the shape
world's designed overlaps, ``cfd.shapes.SHARED_PARTS``): there the text must decide.

Hidden region: the ground truth's occupied cells (``cfd.shapes.occupancy_grid``) whose centre does
not project into the visible mask in front of the rendered depth (so the back and the inside as
well as what the occluder covers); metrics restricted to it say what the completion got right
where the image said nothing. For surfaces, :func:`hidden_points` does the same per point.

Frames: cameras and points are in the world (the shape dataset's); a generator's box is the
world scaled by ``cfd.shapes.GENERATOR_SCALE`` (:func:`generator_camera` gives the same view
there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras, orbit_cameras
from ..renderers import render
from ..shapes import (CATEGORIES, GENERATOR_SCALE, ShapeDatasetConfig, category, held_out_seeds,
                      object_splats, occupancy_grid)
from ..shapes.categories import CategoryObject, grid_centres, part_surface_points
from ..shapes.dataset import dataset_cameras

BANDS: Dict[str, Tuple[float, float]] = {"30-60": (0.3, 0.6), "60-80": (0.6, 0.8),
                                         "80+": (0.8, 0.95)}  # some of the object stays
OCCLUDERS = ("cut", "card")
CARD_COLOUR = (0.25, 0.35, 0.55)  # a blue-grey card, unlike the grey background
BACKGROUND = 0.5  # the shape dataset's grey
VISIBLE_PART_SHARE = 0.03  # of a part's surface samples (a sliver of a leg still tells)
DEPTH_TOLERANCE = 0.05  # world units in front of the rendered depth that still count as seen
PART_SAMPLES = 4000


@dataclass(frozen=True)
class AmodalCase:
    """One occluded view of one held-out instance (all angles in degrees, world units)."""

    case_id: str
    category: str
    seed: int
    elevation: float
    azimuth: float
    distance: float
    fov: float
    resolution: int
    occluder: str  # "cut" or "card"
    # cut: (angle of the lost side's direction, offset of the line from the image centre in
    # pixels along it); card: (centre x, centre y, half width, half height) in pixels
    occluder_params: Tuple[float, ...]
    band: str
    hidden_share: float
    visible_parts: Tuple[str, ...]
    ambiguous_with: Tuple[str, ...]

    @property
    def prompt(self) -> str:
        return category(self.category).prompt

    @property
    def instance(self) -> CategoryObject:
        return category(self.category).sample(self.seed)

    def camera(self) -> Cameras:
        """The observation camera, in the world."""
        one = lambda v: torch.tensor([float(v)])  # noqa: E731
        return orbit_cameras(one(self.elevation), one(self.azimuth), one(self.distance),
                             one(self.fov), self.resolution, self.resolution)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AmodalCase":
        return cls(**{**d, "occluder_params": tuple(d["occluder_params"]),
                      "visible_parts": tuple(d["visible_parts"]),
                      "ambiguous_with": tuple(d["ambiguous_with"])})


def generator_camera(case: AmodalCase) -> Dict[str, float]:
    """The observation camera in a generator's box (the world scaled by GENERATOR_SCALE): the
    same angles and field of view, the distance scaled."""
    return {"elevation": case.elevation, "azimuth": case.azimuth,
            "distance": case.distance * GENERATOR_SCALE, "fov": case.fov}


def occluder_mask(kind: str, params: Sequence[float], resolution: int) -> Tensor:
    """Pixels the occluder covers, ``[H, W]`` bool (pixel centres at ``i + 0.5``)."""
    centres = torch.arange(resolution, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    if kind == "cut":
        angle, offset = params
        direction = (math.cos(math.radians(angle)), math.sin(math.radians(angle)))
        along = (x - resolution / 2) * direction[0] + (y - resolution / 2) * direction[1]
        return along > offset
    if kind == "card":
        cx, cy, hw, hh = params
        return ((x - cx).abs() <= hw) & ((y - cy).abs() <= hh)
    raise ValueError(f"unknown occluder {kind!r}; known: {', '.join(OCCLUDERS)}")


@torch.no_grad()
def _render(obj: CategoryObject, camera: Cameras):
    return render(object_splats(obj), camera, background=BACKGROUND)


def observe(case: AmodalCase) -> Tuple[np.ndarray, np.ndarray, Tensor]:
    """The case's observation: RGBA ``[H, W, 4]`` uint8 (the object on the grey background, a
    card painted over it; alpha = the visible mask), the visible mask ``[H, W]`` uint8 (255 =
    the object's visible pixels) and the full silhouette ``[H, W]`` bool."""
    out = _render(case.instance, case.camera())
    silhouette = out.alpha[0, ..., 0] > 0.5
    covered = occluder_mask(case.occluder, case.occluder_params, case.resolution)
    rgb = out.rgb[0].clone()
    if case.occluder == "card":
        rgb[covered] = torch.tensor(CARD_COLOUR)
    else:  # what lies beyond the cut is not in the image: background
        rgb[covered] = BACKGROUND
    visible = silhouette & ~covered
    alpha = visible.float()
    rgba = torch.cat([rgb, alpha[..., None]], -1)
    return ((rgba.clamp(0, 1) * 255 + 0.5).byte().numpy(),
            (visible.numpy() * 255).astype(np.uint8), silhouette)


def _seen(points: Tensor, camera: Cameras, visible: Tensor, depth: Tensor) -> Tensor:
    """Which world points ``[N, 3]`` project into ``visible [H, W]`` at or in front of the
    rendered ``depth [H, W]`` (+ :data:`DEPTH_TOLERANCE`). ``[N]`` bool."""
    viewmat, K = camera.viewmats[0].double(), camera.Ks[0].double()
    cam = points.double() @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = cam[:, 2]
    uv = cam @ K.T
    u = (uv[:, 0] / z.clamp(min=1e-9)).floor().long()
    v = (uv[:, 1] / z.clamp(min=1e-9)).floor().long()
    H, W = visible.shape
    inside = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    seen = torch.zeros(len(points), dtype=torch.bool)
    ui, vi = u[inside], v[inside]
    seen[inside] = visible[vi, ui] & (z[inside] <= depth[vi, ui].double() + DEPTH_TOLERANCE)
    return seen


def visible_parts(case: AmodalCase, visible: Tensor) -> Tuple[str, ...]:
    """The part builders (roles) of the instance that the visible mask shows (sorted)."""
    obj, camera = case.instance, case.camera()
    depth = _render(obj, camera).depth[0, ..., 0]
    points, part = part_surface_points(obj, PART_SAMPLES,
                                       torch.Generator().manual_seed(case.seed))
    seen = _seen(points, camera, visible, depth)
    roles = set()
    for index, role in enumerate(obj.roles):
        mine = part == index
        if mine.any() and seen[mine].float().mean() >= VISIBLE_PART_SHARE:
            roles.add(role)
    return tuple(sorted(roles))


def ambiguous_categories(name: str, roles: Sequence[str]) -> Tuple[str, ...]:
    """The other categories whose part builders include every one of ``roles``."""
    if not roles:
        return ()
    return tuple(other for other, c in CATEGORIES.items()
                 if other != name and set(roles) <= set(c.parts))


def hidden_points(case: AmodalCase, points: Tensor) -> Tensor:
    """Which world points ``[N, 3]`` (on the ground truth's surface) the observation does not
    show. ``[N]`` bool."""
    obj, camera = case.instance, case.camera()
    _, visible, _ = observe(case)
    depth = _render(obj, camera).depth[0, ..., 0]
    return ~_seen(points, camera, torch.from_numpy(visible > 127), depth)


def hidden_region(case: AmodalCase, resolution: int) -> Tensor:
    """The ground truth's occupied cells the observation does not show, ``[R, R, R]`` bool
    (indexed as ``cfd.shapes.occupancy_grid``)."""
    truth = occupancy_grid(case.instance, resolution)
    hidden = torch.zeros_like(truth)
    hidden[truth.nonzero(as_tuple=True)] = hidden_points(case, grid_centres(resolution)[truth]
                                                         .float())
    return hidden


def _draw_occluder(kind: str, resolution: int, rng: np.random.Generator) -> Tuple[float, ...]:
    if kind == "cut":
        return (float(rng.uniform(0, 360)), float(rng.uniform(-0.3, 0.3) * resolution))
    half = rng.uniform(0.15, 0.45, size=2) * resolution
    centre = rng.uniform(0.25, 0.75, size=2) * resolution
    return (float(centre[0]), float(centre[1]), float(half[0]), float(half[1]))


def make_cases(per_category_band: int, seed: int = 0, resolution: int = 256,
               categories: Sequence[str] = tuple(CATEGORIES), max_tries: int = 400,
               instance_seeds: Sequence[int] | None = None) -> List[AmodalCase]:
    """``per_category_band`` cases for every (category of ``categories``, band), drawn from
    ``seed``: an instance per case (the next of ``instance_seeds``, by default held-out seeds),
    dataset cameras, occluders alternating cut and card, redrawn until the hidden share falls in
    the band. Other ``instance_seeds`` (e.g. the embedded prior's variants) make cases of
    instances a model has seen."""
    needed = per_category_band * len(BANDS)
    if instance_seeds is None:
        instance_seeds = held_out_seeds(needed)
    if len(instance_seeds) < needed:
        raise ValueError(f"{per_category_band} cases per category and band need {needed} "
                         f"instance seeds, got {len(instance_seeds)}")
    rng = np.random.default_rng(seed)
    cases: List[AmodalCase] = []
    cfg = ShapeDatasetConfig(resolution=resolution)
    for name in categories:
        for b, (band, (low, high)) in enumerate(BANDS.items()):
            for k in range(per_category_band):
                index = b * per_category_band + k
                instance_seed = instance_seeds[index]
                kind = OCCLUDERS[len(cases) % len(OCCLUDERS)]
                obj = category(name).sample(instance_seed)
                for attempt in range(max_tries):
                    if attempt % 20 == 0:  # a new camera now and then, for hard bands
                        camera = dataset_cameras(cfg, 1, torch.Generator().manual_seed(
                            int(rng.integers(2 ** 31))))
                        silhouette = _render(obj, camera).alpha[0, ..., 0] > 0.5
                    params = _draw_occluder(kind, resolution, rng)
                    covered = occluder_mask(kind, params, resolution)
                    share = 1 - float((silhouette & ~covered).sum()) / float(silhouette.sum())
                    if low <= share < high:
                        break
                else:
                    raise RuntimeError(f"no {kind} occlusion of {name}/{instance_seed} in band "
                                       f"{band} after {max_tries} tries")
                case = AmodalCase(
                    case_id=f"{name}-{instance_seed}-{band}-{kind}", category=name,
                    seed=instance_seed, elevation=float(camera.elevation[0]),
                    azimuth=float(camera.azimuth[0]), distance=float(camera.distance[0]),
                    fov=float(cfg.fov_range[0]), resolution=resolution, occluder=kind,
                    occluder_params=params, band=band, hidden_share=share, visible_parts=(),
                    ambiguous_with=())
                roles = visible_parts(case, silhouette & ~covered)
                cases.append(AmodalCase(**{**case.to_dict(), "visible_parts": roles,
                                           "ambiguous_with": ambiguous_categories(name, roles)}))
    return cases
