"""Categories of the shape world: objects with continuous parameters, for training a generator.

Each category draws an instance from a seed (``category("chair").sample(seed)``): proportions,
part sizes and positions, colours and optional parts, from a NumPy generator seeded by
(category name, seed), so an instance is the same on every machine and run. Instances are
``ShapeObject``s as in ``world`` (facing +x, +z up, drawn by ``object_splats``); today's named
objects of ``SHAPE_WORLD`` are the fixed members of their category (``category("mug").fixed``)
and keep their prompts, which the new categories extend ("a stool", "a barn", ...). The embedded
prior knows every category's prompt (``catalogue``).

Conventions
-----------
* **Reach.** An instance is moved along z so its height is centred on the origin, then, if any
  of its surface lies further than ``REACH`` (0.72) from the origin, scaled down about the origin
  to that: its splats, out to where the renderer stops drawing them, stay within radius 0.8, in
  the view of the nearest dataset camera (see ``world``).
* **Generator box.** TRELLIS works in the cube [-0.5, 0.5]^3; world points map to it by the one
  scale ``GENERATOR_SCALE`` = 0.5 / 0.8 about the origin (``to_generator_box``), so the world
  cube [-0.8, 0.8]^3 (``GRID_HALF_EXTENT``), which holds every object, is the generator's cube.
* **Occupancy.** ``occupancy_grid(obj, R)`` is a bool ``[R, R, R]`` indexed ``[x, y, z]`` whose
  cell (i, j, k) is occupied when its centre ``-h + (i + 0.5) 2h / R`` (likewise j, k) lies
  inside a part (``primitives.INSIDE_TESTS``). Open surfaces are shells (a mug is its wall and
  floor, a mushroom cap a dome) of thickness ``max(SHELL_THICKNESS, 1.05 cell)`` and solids
  thinner than that (fins, an umbrella's shaft) are thickened to it, so no part slips between
  two rows of cell centres (the 5% keeps rounding from doing so).
* **Split.** Seeds below ``HELD_OUT_SEED_START`` (1 000 000) are for training
  (``train_seeds``); those at or above it are held out (``held_out_seeds``).

Shared parts
------------
Categories are built from shared part builders (below), so a partial view can be ambiguous: a
seat on legs may be a chair, a stool, a table or a bench. ``SHARED_PARTS`` holds this table and
``ambiguous_with`` reads it; ``CategoryObject.roles`` names the builder of each part.

==========  =========================================================
part        categories
==========  =========================================================
legs        chair, stool, table, bench
seat        chair, stool, table, bench
rungs       chair, stool, table, bench
backrest    chair, bench
vessel      mug, cup, vase
handle      mug, cup, vase, umbrella
drum        cup, vase, lamp, lighthouse, snowman
ball        vase, mushroom, tree, umbrella, snowman
stem        mushroom, lamp, tree, umbrella
cap         barn, mushroom, lamp, tree, umbrella
tall_body   barn, rocket, lighthouse, tower
spire       rocket, lighthouse, tower
walls       house, barn
gable_roof  house, barn
door        house, barn, lighthouse, tower
window      house, barn, rocket, lighthouse, tower
==========  =========================================================

Parts only one category has: a mug's stripe, a house's chimney, a rocket's fins, a tower's
battlements, a snowman's nose.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import primitives
from .world import SHAPE_WORLD, Part, ShapeObject, _area, _rotation, part

GENERATOR_SCALE = 0.5 / 0.8  # world -> TRELLIS's [-0.5, 0.5]^3, about the origin
GRID_HALF_EXTENT = 0.8  # world units: the occupancy grid's cube, the generator's whole cube
REACH = 0.72  # the furthest an instance's surface lies from the origin
HELD_OUT_SEED_START = 1_000_000

Parts = Tuple[Part, ...]
Vec3 = Tuple[float, float, float]


@dataclass(frozen=True)
class CategoryObject(ShapeObject):
    """An instance of a category; ``roles[i]`` names the part builder that made ``parts[i]``."""

    category: str
    seed: int
    roles: Tuple[str, ...]


class Draw:
    """The random parameters of one instance: a NumPy generator seeded by (category, seed)."""

    def __init__(self, category: str, seed: int):
        key = int.from_bytes(hashlib.sha256(category.encode()).digest()[:8], "little")
        self.rng = np.random.default_rng([key, seed])

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high], both included."""
        return int(self.rng.integers(low, high + 1))

    def sign(self) -> float:
        return 1.0 if self.chance(0.5) else -1.0

    def color(self, palette: Sequence[Vec3], jitter: float = 0.04) -> Vec3:
        """A palette colour, each channel moved by a little noise."""
        base = np.asarray(palette[int(self.rng.integers(len(palette)))])
        return tuple(float(c) for c in np.clip(base + self.rng.normal(0, jitter, 3), 0.02, 0.98))


def _shade(color: Vec3, factor: float) -> Vec3:
    """A darker colour, for the insides of openings: the renderer has no lighting."""
    return tuple(c * factor for c in color)


# -- palettes ------------------------------------------------------------------------------------
WOODS = ((0.55, 0.35, 0.18), (0.7, 0.5, 0.3), (0.4, 0.25, 0.12), (0.3, 0.3, 0.32))
FABRICS = ((0.2, 0.6, 0.3), (0.75, 0.2, 0.2), (0.2, 0.35, 0.7), (0.85, 0.75, 0.5))
BRIGHTS = ((0.8, 0.12, 0.1), (0.15, 0.3, 0.8), (0.95, 0.8, 0.15), (0.2, 0.65, 0.65),
           (0.55, 0.25, 0.7), (0.95, 0.55, 0.15), (0.93, 0.93, 0.95))
DRINKS = ((0.35, 0.2, 0.1), (0.6, 0.35, 0.15), (0.92, 0.9, 0.85))
CERAMICS = ((0.2, 0.35, 0.7), (0.93, 0.93, 0.95), (0.75, 0.4, 0.25), (0.3, 0.55, 0.4))
STONES = ((0.6, 0.6, 0.62), (0.75, 0.7, 0.6), (0.5, 0.45, 0.4))
WALLS = ((0.95, 0.85, 0.45), (0.55, 0.7, 0.9), (0.9, 0.9, 0.85), (0.85, 0.6, 0.5))
ROOFS = ((0.7, 0.2, 0.15), (0.3, 0.3, 0.35), (0.45, 0.3, 0.2))
BRICKS = ((0.5, 0.22, 0.15), (0.4, 0.4, 0.42))
BARN_REDS = ((0.7, 0.15, 0.12), (0.55, 0.1, 0.1))
BARN_ROOFS = ((0.3, 0.3, 0.35), (0.45, 0.3, 0.2), (0.2, 0.25, 0.35))
DARKS = ((0.06, 0.06, 0.06), (0.2, 0.2, 0.22), (0.45, 0.25, 0.1))
GREENS = ((0.15, 0.5, 0.2), (0.25, 0.6, 0.25), (0.1, 0.4, 0.25))
WHITE, BLACK, GLASS = (0.93, 0.93, 0.95), (0.06, 0.06, 0.06), (0.6, 0.8, 0.95)


# -- shared part builders: each stands its parts on z = 0 or at the heights it is given ---------
def legs(span_x: float, span_y: float, height: float, width: float, color: Vec3) -> Parts:
    """Four square legs from z = 0 to ``height``, their outer faces on a span_x x span_y
    rectangle."""
    dx, dy = (span_x - width) / 2, (span_y - width) / 2
    return tuple(part("box", color, (sx * dx, sy * dy, height / 2), size=(width, width, height))
                 for sx in (-1, 1) for sy in (-1, 1))


def rungs(span_x: float, span_y: float, z: float, width: float, color: Vec3) -> Parts:
    """Four bars at height ``z`` joining the legs that ``legs(span_x, span_y, ...)`` makes."""
    dx, dy = (span_x - width) / 2, (span_y - width) / 2
    bar = 0.6 * width
    return (tuple(part("box", color, (sx * dx, 0, z), size=(bar, 2 * dy, bar)) for sx in (-1, 1))
            + tuple(part("box", color, (0, sy * dy, z), size=(2 * dx, bar, bar))
                    for sy in (-1, 1)))


def seat(size_x: float, size_y: float, thickness: float, top: float, color: Vec3,
         round_: bool) -> Parts:
    """A slab whose top is at ``top``: a box, or a disc of diameter ``size_x`` if ``round_``."""
    if round_:
        return (part("cylinder", color, (0, 0, top - thickness), radius=size_x / 2,
                     height=thickness),)
    return (part("box", color, (0, 0, top - thickness / 2), size=(size_x, size_y, thickness)),)


def backrest(seat_x: float, seat_y: float, bottom: float, height: float, thickness: float,
             color: Vec3) -> Parts:
    """An upright slab on the back (-x) edge of a seat, from ``bottom`` up."""
    return (part("box", color, (-(seat_x - thickness) / 2, 0, bottom + height / 2),
                 size=(thickness, seat_y, height)),)


def vessel(radius: float, height: float, bottom: float, wall: float, color: Vec3,
           liquid: Tuple[Vec3, float] | None) -> Parts:
    """An open-topped cylinder from ``bottom`` with walls and floor ``wall`` thick and a rounded
    lip; ``liquid`` = (colour, level in (0, 1) of the inner height) fills it part way."""
    inner, floor = radius - wall, bottom + wall
    inside = _shade(color, 0.6)
    parts = [part("cylinder", color, (0, 0, bottom), radius=radius, height=height,
                  caps=(True, False))]
    if liquid is None:
        parts.append(part("cylinder", inside, (0, 0, floor), radius=inner, height=height - wall,
                          caps=(True, False)))
    else:
        liquid_color, level = liquid
        depth = level * (height - wall)
        parts.append(part("cylinder", liquid_color, (0, 0, floor), radius=inner, height=depth))
        parts.append(part("cylinder", inside, (0, 0, floor + depth), radius=inner,
                          height=height - wall - depth, caps=(False, False)))
    parts.append(part("torus", color, (0, 0, bottom + height), major=radius - wall / 2,
                      minor=wall / 2))
    return tuple(parts)


def handle(centre: Vec3, major: float, minor: float, color: Vec3, across: bool = False) -> Parts:
    """A ring standing upright in the x-z plane (in the y-z plane if ``across``)."""
    return (part("torus", color, centre, rx=90.0, rz=90.0 if across else 0.0, major=major,
                 minor=minor),)


def drum(radius: float, height: float, bottom: float, color: Vec3, x: float = 0.0,
         y: float = 0.0) -> Parts:
    """A closed upright cylinder: a base, a saucer, a gallery, a hat."""
    return (part("cylinder", color, (x, y, bottom), radius=radius, height=height),)


def ball(centre: Vec3, radii: Vec3, color: Vec3) -> Parts:
    """A solid ellipsoid (a sphere if the radii agree)."""
    return (part("ellipsoid", color, centre, radii=radii),)


def stem(radius: float, height: float, bottom: float, color: Vec3, x: float = 0.0) -> Parts:
    """A thin upright cylinder: a mushroom's stem, a lamp's pole, a trunk, a shaft."""
    return (part("cylinder", color, (x, 0, bottom), radius=radius, height=height),)


def cap(dome: bool, radius: float, height: float, rim: float, color: Vec3,
        closed: bool = False, x: float = 0.0, y: float = 0.0) -> Parts:
    """A dome (upper half ellipsoid, open below) or a cone with its rim at ``rim``; ``closed``
    gives a cone its base disc."""
    if dome:
        return (part("ellipsoid", color, (x, y, rim), radii=(radius, radius, height),
                     z_min=0.0),)
    return (part("cone", color, (x, y, rim), radius=radius, height=height, base=closed),)


def tall_body(radius: float, height: float, bottom: float, colors: Sequence[Vec3],
              bands: int = 1, taper: float = 0.0, square: bool = False, x: float = 0.0,
              y: float = 0.0) -> Parts:
    """An upright body of ``bands`` stacked drums (boxes of side 2 radius if ``square``), each
    ``taper`` narrower than the one below, coloured in turn from ``colors``."""
    band = height / bands
    parts = []
    for i in range(bands):
        r, color = radius - i * taper, colors[i % len(colors)]
        if square:
            parts.append(part("box", color, (x, y, bottom + (i + 0.5) * band),
                              size=(2 * r, 2 * r, band)))
        else:
            parts.append(part("cylinder", color, (x, y, bottom + i * band), radius=r,
                              height=band))
    return tuple(parts)


def spire(radius: float, height: float, bottom: float, color: Vec3) -> Parts:
    """A solid cone on top of a tall body: a nose cone, a conical roof."""
    return (part("cone", color, (0, 0, bottom), radius=radius, height=height),)


def walls(size_x: float, size_y: float, height: float, color: Vec3) -> Parts:
    """A building's walls: a box standing on z = 0."""
    return (part("box", color, (0, 0, height / 2), size=(size_x, size_y, height)),)


def gable_roof(size_x: float, size_y: float, height: float, bottom: float, color: Vec3,
               ridge_along_x: bool) -> Parts:
    """A gable roof over a size_x x size_y plan; its ridge runs along y unless
    ``ridge_along_x`` (then its gables face the front and back)."""
    if ridge_along_x:
        return (part("prism", color, (0, 0, bottom), rz=90.0, width=size_y, depth=size_x,
                     height=height),)
    return (part("prism", color, (0, 0, bottom), width=size_x, depth=size_y, height=height),)


def _front_panel(face_x: float, y: float, z: float, width: float, height: float, color: Vec3,
                 sink: float) -> Part:
    """A thin box on a front face at x = ``face_x``, standing 0.02 proud of it and reaching
    ``sink`` behind it (into a curved face)."""
    depth = sink + 0.02
    return part("box", color, (face_x + 0.02 - depth / 2, y, z), size=(depth, width, height))


def door(face_x: float, y: float, bottom: float, width: float, height: float, color: Vec3,
         sink: float = 0.0) -> Parts:
    """A door on the front face from ``bottom`` up."""
    return (_front_panel(face_x, y, bottom + height / 2, width, height, color, sink),)


def window(face_x: float, y: float, z: float, width: float, height: float, color: Vec3,
           sink: float = 0.0, round_: bool = False) -> Parts:
    """A window centred at (y, z) on the front face; a ``round_`` one is a porthole bulging
    from it (a sphere of diameter ``width``)."""
    if round_:
        return (part("sphere", color, (face_x - width / 4, y, z), radius=width / 2),)
    return (_front_panel(face_x, y, z, width, height, color, sink),)


def _sink(radius: float, width: float) -> float:
    """How far a flat panel ``width`` wide must reach behind the front of a drum of ``radius``
    to meet its surface at the panel's edges."""
    return radius - math.sqrt(max(radius ** 2 - (width / 2) ** 2, 0.0)) + 0.01


def _on_ball(centre: Vec3, radius: float, elevation_deg: float, azimuth_deg: float) -> Vec3:
    """The point of a ball's surface in a direction (degrees, azimuth 0 = +x)."""
    el, az = math.radians(elevation_deg), math.radians(azimuth_deg)
    return (centre[0] + radius * math.cos(el) * math.cos(az),
            centre[1] + radius * math.cos(el) * math.sin(az),
            centre[2] + radius * math.sin(el))


# -- the categories' samplers: a Draw -> [(part builder name, parts)] ----------------------------
Groups = List[Tuple[str, Parts]]


def _seat_on_legs(d: Draw, size_x: float, size_y: float, height: float, round_top: bool,
                  rung_chance: float, leg_width: Tuple[float, float]) -> Tuple[Groups, Vec3]:
    """Legs, a seat (or top) whose top is at ``height``, and perhaps rungs; also returns the
    frame colour, for a backrest."""
    frame = d.color(WOODS)
    top_color = frame if d.chance(0.5) else d.color(FABRICS)
    thickness = d.uniform(0.04, 0.08)
    width = d.uniform(*leg_width)
    # A round top's legs stand on a square inside its disc; a square top's legs are inset.
    span = (0.65 * size_x,) * 2 if round_top else (size_x - d.uniform(0, 0.06),
                                                   size_y - d.uniform(0, 0.06))
    groups = [("legs", legs(span[0], span[1], height - thickness, width, frame)),
              ("seat", seat(size_x, size_y, thickness, height, top_color, round_top))]
    if d.chance(rung_chance):
        rung_z = d.uniform(0.2, 0.4) * height
        groups.append(("rungs", rungs(span[0], span[1], rung_z, width, frame)))
    return groups, frame


def sample_chair_parts(d: Draw) -> Groups:
    size_x, size_y, height = d.uniform(0.42, 0.55), d.uniform(0.42, 0.55), d.uniform(0.42, 0.58)
    groups, frame = _seat_on_legs(d, size_x, size_y, height, False, 0.3, (0.04, 0.07))
    groups.append(("backrest", backrest(size_x, size_y, height, d.uniform(0.35, 0.65),
                                        d.uniform(0.04, 0.07), frame)))
    return groups


def sample_stool_parts(d: Draw) -> Groups:
    round_top = d.chance(0.6)
    size = d.uniform(0.32, 0.45)
    groups, _ = _seat_on_legs(d, size, size, d.uniform(0.5, 0.85), round_top, 0.6,
                              (0.035, 0.06))
    return groups


def sample_table_parts(d: Draw) -> Groups:
    round_top = d.chance(0.3)
    size_x = d.uniform(0.6, 0.85)
    size_y = size_x if round_top else d.uniform(0.6, 1.0)
    groups, _ = _seat_on_legs(d, size_x, size_y, d.uniform(0.42, 0.6), round_top, 0.2,
                              (0.05, 0.09))
    return groups


def sample_bench_parts(d: Draw) -> Groups:
    size_x, size_y, height = d.uniform(0.3, 0.42), d.uniform(0.9, 1.25), d.uniform(0.35, 0.48)
    groups, frame = _seat_on_legs(d, size_x, size_y, height, False, 0.3, (0.05, 0.08))
    if d.chance(0.5):
        groups.append(("backrest", backrest(size_x, size_y, height, d.uniform(0.22, 0.4),
                                            d.uniform(0.04, 0.06), frame)))
    return groups


def _liquid(d: Draw, p: float) -> Tuple[Vec3, float] | None:
    return (d.color(DRINKS), d.uniform(0.7, 0.92)) if d.chance(p) else None


def sample_mug_parts(d: Draw) -> Groups:
    radius, height = d.uniform(0.26, 0.4), d.uniform(0.45, 0.9)
    color = d.color(BRIGHTS)
    major, minor = d.uniform(0.12, 0.18), d.uniform(0.035, 0.055)
    groups = [("vessel", vessel(radius, height, 0.0, d.uniform(0.04, 0.06), color,
                                _liquid(d, 0.6))),
              ("handle", handle((-(radius + 0.7 * major), 0, d.uniform(0.4, 0.6) * height),
                                major, minor, color))]
    if d.chance(0.6):  # a band on the front, so the mug has one
        groups.append(("stripe", (part("box", d.color(BRIGHTS), (radius - 0.02, 0, height / 2),
                                       size=(0.06, d.uniform(0.2, 0.35),
                                             d.uniform(0.1, 0.3) * height)),)))
    return groups


def sample_cup_parts(d: Draw) -> Groups:
    color = d.color(CERAMICS)
    saucer_h = d.uniform(0.03, 0.05)
    radius, height = d.uniform(0.22, 0.34), d.uniform(0.2, 0.36)
    major = d.uniform(0.07, 0.1)
    saucer_color = color if d.chance(0.5) else WHITE
    return [("drum", drum(d.uniform(1.3, 1.7) * radius, saucer_h, 0.0, saucer_color)),
            ("vessel", vessel(radius, height, saucer_h, d.uniform(0.03, 0.045), color,
                              _liquid(d, 0.7))),
            ("handle", handle((-(radius + 0.6 * major), 0, saucer_h + 0.55 * height), major,
                              d.uniform(0.02, 0.03), color))]


def sample_vase_parts(d: Draw) -> Groups:
    color = d.color(CERAMICS)
    belly_r, belly_h = d.uniform(0.24, 0.4), d.uniform(0.25, 0.42)
    groups: Groups = []
    bottom = 0.0
    if d.chance(0.5):
        foot_h = d.uniform(0.03, 0.06)
        groups.append(("drum", drum(d.uniform(0.5, 0.8) * belly_r, foot_h, 0.0, color)))
        bottom = foot_h - 0.1 * belly_h  # the belly sits into its foot
    centre = bottom + belly_h
    groups.append(("ball", ball((0, 0, centre), (belly_r, belly_r, belly_h), color)))
    neck_r = d.uniform(0.3, 0.6) * belly_r
    neck_bottom = centre + belly_h * math.sqrt(1 - (neck_r / belly_r) ** 2) - 0.05
    neck_h = d.uniform(0.15, 0.4) + 0.05
    groups.append(("vessel", vessel(neck_r, neck_h, neck_bottom, 0.035, color, None)))
    if d.chance(0.3):  # an amphora's handles, on the neck's sides
        major = d.uniform(0.07, 0.12)
        z = neck_bottom + 0.6 * neck_h
        groups.append(("handle", sum((handle((0, s * (neck_r + 0.6 * major), z), major, 0.025,
                                             color, across=True) for s in (-1, 1)), ())))
    return groups


def sample_mushroom_parts(d: Draw) -> Groups:
    stem_r, stem_h = d.uniform(0.08, 0.17), d.uniform(0.3, 0.65)
    dome = d.chance(0.75)
    cap_r, cap_h = d.uniform(0.3, 0.52), d.uniform(0.18, 0.4)
    cap_color = d.color(((0.85, 0.1, 0.1), (0.5, 0.3, 0.15), (0.55, 0.25, 0.7),
                         (0.85, 0.6, 0.3)))
    groups = [("stem", stem(stem_r, stem_h, 0.0, d.color(((0.92, 0.88, 0.78),)))),
              ("cap", cap(dome, cap_r, cap_h, stem_h, cap_color))]
    spot_color = d.color(((0.95, 0.93, 0.85),))
    spots = []
    for _ in range(d.integer(0, 5) if dome else 0):
        # On the dome at a random direction, sunk halfway into it.
        el, az = math.radians(d.uniform(20, 70)), math.radians(d.uniform(-180, 180))
        r = d.uniform(0.04, 0.07)
        on_dome = (cap_r * math.cos(el) * math.cos(az), cap_r * math.cos(el) * math.sin(az),
                   stem_h + cap_h * math.sin(el))
        spots += ball(on_dome, (r, r, r), spot_color)
    if spots:
        groups.append(("ball", tuple(spots)))
    return groups


def sample_lamp_parts(d: Draw) -> Groups:
    dark = d.color(DARKS)
    base_h, pole_h = d.uniform(0.04, 0.1), d.uniform(0.45, 0.8)
    shade_h = d.uniform(0.22, 0.4)
    pole_top = base_h + pole_h
    return [("drum", drum(d.uniform(0.16, 0.3), base_h, 0.0, dark)),
            ("stem", stem(d.uniform(0.02, 0.04), pole_h, base_h, d.color(STONES))),
            ("cap", cap(d.chance(0.4), d.uniform(0.22, 0.36), shade_h, pole_top - 0.55 * shade_h,
                        d.color(BRIGHTS)))]


def sample_tree_parts(d: Draw) -> Groups:
    trunk_h = d.uniform(0.15, 0.4)
    groups = [("stem", stem(d.uniform(0.05, 0.11), trunk_h, 0.0, d.color(WOODS[:3])))]
    green = d.color(GREENS)
    if d.chance(0.5):  # a pine: stacked cones, each smaller
        radius, height = d.uniform(0.3, 0.45), d.uniform(0.3, 0.45)
        rim, cones = trunk_h - 0.05, []
        for _ in range(d.integer(2, 3)):
            cones += cap(False, radius, height, rim, green, closed=True)
            rim += 0.45 * height
            radius, height = 0.75 * radius, 0.85 * height
        groups.append(("cap", tuple(cones)))
    else:  # a round crown
        radius, height = d.uniform(0.28, 0.45), d.uniform(0.28, 0.45)
        groups.append(("ball", ball((0, 0, trunk_h + 0.75 * height), (radius, radius, height),
                                    green)))
    return groups


def sample_umbrella_parts(d: Draw) -> Groups:
    shaft_h = d.uniform(0.75, 1.0)
    canopy_h = d.uniform(0.15, 0.32)
    major = d.uniform(0.05, 0.08)
    dark = d.color(DARKS)
    return [("stem", stem(d.uniform(0.015, 0.025), shaft_h, 0.0, dark)),
            ("cap", cap(d.chance(0.6), d.uniform(0.42, 0.62), canopy_h, shaft_h - canopy_h - 0.04,
                        d.color(BRIGHTS))),
            ("ball", ball((0, 0, shaft_h), (0.025,) * 3, dark)),
            # A hook: the ring hangs from the shaft's foot, towards the back.
            ("handle", handle((-major, 0, 0), major, d.uniform(0.015, 0.022), dark))]


def sample_rocket_parts(d: Draw) -> Groups:
    radius, length = d.uniform(0.13, 0.22), d.uniform(0.55, 1.0)
    body, trim = d.color(BRIGHTS), d.color(BRIGHTS)
    fin_len, fin_h = d.uniform(0.12, 0.22), d.uniform(0.18, 0.3)
    n_fins = d.integer(3, 4)
    fins = []
    for i in range(n_fins):
        angle = math.pi + 2 * math.pi * (i + 0.5 * (n_fins == 4)) / n_fins
        reach = radius + fin_len / 2 - 0.04  # the fin's inner end inside the body
        fins.append(part("box", trim, (reach * math.cos(angle), reach * math.sin(angle),
                                       fin_h / 2), rz=math.degrees(angle),
                         size=(fin_len, 0.03, fin_h)))
    port = d.uniform(0.1, 0.15)
    portholes = ()
    for i in range(d.integer(1, 2)):
        portholes += window(radius, 0, length * (0.7 - 0.2 * i), port, port, GLASS, round_=True)
    return [("tall_body", tall_body(radius, length, 0.0, (body,))),
            ("spire", spire(radius, d.uniform(0.2, 0.4), length, trim)),
            ("fins", tuple(fins)),
            ("window", portholes)]


def sample_lighthouse_parts(d: Draw) -> Groups:
    radius, height = d.uniform(0.15, 0.24), d.uniform(0.55, 0.85)
    bands, taper = d.integer(3, 6), d.uniform(0.0, 0.02)
    colors = (d.color(((0.85, 0.1, 0.1), (0.15, 0.3, 0.7))), WHITE)
    top_r = radius - (bands - 1) * taper
    gallery_h = d.uniform(0.03, 0.05)
    lantern_r, lantern_h = 0.75 * top_r, d.uniform(0.12, 0.2)
    dark = d.color(DARKS)
    lantern_bottom = height + gallery_h
    groups = [("tall_body", tall_body(radius, height, 0.0, colors, bands, taper)),
              ("drum", drum(top_r + 0.05, gallery_h, height, d.color(STONES))
               + drum(lantern_r, lantern_h, lantern_bottom, (0.98, 0.9, 0.4))),
              ("spire", spire(lantern_r + 0.03, d.uniform(0.08, 0.18), lantern_bottom + lantern_h,
                              dark))]
    door_w = d.uniform(0.08, 0.12)
    groups.append(("door", door(radius, 0, 0.0, door_w, d.uniform(0.14, 0.2), dark,
                                _sink(radius, door_w))))
    if d.chance(0.6):
        z = d.uniform(0.45, 0.7) * height
        r = radius - taper * int(z / (height / bands))
        groups.append(("window", window(r, 0, z, 0.06, 0.08, dark, _sink(r, 0.06))))
    return groups


def sample_tower_parts(d: Draw) -> Groups:
    square = d.chance(0.5)
    radius, height = d.uniform(0.14, 0.24), d.uniform(0.7, 1.1)
    stone = d.color(STONES)
    # Courses of two shades: one colour would draw as a flat silhouette (no lighting).
    courses = (stone, _shade(stone, 0.85))
    dark = d.color(DARKS)

    def sink(width: float) -> float:
        return 0.0 if square else _sink(radius, width)

    groups = [("tall_body", tall_body(radius, height, 0.0, courses, d.integer(2, 5),
                                      square=square))]
    if d.chance(0.5):  # a conical roof, wide enough to cover a square tower's corners
        roof_r = (math.sqrt(2) if square else 1.0) * radius + 0.04
        groups.append(("spire", spire(roof_r, d.uniform(0.25, 0.45), height,
                                      d.color(ROOFS))))
    else:  # battlements: merlons on the top edge, at a square's corners and mid-sides
        merlon = d.uniform(0.06, 0.09)
        ring = radius - merlon / 2
        angles = [math.pi * i / 4 for i in range(8)]
        reach = [ring * (math.sqrt(2) if square and i % 2 else 1.0) for i in range(8)]
        groups.append(("battlements", tuple(
            part("box", _shade(stone, 0.7), (r * math.cos(a), r * math.sin(a),
                                             height + merlon / 2),
                 rz=0.0 if square else math.degrees(a), size=(merlon, merlon, merlon))
            for a, r in zip(angles, reach))))
    door_w = d.uniform(0.1, 0.16)
    door_h = d.uniform(0.18, 0.26)
    groups.append(("door", door(radius, 0, 0.0, door_w, door_h, dark, sink(door_w))))
    win = ()
    for i in range(d.integer(1, 3)):
        z = door_h + 0.12 + (height - door_h - 0.2) * (i + 0.5) / 3
        win += window(radius, 0, z, 0.07, 0.1, dark, sink(0.07))
    groups.append(("window", win))
    return groups


def sample_house_parts(d: Draw) -> Groups:
    depth, frontage = d.uniform(0.45, 0.72), d.uniform(0.6, 0.95)
    wall_h, roof_h = d.uniform(0.4, 0.62), d.uniform(0.25, 0.45)
    overhang = d.uniform(0.04, 0.1)
    side = d.sign()
    door_w, door_h = d.uniform(0.14, 0.22), d.uniform(0.26, 0.36) * wall_h / 0.5
    door_y = side * d.uniform(0.06, frontage / 2 - 0.06 - door_w / 2)
    win_w = d.uniform(0.1, 0.15)
    groups = [("walls", walls(depth, frontage, wall_h, d.color(WALLS))),
              ("gable_roof", gable_roof(depth + overhang, frontage + overhang, roof_h, wall_h,
                                        d.color(ROOFS), False)),
              ("door", door(depth / 2, door_y, 0.0, door_w, min(door_h, wall_h - 0.08),
                            d.color(((0.45, 0.25, 0.1), (0.2, 0.3, 0.5))))),
              ("window", window(depth / 2, -side * (frontage / 2 - 0.06 - win_w / 2),
                                0.6 * wall_h, win_w, win_w, GLASS))]
    if d.chance(0.7):
        size = d.uniform(0.09, 0.14)
        groups.append(("chimney", (part("box", d.color(BRICKS), (-depth / 4, side * frontage / 4,
                                                                wall_h + 0.6 * roof_h),
                                        size=(size, size, 0.5 * roof_h + 0.15)),)))
    return groups


def sample_barn_parts(d: Draw) -> Groups:
    depth, frontage = d.uniform(0.6, 0.85), d.uniform(0.5, 0.72)
    wall_h, roof_h = d.uniform(0.38, 0.55), d.uniform(0.25, 0.4)
    red, trim = d.color(BARN_REDS), WHITE
    overhang = d.uniform(0.03, 0.08)
    door_w, door_h = d.uniform(0.45, 0.65) * frontage, d.uniform(0.6, 0.8) * wall_h
    groups = [("walls", walls(depth, frontage, wall_h, red)),
              ("gable_roof", gable_roof(depth + overhang, frontage + overhang, roof_h, wall_h,
                                        d.color(BARN_ROOFS), True)),
              ("door", door(depth / 2, 0, 0.0, door_w, door_h, trim)),
              ("window", window(depth / 2, 0, wall_h + 0.3 * roof_h, 0.1, 0.1, trim))]
    if d.chance(0.4):  # a silo beside it, behind the front
        silo_r = d.uniform(0.1, 0.15)
        silo_h = wall_h + d.uniform(0.2, 0.4)
        x, y = -0.15 * depth, -(frontage / 2 + silo_r + 0.01)
        stone = d.color(STONES)
        groups += [("tall_body", tall_body(silo_r, silo_h, 0.0, (stone,), x=x, y=y)),
                   ("cap", cap(True, silo_r, 0.8 * silo_r, silo_h, stone, x=x, y=y))]
    return groups


def sample_snowman_parts(d: Draw) -> Groups:
    radius = d.uniform(0.26, 0.36)
    shrink = d.uniform(0.65, 0.8)
    z, body = radius, []
    for i in range(d.integer(2, 3)):
        body += ball((0, 0, z), (radius,) * 3, WHITE)
        head_z, head_r = z, radius
        z += radius + 0.75 * radius * shrink  # the next ball sinks a quarter into this one
        radius *= shrink
    eye_r, eye_el, eye_az = d.uniform(0.03, 0.045), d.uniform(8, 20), d.uniform(15, 25)
    eyes = sum((ball(_on_ball((0, 0, head_z), head_r * 0.95, eye_el, s * eye_az), (eye_r,) * 3,
                     BLACK) for s in (-1, 1)), ())
    nose_len = d.uniform(0.12, 0.22)
    # The nose cone's axis (+z) is turned to +x: x by -90 degrees, then z by -90 degrees.
    nose = part("cone", (1.0, 0.45, 0.05), (0.9 * head_r, 0, head_z), rx=-90.0, rz=-90.0,
                radius=d.uniform(0.035, 0.055), height=nose_len)
    groups = [("ball", tuple(body) + eyes), ("nose", (nose,))]
    if d.chance(0.7):
        hat = d.color(DARKS + BRIGHTS[:2])
        brim_r, brim_h = head_r * d.uniform(0.75, 1.0), d.uniform(0.02, 0.035)
        top = head_z + 0.85 * head_r
        groups.append(("drum", drum(brim_r, brim_h, top, hat)
                       + drum(0.65 * brim_r, d.uniform(0.15, 0.25), top + brim_h, hat)))
    return groups


# -- categories ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Category:
    """A category: its prompt, the part builders its instances use and its sampler."""

    name: str
    prompt: str
    parts: Tuple[str, ...]  # names of the part builders (``CategoryObject.roles``) it uses
    sample_parts: Callable[[Draw], Groups]

    def sample(self, seed: int) -> CategoryObject:
        """The instance of this category for ``seed`` (an int >= 0; see ``held_out_seeds``)."""
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"a category seed is a whole number >= 0, got {seed!r}")
        seed = int(seed)
        groups = self.sample_parts(Draw(self.name, seed))
        parts = tuple(p for _, group in groups for p in group)
        roles = tuple(role for role, group in groups for _ in group)
        return CategoryObject(f"{self.name}_{seed:07d}", self.prompt, _fit(parts), self.name,
                              seed, roles)

    @property
    def fixed(self) -> Tuple[ShapeObject, ...]:
        """Today's named objects of this category (those of ``SHAPE_WORLD`` with its prompt)."""
        return tuple(o for o in SHAPE_WORLD if o.prompt == self.prompt)


_CATEGORY_LIST = (
    Category("mug", "a mug", ("vessel", "handle", "stripe"), sample_mug_parts),
    Category("cup", "a cup", ("drum", "vessel", "handle"), sample_cup_parts),
    Category("vase", "a vase", ("drum", "ball", "vessel", "handle"), sample_vase_parts),
    Category("chair", "a chair", ("legs", "seat", "rungs", "backrest"), sample_chair_parts),
    Category("stool", "a stool", ("legs", "seat", "rungs"), sample_stool_parts),
    Category("table", "a table", ("legs", "seat", "rungs"), sample_table_parts),
    Category("bench", "a bench", ("legs", "seat", "rungs", "backrest"), sample_bench_parts),
    Category("house", "a house with a door", ("walls", "gable_roof", "door", "window", "chimney"),
             sample_house_parts),
    Category("barn", "a barn", ("walls", "gable_roof", "door", "window", "tall_body", "cap"),
             sample_barn_parts),
    Category("mushroom", "a mushroom", ("stem", "cap", "ball"), sample_mushroom_parts),
    Category("lamp", "a lamp", ("drum", "stem", "cap"), sample_lamp_parts),
    Category("tree", "a tree", ("stem", "cap", "ball"), sample_tree_parts),
    Category("umbrella", "an umbrella", ("stem", "cap", "ball", "handle"), sample_umbrella_parts),
    Category("rocket", "a rocket", ("tall_body", "spire", "fins", "window"), sample_rocket_parts),
    Category("lighthouse", "a lighthouse", ("tall_body", "drum", "spire", "door", "window"),
             sample_lighthouse_parts),
    Category("tower", "a tower", ("tall_body", "spire", "battlements", "door", "window"),
             sample_tower_parts),
    Category("snowman", "a snowman", ("ball", "nose", "drum"), sample_snowman_parts),
)
CATEGORIES: Dict[str, Category] = {c.name: c for c in _CATEGORY_LIST}


def _shared_parts() -> Dict[str, List[str]]:
    users: Dict[str, List[str]] = {}
    for c in _CATEGORY_LIST:
        for role in c.parts:
            users.setdefault(role, []).append(c.name)
    return {role: names for role, names in users.items() if len(names) > 1}


# Part builder -> the categories whose instances use it (the table in the docstring).
SHARED_PARTS: Dict[str, List[str]] = _shared_parts()


def category(name: str) -> Category:
    """The category called ``name``; an unknown name is an error that lists the known ones."""
    if name not in CATEGORIES:
        raise ValueError(f"unknown shape category {name!r}; known: {', '.join(CATEGORIES)}")
    return CATEGORIES[name]


def ambiguous_with(name: str) -> List[str]:
    """The other categories sharing a part builder with ``name``, most shared parts first."""
    own = set(category(name).parts)
    shared = {c.name: len(own & set(c.parts)) for c in _CATEGORY_LIST if c.name != name}
    return sorted((n for n, k in shared.items() if k), key=lambda n: (-shared[n], n))


# -- the seed split ------------------------------------------------------------------------------
def is_held_out(seed: int) -> bool:
    """Whether ``seed`` is kept out of training (seeds >= ``HELD_OUT_SEED_START``)."""
    return seed >= HELD_OUT_SEED_START


def train_seeds(n: int) -> List[int]:
    """The first ``n`` training seeds: 0 .. n - 1 (at most ``HELD_OUT_SEED_START``)."""
    if not 0 <= n <= HELD_OUT_SEED_START:
        raise ValueError(f"there are {HELD_OUT_SEED_START} training seeds, asked for {n}")
    return list(range(n))


def held_out_seeds(n: int) -> List[int]:
    """The first ``n`` held-out seeds, from ``HELD_OUT_SEED_START`` on."""
    if n < 0:
        raise ValueError(f"asked for {n} held-out seeds")
    return list(range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + n))


# -- geometry of an instance ---------------------------------------------------------------------
_LENGTH_PARAMS = {"radius", "height", "size", "radii", "major", "minor", "width", "depth"}


def _moved(p: Part, dz: float, scale: float) -> Part:
    """``p`` moved by ``dz`` along z, then scaled by ``scale`` about the origin."""
    params = tuple((k, tuple(scale * x for x in v) if isinstance(v, tuple) else scale * v)
                   if k in _LENGTH_PARAMS else (k, v) for k, v in p.params)
    x, y, z = p.offset
    return replace(p, params=params, offset=(scale * x, scale * y, scale * (z + dz)))


def _fit(parts: Parts) -> Parts:
    """The parts with their height centred on the origin, scaled down about it if their surface
    would reach past ``REACH`` (measured on a dense fixed sample of it)."""
    probe = ShapeObject("probe", "", parts)
    points = surface_points(probe, 16384, torch.Generator().manual_seed(0)).double()
    dz = -float(points[:, 2].min() + points[:, 2].max()) / 2
    reach = float((points + torch.tensor([0, 0, dz], dtype=points.dtype)).norm(dim=-1).max())
    scale = min(1.0, REACH / reach)
    return tuple(_moved(p, dz, scale) for p in parts)


def _to_world(p: Part, local: Tensor) -> Tensor:
    """Points of a part's frame in the world's (as ``object_splats`` places them). ``[n,3]``."""
    R = _rotation(p.rotate_x_deg, p.rotate_z_deg)
    return local @ R.T + torch.tensor(p.offset, dtype=torch.float64)


def surface_points(obj: ShapeObject, n: int, generator: torch.Generator) -> Tensor:
    """``n`` points on the object's surfaces (every part's, hidden ones too, as its splats),
    area-weighted across parts, in part order. ``[n, 3]`` float32."""
    return part_surface_points(obj, n, generator)[0]


def part_surface_points(obj: ShapeObject, n: int,
                        generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """:func:`surface_points` with the part each point lies on: ``(points [n, 3] float32,
    part [n] int64, the index into obj.parts)``."""
    areas = torch.tensor([_area(p) for p in obj.parts], dtype=torch.float64)
    which = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=generator)
    counts = torch.bincount(which, minlength=len(obj.parts)).tolist()
    points = [_to_world(p, getattr(primitives, p.kind)(k, generator, **dict(p.params))[0])
              for p, k in zip(obj.parts, counts) if k]
    part = torch.repeat_interleave(torch.arange(len(obj.parts)), torch.tensor(counts))
    return torch.cat(points).float(), part


def grid_centres(resolution: int, half_extent: float = GRID_HALF_EXTENT) -> Tensor:
    """Cell centres of a ``resolution``^3 grid over [-h, h]^3, indexed [x, y, z]. ``[R,R,R,3]``
    float64."""
    ticks = (torch.arange(resolution, dtype=torch.float64) + 0.5) * (2 * half_extent
                                                                     / resolution) - half_extent
    return torch.stack(torch.meshgrid(ticks, ticks, ticks, indexing="ij"), -1)


def occupancy_grid(obj: ShapeObject, resolution: int = 32,
                   half_extent: float = GRID_HALF_EXTENT) -> Tensor:
    """Which cells of a ``resolution``^3 grid over [-h, h]^3 (h = ``half_extent``) have their
    centre inside a part; shells and thin parts are at least one cell thick (module docstring).
    ``[R, R, R]`` bool, indexed [x, y, z]."""
    centres = grid_centres(resolution, half_extent)
    thickness = max(primitives.SHELL_THICKNESS, 1.05 * 2 * half_extent / resolution)
    occupied = torch.zeros(centres.shape[:-1], dtype=torch.bool)
    for p in obj.parts:
        R = _rotation(p.rotate_x_deg, p.rotate_z_deg)
        local = (centres - torch.tensor(p.offset, dtype=torch.float64)) @ R  # inverse of _to_world
        occupied |= primitives.INSIDE_TESTS[p.kind](local, thickness=thickness, **dict(p.params))
    return occupied


def to_generator_box(points: Tensor) -> Tensor:
    """World points in TRELLIS's [-0.5, 0.5]^3 frame: scaled by ``GENERATOR_SCALE``. ``[...,3]``."""
    return points * GENERATOR_SCALE


__all__ = ["CATEGORIES", "Category", "CategoryObject", "GENERATOR_SCALE", "GRID_HALF_EXTENT",
           "HELD_OUT_SEED_START", "REACH", "SHARED_PARTS", "ambiguous_with", "category",
           "grid_centres", "held_out_seeds", "is_held_out", "occupancy_grid",
           "part_surface_points", "surface_points", "to_generator_box", "train_seeds"]
