"""Config loading and the command line (the renderer demo job, shortened)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfd.config import ConfigError, load_config
from cfd.systems.fit_splats import FitSplatsConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo-fit-splats.yaml"


def test_overrides_and_types():
    cfg = load_config(FitSplatsConfig, CONFIG, ["steps=7", "lr.means=0.5", "densify.enabled=false"])
    assert cfg.steps == 7 and cfg.lr.means == 0.5 and cfg.densify.enabled is False
    assert cfg.densify.refine_every == 50  # from the YAML
    with pytest.raises(ConfigError, match="invalid config value"):
        load_config(FitSplatsConfig, CONFIG, ["steps=many"])


def test_unknown_keys_name_the_closest_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lr.mean'.*lr.means"):
        load_config(FitSplatsConfig, CONFIG, ["lr.mean=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: fit-splats\nresolutoin: 32\n")
    with pytest.raises(ConfigError, match=r"'resolutoin'.*resolution"):
        load_config(FitSplatsConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(FitSplatsConfig, CONFIG, ["steps"])


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_demo_job_end_to_end(tmp_path):
    proc = _run("--config", str(CONFIG), f"output_dir={tmp_path}", "steps=60", "resolution=32",
                "init_splats=500", "video_frames=4", "video_size=32", "log_every=30",
                "densify.refine_start_iter=10", "densify.refine_every=20",
                "densify.refine_stop_iter=50", "densify.reset_every=1000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = list((tmp_path / "demo-fit-splats").iterdir())
    assert run_dir.name.startswith("snowman@")
    for name in ("config.yaml", "splats.ply", "metrics.json", "progress_00030.png",
                 "progress_00060.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "orbit.mp4").is_file() or (run_dir / "orbit.gif").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["psnr"] > 18.0  # a blob start scores about 12 dB
    # files written atomically are as readable as any other the run wrote (not mkstemp's 0600)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {name: (run_dir / name).stat().st_mode & 0o777
             for name in ("config.yaml", "metrics.json", "splats.ply")}
    assert set(modes.values()) == {plain.stat().st_mode & 0o777}, modes


def test_cli_rejects_bad_keys_with_a_clear_message(tmp_path):
    proc = _run("--config", str(CONFIG), "stpes=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'stpes'" in proc.stderr and "steps" in proc.stderr
    proc = _run("--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    import importlib

    from omegaconf import OmegaConf

    import run

    module_name, schema = run.JOBS[OmegaConf.load(path).get("job", "distill")]
    cfg = load_config(getattr(importlib.import_module(module_name), schema), path)
    assert cfg.name == path.stem


def test_resume_takes_no_overrides(tmp_path, capsys):
    """A resumed run continues as configured: an override would change it unrecorded."""
    import run

    (tmp_path / "config.yaml").write_text("job: distill\nsteps: 10\n")
    assert run.main(["--resume", str(tmp_path), "steps=20"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume takes no overrides (got steps=20)" in err
    assert "start a new run to change settings" in err


def test_fit_splats_refuses_bad_counts_and_devices_before_making_a_run_folder(tmp_path, capsys):
    import run

    for override, message in (("eval_views=0", "eval_views must be >= 1"),
                              ("backend=gsplat", "backend=gsplat needs device=cuda")):
        assert run.main(["--config", str(CONFIG), f"output_dir={tmp_path}", override]) == 2
        assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "demo-fit-splats").exists()
