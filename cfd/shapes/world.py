"""A procedural shape world: coloured objects built from analytic parts, rendered as splats.

Each object faces +x (its front; azimuth 0 in ``cfd.cameras``) with +z up and is turned into
flat splats lying on its surfaces (``object_splats``), so the splat renderer draws it exactly and
deterministically. Its splats, out to where the renderer stops drawing them, stay within radius
0.8 of the origin: inside the view of the dataset's nearest camera (distance 2.4, 40 degree field
of view: 2.4 sin 20 = 0.82), so no image cuts an object off. Prompts group objects: several prompts
have 2-3 variants (other proportions or colours), which makes the embedded prior multimodal.
These are the named objects; ``catalogue`` adds the categories' variants to what the prior knows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Tuple

import torch

from ..scene import Splats
from . import primitives


@dataclass(frozen=True)
class Part:
    kind: str  # a sampler in ``primitives``
    params: Tuple[Tuple[str, object], ...]
    color: Tuple[float, float, float]
    offset: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotate_x_deg: float = 0.0  # applied before the offset
    rotate_z_deg: float = 0.0


def part(kind, color, offset=(0.0, 0.0, 0.0), rx=0.0, rz=0.0, **params) -> Part:
    return Part(kind, tuple(sorted(params.items())), tuple(color), tuple(offset), rx, rz)


@dataclass(frozen=True)
class ShapeObject:
    name: str
    prompt: str
    parts: Tuple[Part, ...]


def _area(p: Part) -> float:
    q = dict(p.params)
    if p.kind == "sphere":
        return 2 * math.pi * q["radius"] ** 2 * (1 - q.get("z_min", -1.0))
    if p.kind == "ellipsoid":
        a, b, c = q["radii"]
        mean = ((a * b) ** 1.6 + (a * c) ** 1.6 + (b * c) ** 1.6) / 3  # Knud Thomsen
        return 4 * math.pi * mean ** (1 / 1.6) * (1 - q.get("z_min", -1.0)) / 2
    if p.kind == "cylinder":
        caps = sum(q.get("caps", (True, True)))
        return 2 * math.pi * q["radius"] * q["height"] + caps * math.pi * q["radius"] ** 2
    if p.kind == "cone":
        r, h = q["radius"], q["height"]
        return math.pi * r * math.hypot(r, h) + q.get("base", True) * math.pi * r * r
    if p.kind == "box":
        x, y, z = q["size"]
        return 2 * (x * y + y * z + x * z)
    if p.kind == "torus":
        return 4 * math.pi ** 2 * q["major"] * q["minor"]
    if p.kind == "prism":
        w, d, h = q["width"], q["depth"], q["height"]
        return 2 * math.hypot(w / 2, h) * d + w * h
    raise ValueError(f"unknown primitive {p.kind!r}")


def _rotation(rx_deg: float, rz_deg: float) -> torch.Tensor:
    ax, az = math.radians(rx_deg), math.radians(rz_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]],
                      dtype=torch.float64)
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]],
                      dtype=torch.float64)
    return rz @ rx


def _quat_z_to(normals: torch.Tensor) -> torch.Tensor:
    """wxyz quaternions rotating +z onto each normal (flat splats lie on the surface)."""
    w = 1.0 + normals[:, 2]
    q = torch.stack([w, -normals[:, 1], normals[:, 0], torch.zeros_like(w)], -1)
    flipped = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=normals.dtype).expand_as(q)
    q = torch.where((w < 1e-6)[:, None], flipped, q)
    return torch.nn.functional.normalize(q, dim=-1)


def object_splats(obj: ShapeObject, spacing: float = 0.022, opacity: float = 0.95) -> Splats:
    """The object as flat splats, about one per ``spacing^2`` of surface; deterministic."""
    seed = int(hashlib.sha256(obj.name.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    means, normals, colors = [], [], []
    for p in obj.parts:
        n = max(32, math.ceil(_area(p) / spacing ** 2))
        pts, nrm = getattr(primitives, p.kind)(n, g, **dict(p.params))
        R = _rotation(p.rotate_x_deg, p.rotate_z_deg)
        means.append(pts @ R.T + torch.tensor(p.offset, dtype=torch.float64))
        normals.append(nrm @ R.T)
        colors.append(torch.tensor(p.color, dtype=torch.float64).expand(n, 3))
    means, normals, colors = torch.cat(means), torch.cat(normals), torch.cat(colors)
    N = means.shape[0]
    scales = torch.tensor([spacing, spacing, spacing * 0.1], dtype=torch.float64).expand(N, 3)
    return Splats.from_activated(
        means.float(), scales.float(), _quat_z_to(normals).float(),
        torch.full((N,), opacity), colors.float(),
    )


# -- the objects ---------------------------------------------------------------------------------
WHITE, BLACK = (0.93, 0.93, 0.95), (0.06, 0.06, 0.06)


def _mug(name, body, tall, stripe):
    h = 0.9 if tall else 0.65
    return ShapeObject(name, "a mug", (
        part("cylinder", body, (0, 0, -h / 2), radius=0.38, height=h, caps=(True, False)),
        part("cylinder", (0.35, 0.2, 0.1), (0, 0, -h / 2 + 0.03), radius=0.33, height=h - 0.05,
             caps=(False, True)),
        part("torus", body, (-0.5, 0, 0.0), rx=90.0, major=0.17, minor=0.05),
        part("box", stripe, (0.36, 0, 0.0), size=(0.06, 0.3, 0.2)),
    ))


def _chair(name, wood, seat, tall_back):
    back_h = 0.68 if tall_back else 0.43
    legs = tuple(part("box", wood, (x, y, -0.385), size=(0.06, 0.06, 0.51))
                 for x in (-0.21, 0.21) for y in (-0.21, 0.21))
    return ShapeObject(name, "a chair", legs + (
        part("box", seat, (0, 0, -0.1), size=(0.53, 0.53, 0.07)),
        part("box", wood, (-0.24, 0, -0.07 + back_h / 2), size=(0.06, 0.53, back_h)),
    ))


def _house(name, walls, roof, wide):
    # The wide variant is wide across its front (y) but shallow (x): a deep one would not fit
    # in the dataset cameras' view.
    depth, frontage = (0.5, 0.9) if wide else (0.7, 0.7)
    return ShapeObject(name, "a house with a door", (
        part("box", walls, (0, 0, -0.2), size=(depth, frontage, 0.6)),
        part("prism", roof, (0, 0, 0.1), width=depth + 0.1, depth=frontage + 0.1, height=0.4),
        part("box", (0.45, 0.25, 0.1), (depth / 2 + 0.01, 0, -0.32), size=(0.02, 0.2, 0.36)),
        part("box", (0.6, 0.8, 0.95), (depth / 2 + 0.01, 0.25, -0.1), size=(0.02, 0.15, 0.15)),
        part("box", (0.5, 0.2, 0.15), (-0.15, 0.2, 0.35), size=(0.12, 0.12, 0.3)),
    ))


def _mushroom(name, cap, spots, squat):
    stem_h = 0.45 if squat else 0.7
    return ShapeObject(name, "a mushroom", (
        part("cylinder", (0.92, 0.88, 0.78), (0, 0, -0.55), radius=0.14, height=stem_h),
        part("ellipsoid", cap, (0, 0, -0.55 + stem_h), radii=(0.5, 0.5, 0.32), z_min=0.0),
        part("sphere", spots, (0.36, 0.0, -0.55 + stem_h + 0.19), radius=0.07),
        part("sphere", spots, (0.0, 0.3, -0.55 + stem_h + 0.24), radius=0.06),
        part("sphere", spots, (-0.25, -0.25, -0.55 + stem_h + 0.2), radius=0.06),
    ))


def _rocket(name, body, fins, long):
    h = 1.0 if long else 0.75
    z0 = -h / 2 - 0.15
    fin_parts = tuple(part("box", fins, (0.18 * math.cos(a), 0.18 * math.sin(a), z0 + 0.12),
                           rz=math.degrees(a), size=(0.22, 0.03, 0.25))
                      for a in (math.pi / 4, 3 * math.pi / 4, -3 * math.pi / 4, -math.pi / 4))
    return ShapeObject(name, "a rocket", (
        part("cylinder", body, (0, 0, z0), radius=0.18, height=h),
        part("cone", fins, (0, 0, z0 + h), radius=0.18, height=0.32, base=False),
        part("sphere", (0.3, 0.6, 0.95), (0.17, 0, z0 + 0.65 * h), radius=0.07),
    ) + fin_parts)


def _snowman(name):
    return ShapeObject(name, "a snowman", (
        part("sphere", WHITE, (0, 0, -0.38), radius=0.38),
        part("sphere", WHITE, (0, 0, 0.18), radius=0.26),
        part("sphere", BLACK, (0.23, 0.09, 0.25), radius=0.04),
        part("sphere", BLACK, (0.23, -0.09, 0.25), radius=0.04),
        # The nose cone's axis (+z) is turned to +x: x by -90 degrees, then z by -90 degrees.
        part("cone", (1.0, 0.45, 0.05), (0.24, 0, 0.17), rx=-90.0, rz=-90.0, radius=0.05,
             height=0.2),
        part("cylinder", (0.15, 0.15, 0.2), (0, 0, 0.4), radius=0.17, height=0.25),
    ))


def _lamp(name, shade):
    return ShapeObject(name, "a lamp", (
        part("cylinder", (0.2, 0.2, 0.22), (0, 0, -0.6), radius=0.3, height=0.08),
        part("cylinder", (0.6, 0.6, 0.62), (0, 0, -0.52), radius=0.03, height=0.75),
        part("cone", shade, (0.05, 0, 0.18), radius=0.34, height=0.4, base=False),
        part("box", (0.2, 0.2, 0.22), (0.12, 0, -0.1), size=(0.2, 0.03, 0.03)),
    ))


def _build_world() -> Tuple[ShapeObject, ...]:
    return (
        _mug("mug_red", (0.8, 0.12, 0.1), False, WHITE),
        _mug("mug_blue_tall", (0.15, 0.3, 0.8), True, (1.0, 0.85, 0.1)),
        _chair("chair_wood", (0.55, 0.35, 0.18), (0.55, 0.35, 0.18), False),
        _chair("chair_green_tall", (0.3, 0.3, 0.32), (0.2, 0.6, 0.3), True),
        _house("house_yellow", (0.95, 0.85, 0.45), (0.7, 0.2, 0.15), False),
        _house("house_blue_wide", (0.55, 0.7, 0.9), (0.3, 0.3, 0.35), True),
        _mushroom("mushroom_red", (0.85, 0.1, 0.1), WHITE, False),
        _mushroom("mushroom_brown_squat", (0.5, 0.3, 0.15), (0.95, 0.9, 0.7), True),
        _mushroom("mushroom_purple", (0.55, 0.25, 0.7), WHITE, False),
        _rocket("rocket_white", (0.92, 0.92, 0.95), (0.85, 0.15, 0.1), True),
        _rocket("rocket_orange", (0.95, 0.55, 0.15), (0.2, 0.2, 0.25), False),
        _snowman("snowman"),
        _lamp("lamp_yellow", (0.95, 0.85, 0.3)),
        _lamp("lamp_teal", (0.2, 0.65, 0.65)),
    )


SHAPE_WORLD: Tuple[ShapeObject, ...] = _build_world()

__all__ = ["SHAPE_WORLD", "ShapeObject", "Part", "object_splats"]
