"""Shape categories: parametric instances, their occupancy, surface samples, views and split."""

import hashlib
import math

import pytest
import torch

from cfd.renderers.projection import ALPHA_THRESHOLD, MAX_EXTENT_SIGMAS, quat_to_rotmat
from cfd.scene.splats import PARAM_KEYS
from cfd.shapes import categories as C
from cfd.shapes.catalogue import VARIANTS_PER_CATEGORY, objects_for, prior_objects, prompts
from cfd.shapes.dataset import ShapeDatasetConfig, render_views
from cfd.shapes.world import SHAPE_WORLD, ShapeObject, object_splats, part

# sha256 (first 16 hex digits) of each object's splat parameters, recorded before the categories
# were added: the embedded prior and its benchmarks depend on them bit for bit.
WORLD_SPLAT_HASHES = {
    "mug_red": "b5e8e9cd1dc22960",
    "mug_blue_tall": "8780d6c0e5a2f737",
    "chair_wood": "2e1c4f7a7f1d0881",
    "chair_green_tall": "f00fa3a949bc6673",
    "house_yellow": "701f71981b8e794a",
    "house_blue_wide": "98b1c4df85aa8af3",
    "mushroom_red": "63c78c40ba302628",
    "mushroom_brown_squat": "e13f515b44484e7b",
    "mushroom_purple": "dbc7c8995ab5d923",
    "rocket_white": "3975d785c220cd1b",
    "rocket_orange": "b782f4d34aca81d4",
    "snowman": "bfa66db3c4facf07",
    "lamp_yellow": "38f33a2e0f00697f",
    "lamp_teal": "7e88164106a2498a",
}
WORLD_PROMPTS = ["a mug", "a chair", "a house with a door", "a mushroom", "a rocket", "a snowman",
                 "a lamp"]


def splat_hash(obj) -> str:
    splats = object_splats(obj)
    h = hashlib.sha256()
    for key in PARAM_KEYS:
        h.update(splats.params[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_existing_objects_and_prompts_are_unchanged():
    assert {o.name: splat_hash(o) for o in SHAPE_WORLD} == WORLD_SPLAT_HASHES
    assert prompts()[:len(WORLD_PROMPTS)] == WORLD_PROMPTS
    assert prior_objects()[:len(SHAPE_WORLD)] == SHAPE_WORLD
    for prompt in WORLD_PROMPTS:
        assert objects_for(prompt) == [o for o in SHAPE_WORLD if o.prompt == prompt]


def test_the_prior_knows_every_category_by_its_fixed_training_variants():
    """A category without named members joins the prior as the instances of its first training
    seeds, under its own prompt, after today's prompts; one with named members keeps them."""
    new = [c for c in C.CATEGORIES.values() if not c.fixed]
    assert len(new) == len(C.CATEGORIES) - len(WORLD_PROMPTS)
    assert prompts() == WORLD_PROMPTS + [c.prompt for c in new]
    for c in new:
        variants = objects_for(c.prompt)
        assert variants == [c.sample(seed) for seed in C.train_seeds(VARIANTS_PER_CATEGORY)]
        assert not any(C.is_held_out(v.seed) for v in variants)
    assert 2 <= VARIANTS_PER_CATEGORY <= 4
    assert len(prior_objects()) == len(SHAPE_WORLD) + len(new) * VARIANTS_PER_CATEGORY
    assert len({o.name for o in prior_objects()}) == len(prior_objects())
    with pytest.raises(ValueError, match=r"unknown prompt 'a sofa'[\s\S]*a mug[\s\S]*a stool"
                                         r"[\s\S]*a tower"):
        objects_for("a sofa")


def test_categories_extend_todays_prompts_with_their_objects_as_fixed_members():
    assert len(C.CATEGORIES) >= 12
    by_prompt = {c.prompt: c for c in C.CATEGORIES.values()}
    assert len(by_prompt) == len(C.CATEGORIES)  # one prompt per category
    for prompt in WORLD_PROMPTS:
        assert list(by_prompt[prompt].fixed) == objects_for(prompt)
        assert by_prompt[prompt].sample(0).prompt == prompt
    assert [o.name for o in C.category("chair").fixed] == ["chair_wood", "chair_green_tall"]
    assert C.category("stool").fixed == ()
    with pytest.raises(ValueError, match="known: mug"):
        C.category("sofa")


@pytest.mark.parametrize("name", list(C.CATEGORIES))
def test_sampling_is_deterministic_per_seed_and_seeds_differ(name):
    cat = C.category(name)
    a, b, other = cat.sample(7), cat.sample(7), cat.sample(8)
    assert a == b and splat_hash(a) == splat_hash(b)
    assert a.parts != other.parts and a.name != other.name
    assert (a.category, a.seed, len(a.roles)) == (name, 7, len(a.parts))
    with pytest.raises(ValueError, match="whole number"):
        cat.sample(-1)


def test_parameters_are_continuous():
    """Two seeds' chairs differ in their seat's size, not only in a choice among a few."""
    seats = {tuple(dict(p.params)["size"]) for s in range(6)
             for p, role in zip(C.category("chair").sample(s).parts,
                                C.category("chair").sample(s).roles) if role == "seat"}
    assert len(seats) == 6


def splat_reach(obj) -> float:
    """How far from the origin the object's splats are drawn (the bound of test_embedded_prior's
    camera-view test): the drawn ellipsoid lies in a cylinder along its thinnest axis."""
    splats = object_splats(obj)
    scales = splats.scales
    drawn = torch.sqrt(2 * torch.log(splats.opacities / ALPHA_THRESHOLD)).clamp(
        max=MAX_EXTENT_SIGMAS)
    local = torch.einsum("nji,nj->ni", quat_to_rotmat(splats.quats), splats.means)
    thin = scales.argmin(-1, keepdim=True)
    along = local.gather(-1, thin)[:, 0].abs()
    across = (local.square().sum(-1) - along.square()).clamp(min=0).sqrt()
    return torch.hypot(along + drawn * scales.gather(-1, thin)[:, 0],
                       across + drawn * scales.max(-1).values).max().item()


@torch.no_grad()
def test_every_instance_fits_in_the_view_of_the_nearest_dataset_camera():
    cfg = ShapeDatasetConfig()
    visible = min(cfg.distance_range) * math.sin(math.radians(min(cfg.fov_range)) / 2)
    g = torch.Generator().manual_seed(0)
    for name, cat in C.CATEGORIES.items():
        for seed in range(12):  # the surface, cheaply, over many seeds
            points = C.surface_points(cat.sample(seed), 4000, g)
            assert points.norm(dim=-1).max() <= C.REACH + 0.01, (name, seed)
        for seed in range(2):  # the splats as drawn
            assert splat_reach(cat.sample(seed)) <= visible, (name, seed)


def occupied_near(grid: torch.Tensor, points: torch.Tensor, half_extent: float) -> torch.Tensor:
    """Whether each point falls in an occupied cell or one of its 26 neighbours. ``[n]``."""
    R = grid.shape[0]
    near = torch.nn.functional.max_pool3d(grid[None, None].float(), 3, 1, 1)[0, 0] > 0
    index = ((points + half_extent) / (2 * half_extent) * R).long().clamp(0, R - 1)
    return near[index[:, 0], index[:, 1], index[:, 2]]


def test_occupancy_grid_agrees_with_the_splats():
    objects = [cat.sample(seed) for cat in C.CATEGORIES.values() for seed in (0, 1)]
    for obj in objects + list(SHAPE_WORLD):
        grid = C.occupancy_grid(obj, 32)
        assert grid.shape == (32, 32, 32) and grid.dtype == torch.bool
        centres = object_splats(obj).means.detach().double()
        hit = occupied_near(grid, centres, C.GRID_HALF_EXTENT).float().mean().item()
        assert hit > 0.95, (obj.name, hit)
        assert 0 < grid.float().mean() < 0.5, obj.name


def test_occupancy_agreement_fails_for_a_wrong_grid():
    """The agreement test can fail: the grid of the object turned upside down misses its
    splats."""
    for name in ("mushroom", "chair", "lamp"):
        obj = C.category(name).sample(0)
        centres = object_splats(obj).means.detach().double()
        flipped = C.occupancy_grid(obj, 32).flip(2)
        assert occupied_near(flipped, centres, C.GRID_HALF_EXTENT).float().mean() < 0.8, name


def test_occupancy_volumes_and_shells():
    cell = (2 * C.GRID_HALF_EXTENT / 64) ** 3
    ball = ShapeObject("ball", "", (part("sphere", (1, 1, 1), (0.1, 0, 0), radius=0.5),))
    volume = C.occupancy_grid(ball, 64).sum().item() * cell
    assert volume == pytest.approx(4 / 3 * math.pi * 0.5 ** 3, rel=0.02)
    # A box turned 45 degrees about z: a rotation the wrong way round would move its corners.
    turned = ShapeObject("turned", "", (part("box", (1, 1, 1), (0, 0, 0.1), rz=45.0,
                                             size=(0.8, 0.2, 0.4)),))
    grid = C.occupancy_grid(turned, 64)
    assert grid.sum().item() * cell == pytest.approx(0.8 * 0.2 * 0.4, rel=0.05)
    centres = C.grid_centres(64)
    along = centres[grid][:, :2] @ torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    assert along.abs().max() > 0.35  # its length lies along the diagonal x = y
    # An empty vessel is its wall and floor: its middle is empty, its wall full.
    cup = ShapeObject("cup", "", C.vessel(0.4, 0.8, -0.4, 0.05, (1, 1, 1), None))
    grid = C.occupancy_grid(cup, 64)
    centres = C.grid_centres(64)
    inside_wall = (torch.hypot(centres[..., 0], centres[..., 1]) < 0.3) & (centres[..., 2] > -0.2)
    assert not grid[inside_wall].any()
    ring = (torch.hypot(centres[..., 0], centres[..., 1]) - 0.37).abs() < 0.02
    assert grid[ring & (centres[..., 2].abs() < 0.3)].all()


def test_surface_points_are_area_weighted():
    """Two boxes of surface areas 1 : 4 get points in that ratio."""
    small = part("box", (1, 1, 1), (-0.4, 0, 0), size=(0.2, 0.2, 0.2))
    large = part("box", (1, 1, 1), (0.4, 0, 0), size=(0.4, 0.4, 0.4))
    points = C.surface_points(ShapeObject("boxes", "", (small, large)), 20000,
                              torch.Generator().manual_seed(0))
    assert points.shape == (20000, 3) and points.dtype == torch.float32
    assert (points[:, 0] > 0).float().mean().item() == pytest.approx(0.8, abs=0.02)
    on_large = points[points[:, 0] > 0] - torch.tensor([0.4, 0, 0])
    assert torch.allclose(on_large.abs().max(-1).values, torch.tensor(0.2), atol=1e-5)


def test_generator_box_holds_the_grid_cube():
    corner = torch.tensor([C.GRID_HALF_EXTENT, -C.GRID_HALF_EXTENT, C.GRID_HALF_EXTENT])
    assert torch.allclose(C.to_generator_box(corner), torch.tensor([0.5, -0.5, 0.5]))
    points = C.surface_points(C.category("rocket").sample(0), 2000,
                              torch.Generator().manual_seed(0))
    assert C.to_generator_box(points).abs().max() < 0.5


def test_shared_parts_are_built_by_the_same_builder(monkeypatch):
    for role in ("seat", "legs"):
        assert set(C.SHARED_PARTS[role]) >= {"chair", "stool", "table", "bench"}
    assert {"mug", "cup", "vase"} <= set(C.SHARED_PARTS["vessel"])
    assert {"mushroom", "lamp", "tree", "umbrella"} <= set(C.SHARED_PARTS["cap"])
    assert {"rocket", "lighthouse", "tower"} <= set(C.SHARED_PARTS["tall_body"])
    assert {"house", "barn"} <= set(C.SHARED_PARTS["gable_roof"])
    assert C.ambiguous_with("chair")[0] == "bench" and "stool" in C.ambiguous_with("chair")
    for name in C.CATEGORIES:  # ambiguity is mutual
        assert all(name in C.ambiguous_with(other) for other in C.ambiguous_with(name))
    # The table is true: each category's declared parts are the builders its instances use.
    for name, cat in C.CATEGORIES.items():
        used = {role for seed in range(30) for role in cat.sample(seed).roles}
        assert used == set(cat.parts), name
    # And a role names its builder: a chair's and a stool's seats are made by ``seat``.
    callers = []
    real_seat = C.seat
    monkeypatch.setattr(C, "seat", lambda *a, **k: callers.append(a) or real_seat(*a, **k))
    for name in ("chair", "stool", "table", "bench"):
        before = len(callers)
        obj = C.category(name).sample(3)
        assert len(callers) == before + 1, name
        seat_parts = tuple(p for p, role in zip(obj.parts, obj.roles) if role == "seat")
        assert len(seat_parts) == 1 and seat_parts[0].kind in ("box", "cylinder")


def test_the_docstring_table_is_shared_parts():
    lines = C.__doc__.split("Shared parts")[1].splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("==========")]
    rows = [line.split(None, 1) for line in lines[rules[1] + 1: rules[2]]]
    assert {role: names.split(", ") for role, names in rows} == C.SHARED_PARTS


def test_train_and_held_out_seeds_are_disjoint():
    train, held = C.train_seeds(1000), C.held_out_seeds(1000)
    assert not set(train) & set(held) and len(set(held)) == 1000
    assert not any(map(C.is_held_out, train)) and all(map(C.is_held_out, held))
    assert max(train) < C.HELD_OUT_SEED_START == min(held)
    assert C.category("tree").sample(held[0]).parts != C.category("tree").sample(0).parts
    with pytest.raises(ValueError):
        C.train_seeds(C.HELD_OUT_SEED_START + 1)


def test_render_views_uses_the_dataset_cameras_and_background():
    cfg = ShapeDatasetConfig()
    obj = C.category("lamp").sample(4)
    rgba, cams = render_views(obj, 3, 24, seed=5)
    assert rgba.shape == (3, 24, 24, 4) and len(cams) == 3
    assert rgba.min() >= 0 and rgba.max() <= 1
    alpha = rgba[..., 3]
    assert alpha.amax((1, 2)).min() > 0.9 and alpha[:, 0, 0].max() < 1e-3  # object, free corner
    background = rgba[:, 0, 0, :3]
    assert torch.allclose(background, torch.full_like(background, cfg.background), atol=1e-3)
    lo, hi = cfg.distance_range
    assert ((cams.distance >= lo) & (cams.distance <= hi)).all()
    again, _ = render_views(obj, 3, 24, seed=5)
    other, _ = render_views(obj, 3, 24, seed=6)
    assert torch.equal(rgba, again) and not torch.equal(rgba, other)
