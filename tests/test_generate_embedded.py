"""The generate job on an image pipeline that ships its own conditioner, from a prompt (the
embedded prior draws the image), with metrics against a shape-world instance; the scores of
``cfd.evaluation.generation``."""

import json
import shutil

import numpy as np
import pytest
import torch

import run
from core.errors import UserError
from cfd.evaluation.generation import (cameras_around, instance, parse_instance,
                                       structure_f_score, structure_iou, to_world, view_scores)
from cfd.shapes import GENERATOR_SCALE, category, object_splats, occupancy_grid
from relaxflow.loading import conditioning_model, grid_resolution, read_pipeline
from relaxflow.runner import load_voxels, save_voxels
from tests.test_trellis_loading import pipeline_dir  # noqa: F401 (a fixture)
from tests.tiny_models import build_tiny_dinov2


@pytest.fixture(scope="module")
def own_conditioner_pipeline(pipeline_dir, tmp_path_factory):  # noqa: F811
    """The tiny image pipeline with its conditioner inside it, as the embedded generator."""
    root = tmp_path_factory.mktemp("trellis-own-dinov2")
    shutil.copytree(pipeline_dir, root, dirs_exist_ok=True)
    build_tiny_dinov2(root / "dinov2_tiny_reg")
    spec = json.loads((root / "pipeline.json").read_text())
    spec["args"]["image_cond_model"] = "dinov2_tiny_reg"
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root


def test_conditioning_model_prefers_override_then_own_folder(own_conditioner_pipeline,
                                                             pipeline_dir):  # noqa: F811
    own = read_pipeline(own_conditioner_pipeline)
    assert conditioning_model(own) == str(own_conditioner_pipeline / "dinov2_tiny_reg")
    assert conditioning_model(own, "some/other") == "some/other"
    # the released pipelines name a torch.hub model: the transformers one is used
    assert conditioning_model(read_pipeline(pipeline_dir)) == \
        "facebook/dinov2-with-registers-large"


def test_generate_lifts_a_drawn_prompt_and_scores_it(own_conditioner_pipeline, tmp_path):
    out = tmp_path / "out"
    assert run.main(["generate", "--config", "configs/trellis-image.yaml", "image_cond_model=null",
                     f"model={own_conditioner_pipeline}", "prompt=a mug",
                     "truth=mug/1000000", f"output_dir={out}", "video_frames=2",
                     "video_size=32"]) == 0
    (folder,) = (out / "trellis-image").iterdir()
    for name in ("input.png", "splats.ply", "orbit.mp4", "occupancy.npz", "metrics.json"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["draw_s"] > 0 and metrics["splats"] > 0
    assert 0 <= metrics["structure_iou"] <= metrics["structure_f_score"] <= 1
    assert 0 < metrics["psnr_around"] < 60 and 0 <= metrics["mask_iou_around"] <= 1


def test_truth_is_checked_before_anything_runs(own_conditioner_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(["generate", "--config", "configs/trellis-image.yaml",
                     f"model={own_conditioner_pipeline}", "prompt=a mug", "truth=spaceship/3",
                     f"output_dir={out}"]) == 2
    assert "truth: 'spaceship/3' is not a shape-world instance: write <category>/<seed>" in \
        capsys.readouterr().err
    assert not out.exists()


def test_given_voxels_replace_stage_1(own_conditioner_pipeline, tmp_path, capsys):
    """structure= is filled by stage 2 as given: the instance's own occupancy scores 1; a file at
    another resolution is refused before a run folder exists."""
    resolution = grid_resolution(read_pipeline(own_conditioner_pipeline))
    cells = occupancy_grid(instance("mug/1000000"), resolution).nonzero().int()
    given = tmp_path / "given"
    given.mkdir()
    save_voxels(given, torch.nn.functional.pad(cells, (1, 0)), resolution)
    out = tmp_path / "out"
    args = ["generate", "--config", "configs/trellis-image.yaml", "image_cond_model=null",
            f"model={own_conditioner_pipeline}", "prompt=a mug", "truth=mug/1000000",
            f"output_dir={out}", "video_frames=2", "video_size=32"]
    assert run.main(args + [f"structure={given / 'occupancy.npz'}"]) == 0
    (folder,) = (out / "trellis-image").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["structure_iou"] == metrics["structure_f_score"] == 1.0
    assert "structure_plain_s" not in metrics and metrics["splats"] > 0
    assert (torch.from_numpy(np.load(folder / "occupancy.npz")["coords"]).int() == cells).all()

    np.savez(given / "coarse.npz", coords=cells.numpy() // 2, resolution=resolution // 2)
    assert run.main(args + [f"structure={given / 'coarse.npz'}",
                            f"output_dir={tmp_path / 'out2'}"]) == 2
    assert (f"is at resolution {resolution // 2}, the pipeline's grid is {resolution}"
            in capsys.readouterr().err)
    assert not (tmp_path / "out2").exists()


def test_voxel_files_are_checked_with_the_fix_named(tmp_path):
    np.save(tmp_path / "cells.npy", np.zeros((3, 3)))
    (tmp_path / "image.png").write_bytes(b"\x89PNG not voxels")
    np.savez(tmp_path / "no_resolution.npz", coords=np.zeros((2, 3)))
    np.savez(tmp_path / "outside.npz", coords=np.array([[0, 0, 8]]), resolution=8)
    np.savez(tmp_path / "flat.npz", coords=np.arange(3), resolution=8)
    for name, message in (("missing.npz", "does not exist"),
                          ("cells.npy", "is not a NumPy .npz archive"),
                          ("image.png", "is not a NumPy .npz archive"),
                          ("no_resolution.npz", "has no resolution"),
                          ("outside.npz", r"cells outside \[0, 8\)"),
                          ("flat.npz", r"coords of shape \[3\]")):
        with pytest.raises(UserError, match=message):
            load_voxels(tmp_path / name, 8)
    np.savez(tmp_path / "repeats.npz", coords=np.array([[1, 2, 3], [0, 0, 1], [1, 2, 3]]),
             resolution=8)
    assert load_voxels(tmp_path / "repeats.npz", 8).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_an_instance_scores_perfectly_against_itself():
    assert parse_instance("chair/1000003") == ("chair", 1000003)
    with pytest.raises(ValueError, match="<category>/<seed>"):
        parse_instance("chair-3")
    obj = instance("stool/1000001")
    assert obj.name == category("stool").sample(1000001).name
    cells = occupancy_grid(obj, 16).nonzero()
    assert structure_iou(cells, 16, obj) == 1.0
    assert structure_iou(cells[: len(cells) // 2], 16, obj) == pytest.approx(0.5, abs=0.01)
    # one voxel off: the IoU falls, the F-score at one voxel of tolerance does not
    moved = cells + torch.tensor([1, 0, 0])
    moved = moved[moved[:, 0] < 16]
    assert structure_iou(moved, 16, obj) < 0.9 and structure_f_score(moved, 16, obj) > 0.97
    assert structure_f_score(cells, 16, obj) == 1.0
    far = category("house").sample(1000001)  # another shape: both fall
    far_cells = occupancy_grid(far, 16).nonzero()
    assert structure_f_score(far_cells, 16, obj) < 0.8
    own = object_splats(obj).scaled(GENERATOR_SCALE)  # as a generator would give it
    scores = view_scores(to_world(own), obj, cameras_around(4, 48))
    assert min(scores["mask_iou"]) > 0.99 and min(scores["psnr"]) > 50
    other = object_splats(category("table").sample(1000001))
    worse = view_scores(other, obj, cameras_around(4, 48))
    assert max(worse["psnr"]) < 40 and max(worse["mask_iou"]) < 0.9


def test_cameras_around_start_at_the_front_and_circle_it():
    cams = cameras_around(8, 32)
    assert len(cams) == 8
    assert torch.allclose(cams.azimuth, torch.arange(8.0) * 45)


def test_the_short_id_names_the_shipped_folder(own_conditioner_pipeline, tmp_path, monkeypatch,
                                               capsys):
    import relaxflow.loading as loading

    monkeypatch.setitem(loading.EMBEDDED_PIPELINES, "embedded", own_conditioner_pipeline)
    assert loading.read_pipeline("embedded").root == own_conditioner_pipeline
    monkeypatch.setitem(loading.EMBEDDED_PIPELINES, "embedded", tmp_path / "relaxflow" / "none")
    out = tmp_path / "out"
    assert run.main(["generate", "--config", "configs/generate-embedded.yaml", "prompt=a mug",
                     f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "model=embedded names the generator shipped in the repository" in err
    assert "python run.py ship-generator" in err and not out.exists()
