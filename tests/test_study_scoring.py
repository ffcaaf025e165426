"""The study's own scoring of its runs (``study.scoring``) on the fake job, whose runs hand over
known scenes: the ground truth's own splats (Chamfer ~0, F-score ~1, the right variant),
diversity over seeds, resuming without scoring again, CLIP and DINOv2 metrics with tiny models,
the GPTEval3D export, and settings refused before any run."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from cfd.evaluation import scene_surface_points
from cfd.scene import NeRFConfig, NeRFField
from cfd.config import ConfigError
from cfd.shapes import GENERATOR_SCALE, object_splats, objects_for
from cfd.systems.ground_truth import geometry_against_shape_world
from cfd.systems.scenes import load_saved_scene, save_nerf_outputs
from core.errors import UserError
from guidance.loading import ModelWeightsNotFound
from study import run_study
from study.scoring import SCORES_NAME
from tests.tiny_eval_models import build_tiny_clip
from tests.tiny_models import build_tiny_dinov2

from .study_helpers import load_study, study_dir, write_fake_study


def save_truth(obj_name: str, path: Path, turn_deg: float = 0.0) -> Path:
    """The shape world's object ``obj_name`` as a splats.ply, turned about the up axis."""
    obj = next(o for o in objects_for("a mug") if o.name == obj_name)
    object_splats(obj).turned(turn_deg).save_ply(path)
    return path


def read_rows(tmp_path: Path) -> dict:
    with open(study_dir(tmp_path) / "results.csv") as f:
        return {(r["method"], r["seed"]): r for r in csv.DictReader(f)}


def test_geometry_and_diversity_of_known_scenes(tmp_path):
    save_truth("mug_red", tmp_path / "alpha_0.ply")
    save_truth("mug_red", tmp_path / "alpha_1.ply")
    save_truth("mug_red", tmp_path / "beta_0.ply", turn_deg=40.0)
    save_truth("mug_blue_tall", tmp_path / "beta_1.ply", turn_deg=90.0)
    fake = str(tmp_path / "fake.yaml")
    methods = [{"name": name, "config": fake,
                "overrides": [f"splats={tmp_path}/{name}_{{seed}}.ply"]}
               for name in ("alpha", "beta")]
    path = write_fake_study(tmp_path, study={
        "methods": methods, "prompts": ["a mug"],
        "scoring": {"geometry": True, "diversity": True, "surface_points": 3000}})
    summary = run_study(load_study(path))
    assert (summary["done"], summary["failed"]) == (4, 0)

    rows = read_rows(tmp_path)
    for key, variant in [(("alpha", "0"), "mug_red"), (("beta", "0"), "mug_red"),
                         (("beta", "1"), "mug_blue_tall")]:
        row = rows[key]
        # its own ground truth, turned back: only the two point draws differ (independent
        # draws of 3000 points are ~0.02 apart, the mug's two variants ~0.04)
        assert float(row["chamfer"]) < 0.028 and float(row["f_score"]) > 0.98
        assert row["gt_variant"] == variant
        # the fake job's own peak (numpy, imageio), not the driver's (torch) it forked from
        assert 10 < float(row["peak_rss_mb"]) < 200
    state = json.loads((study_dir(tmp_path) / "state.json").read_text())["runs"]
    assert state["beta/a_mug/seed1"]["scores"]["gt_rotation_deg"] == 90.0
    assert state["beta/a_mug/seed0"]["scores"]["gt_rotation_deg"] == 40.0

    report = (study_dir(tmp_path) / "report.md").read_text()
    diversity = report.split("## Diversity over seeds")[1]
    assert "| alpha | a mug | 2 | 1 of 2 | 0 |" in diversity  # identical seeds: no diversity
    beta = next(line for line in diversity.splitlines() if line.startswith("| beta |"))
    # two mugs, turned apart: well above the ~0.02 of two draws on one surface
    assert "| 2 of 2 |" in beta and float(beta.split("|")[-2]) > 0.035
    page = (study_dir(tmp_path) / "report.html").read_text()
    assert 'id="diversity"' in page and "chamfer" in page

    # the same study again: nothing runs, nothing is scored again
    scores_file = Path(rows[("alpha", "0")]["run_dir"]) / SCORES_NAME
    before = scores_file.stat().st_mtime_ns
    run_study(load_study(path))
    assert scores_file.stat().st_mtime_ns == before
    assert read_rows(tmp_path)[("alpha", "0")]["chamfer"] == rows[("alpha", "0")]["chamfer"]


def test_a_generators_box_is_scaled_into_the_world_before_scoring(tmp_path):
    """A method whose scenes are in a generator's box (the world scaled by 0.625) is scored
    in the world's frame through its scene_scale; changing the scale scores it again."""
    obj = next(o for o in objects_for("a mug") if o.name == "mug_red")
    object_splats(obj).scaled(GENERATOR_SCALE).save_ply(tmp_path / "boxed.ply")
    method = {"name": "gen", "config": str(tmp_path / "fake.yaml"),
              "overrides": [f"splats={tmp_path}/boxed.ply"]}

    def study(scale: float) -> Path:
        return write_fake_study(tmp_path, study={
            "methods": [{**method, "scene_scale": scale}], "prompts": ["a mug"], "seeds": [0],
            "scoring": {"geometry": True, "diversity": False, "surface_points": 3000}})

    assert run_study(load_study(study(1 / GENERATOR_SCALE)))["done"] == 1
    row = read_rows(tmp_path)[("gen", "0")]
    assert float(row["chamfer"]) < 0.028 and row["gt_variant"] == "mug_red"
    run_study(load_study(study(1.0)))
    assert float(read_rows(tmp_path)[("gen", "0")]["chamfer"]) > 0.1  # unscaled: too small
    with pytest.raises(ConfigError, match="scene_scale must be > 0"):
        run_study(load_study(study(0.0)))


def test_an_empty_result_is_infinitely_far():
    result = geometry_against_shape_world(torch.zeros(0, 3), "a mug", tau=0.05)
    assert result["chamfer"] == math.inf and result["f_score"] == 0.0
    assert result["gt_variant"] is None


def test_a_saved_nerf_loads_and_has_a_surface(tmp_path):
    cfg = NeRFConfig(blob_density=10.0, blob_radius=0.5)
    field = NeRFField(cfg, generator=torch.Generator().manual_seed(0))
    save_nerf_outputs(field, tmp_path, mesh_resolution=16)
    (tmp_path / "config.yaml").write_text("nerf:\n  blob_density: 10.0\n  blob_radius: 0.5\n"
                                          "  n_samples: 16\n")
    loaded, options = load_saved_scene(tmp_path)
    points = torch.rand(64, 3) * 2 - 1
    assert torch.equal(loaded.query(points)[0], field.query(points)[0])
    assert options == {"n_samples": 16}
    surface = scene_surface_points(loaded, 500, torch.Generator().manual_seed(0),
                                   grid_resolution=24)
    assert 0 < len(surface) <= 500 and torch.isfinite(surface).all()
    assert surface.abs().max() < 1.0  # inside the field's box


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return build_tiny_clip(folder / "clip"), build_tiny_dinov2(folder / "dinov2")


def test_clip_dinov2_and_export_with_tiny_models(tmp_path, tiny_models):
    clip, dinov2 = tiny_models
    for seed, name in enumerate(("mug_red", "mug_blue_tall")):
        save_truth(name, tmp_path / f"mug_{seed}.ply")
    path = write_fake_study(tmp_path, job={"splats": f"{tmp_path}/mug_{{seed}}.ply"}, study={
        "methods": [{"name": "alpha", "config": str(tmp_path / "fake.yaml")}],
        "prompts": ["a mug"],
        "scoring": {"clip_model": str(clip), "dinov2_model": str(dinov2), "views": 3,
                    "view_resolution": 32, "export_gpteval3d": True, "export_views": 2,
                    "export_resolution": 16}})
    summary = run_study(load_study(path))
    assert summary["done"] == 2

    for row in read_rows(tmp_path).values():
        assert 0.0 <= float(row["clip_score"]) <= 100.0
        assert float(row["clip_r_precision"]) == 1.0  # the study's only prompt is its own
    report = (study_dir(tmp_path) / "report.md").read_text()
    frechet = report.split("## Fréchet distance (DINOv2)")[1]
    fd_line = next(line for line in frechet.splitlines() if line.startswith("| alpha |"))
    # 2 runs x 3 views against the mug's 2 variants x 3 views
    cells = [c.strip() for c in fd_line.strip("|").split("|")]
    assert cells[1:4] == ["2", "6", "6"]
    assert math.isfinite(float(cells[4])) and float(cells[4]) >= 0

    export = study_dir(tmp_path) / "gpteval3d"
    assert json.loads((export / "prompts.json").read_text()) == ["a mug"]
    for seed in (0, 1):
        names = sorted(p.name for p in (export / "alpha" / "0" / str(seed)).iterdir())
        assert names == ["cameras.json", "normal_0.png", "normal_1.png", "rgb_0.png",
                         "rgb_1.png"]


def test_bad_scoring_settings_stop_the_study_before_any_run(tmp_path):
    path = write_fake_study(tmp_path)
    with pytest.raises(ModelWeightsNotFound, match="scoring.clip_model"):
        run_study(load_study(path, [f"scoring.clip_model={tmp_path / 'no-such-clip'}"]))
    with pytest.raises(ModelWeightsNotFound, match="scoring.dinov2_model"):
        run_study(load_study(path, [f"scoring.dinov2_model={tmp_path / 'no-such-dinov2'}"]))
    with pytest.raises(UserError, match="scoring.geometry.*a teapot"):
        run_study(load_study(path, ["scoring.geometry=true", "prompts=[a mug, a teapot]"]))
    assert not study_dir(tmp_path).exists()
    assert issubclass(ModelWeightsNotFound, UserError)
