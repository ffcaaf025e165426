"""A real study end to end: two tiny CFD splat runs of the embedded prior through run.py and the
local executor, scored against the ground truth, then the study run again, which starts
nothing."""

import csv
import json
import math
from pathlib import Path

import pytest

from study import run_study

from .study_helpers import REPO, load_study, run_folder, study_dir

TINY = ["steps=4", "resolution=32", "batch_size=1", "guidance.dataset.views_per_object=8",
        "guidance.dataset.resolution=32", "eval_views=2", "video_frames=2", "video_size=16"]


@pytest.mark.slow
def test_two_real_runs(tmp_path):
    overrides = [*TINY, f"guidance.dataset.cache_dir={tmp_path / 'cache'}"]
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "name": "s", "output_dir": str(tmp_path / "studies"), "workdir": str(REPO),
        "methods": [{"name": "cfd-splats", "config": "configs/cfd-splats-embedded.yaml",
                     "overrides": overrides}],
        "prompts": ["a mug"], "seeds": [0, 1], "max_parallel": 2,
        "scoring": {"geometry": True, "diversity": True, "surface_points": 1000}}))
    summary = run_study(load_study(path))
    assert (summary["done"], summary["failed"]) == (2, 0)

    with open(study_dir(tmp_path) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        ("cfd-splats", "0", "done"), ("cfd-splats", "1", "done")]
    for row in rows:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["steps"] == 4 and float(row["psnr"]) == metrics["psnr"]
        assert math.isfinite(metrics["psnr"]) and 0.0 <= metrics["mask_iou"] <= 1.0
        assert (Path(row["run_dir"]) / "orbit.mp4").is_file()
        # 4 steps from a random ball: far from a mug, but measured
        assert 0.0 < float(row["chamfer"]) < 1.0 and 0.0 <= float(row["f_score"]) <= 1.0
        assert row["gt_variant"] in ("mug_red", "mug_blue_tall")
    page = (study_dir(tmp_path) / "report.html").read_text()
    assert page.count("<video ") == 2

    run_study(load_study(path))  # finished: nothing starts again
    for seed in (0, 1):
        log = (run_folder(tmp_path, "cfd-splats", "a_mug", seed) / "run.log").read_text()
        assert log.count("\n=== ") == 1 and "held-out PSNR" in log
