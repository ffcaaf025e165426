"""The jobs layer: one registry, one error contract, every check before a run folder exists."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import jobs
import run
from cfd.config import ConfigError, load_config
from cfd.systems.checkpoint import save_checkpoint
from core.errors import UserError
from jobs.distill import DistillConfig
from tests.test_distill import CONFIG, small_overrides, system_of
from tests.test_trellis_loading import _rgba_file, pipeline_dir  # noqa: F401 (a fixture)
from tests.tiny_models import build_tiny_dinov2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_every_job_is_a_config_and_a_run_and_libraries_import_no_job():
    for name in jobs.JOBS:
        job = jobs.load(name)
        assert callable(job.run) and isinstance(job.Config, type), name
    resumable = [n for n in jobs.JOBS if jobs.resumable(jobs.load(n))]
    assert resumable == ["distill", "train-generator"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for library in ("core", "guidance", "cfd", "relaxflow"):
        for folder, _, files in os.walk(os.path.join(root, library)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(folder, name)).read()
                    assert "from jobs" not in text and "import jobs" not in text, name


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only a UserError is bad input; a ValueError from a bug is not reported as one."""
    def broken(cfg):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr(jobs.load("fit-splats"), "run", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        run.main(["--config", "configs/demo-fit-splats.yaml", f"output_dir={tmp_path}"])


def test_an_unknown_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="scene.*splats, nerf"):
        load_config(DistillConfig, CONFIG, ["scene=mesh"])
    with pytest.raises(ConfigError, match="background_kind.*solid, mlp"):
        load_config(DistillConfig, CONFIG, ["background_kind=sky"])


@pytest.mark.parametrize("override, message", [
    ("guidance.guidance_scale=.nan", "guidance.guidance_scale must be a finite number"),
    ("splats.lr.means=.inf", "splats.lr.means must be a finite number"),
    ("name=/tmp/elsewhere", "must be a relative folder name"),
    ("name=../up", "must be a relative folder name"),
])
def test_bad_settings_stop_before_a_run_folder(tmp_path, cache_dir, override, message, capsys):
    out = tmp_path / "out"
    code = run.main(["--config", str(CONFIG), *small_overrides(out, cache_dir), override])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not os.path.exists("/tmp/elsewhere")


def test_an_output_dir_that_cannot_hold_runs_is_refused_before_models_load(tmp_path, cache_dir,
                                                                           monkeypatch, capsys):
    def no_models(*args, **kwargs):
        raise AssertionError("a model loaded before the output folder was checked")

    monkeypatch.setattr("cfd.systems.distill.build_guidance", no_models)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code = run.main(["--config", str(CONFIG), *small_overrides(a_file / "sub", cache_dir)])
    assert code == 2 and f"{a_file} is a file, not a folder" in capsys.readouterr().err
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere: a read-only mount is needed
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    code = run.main(["--config", str(CONFIG), *small_overrides(read_only, cache_dir)])
    assert code == 2 and "cannot be written to" in capsys.readouterr().err


def test_a_checkpoint_of_the_old_layout_is_refused_by_name(tmp_path, cache_dir, capsys):
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir))
    state = system_of(cfg).state_dict()
    del state["format"]  # what cfd3d before the jobs layer wrote
    run_dir = tmp_path / "run"
    from cfd.config import save_config

    save_config(cfg, run_dir / "config.yaml")
    save_checkpoint(run_dir / "ckpt", state)
    assert run.main(["--resume", str(run_dir)]) == 2
    assert "written by an earlier cfd3d" in capsys.readouterr().err


def test_an_old_run_folder_config_says_it_cannot_be_resumed(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("job: distill\ninit:\n  radius: 0.85\n")
    assert run.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'init.radius'" in err and "earlier cfd3d" in err


def test_a_model_folder_missing_a_later_stage_fails_before_anything_runs(
        pipeline_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    (broken / "ckpts" / "slat_dec_gs_tiny.safetensors").unlink()
    monkeypatch.setattr("jobs.relaxflow.sample_structures", None)  # stage 1 must not start
    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    out = tmp_path / "out"
    code = run.main(["relaxflow", "--config", "configs/relaxflow-trellis.yaml",
                     f"model={broken}", f"image={image}", f"priors=[{image}]",
                     f"output_dir={out}", f"image_cond_model={tmp_path / 'no-dinov2'}"])
    err = capsys.readouterr().err
    assert code == 2 and "slat_dec_gs_tiny.safetensors" in err and "huggingface-cli" not in err
    assert not out.exists()


def test_refine_finds_missing_weights_before_relaxflow_runs(pipeline_dir, tmp_path,  # noqa: F811
                                                            capsys, monkeypatch):
    def no_relaxflow(cfg):
        raise AssertionError("RelaxFlow ran before the distillation's model was found")

    monkeypatch.setattr("jobs.relaxflow.run", no_relaxflow)
    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    dinov2 = build_tiny_dinov2(tmp_path / "dinov2")
    out = tmp_path / "out"
    code = run.main(["refine", "--config", "configs/relaxflow-cfd.yaml", f"image={image}",
                     "prompt=a chair", f"priors=[{image}]", f"output_dir={out}", "device=cpu",
                     f"relaxflow.model={pipeline_dir}", f"relaxflow.image_cond_model={dinov2}",
                     f"distill.guidance.model_id={tmp_path / 'no-sd'}"])
    err = capsys.readouterr().err
    assert code == 2 and "distill.guidance.model_id=<folder>" in err, err
    assert not out.exists()
    code = run.main(["refine", "--config", "configs/relaxflow-cfd.yaml", f"image={image}",
                     "prompt=a chair", f"priors=[{image}]", f"output_dir={out}", "device=cpu",
                     f"relaxflow.model={tmp_path / 'no-trellis'}"])
    assert code == 2 and "relaxflow.model=<folder>" in capsys.readouterr().err


def test_a_truncated_image_input_is_a_clear_error(pipeline_dir, tmp_path, capsys):  # noqa: F811
    whole = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(noise).save(whole, format="PNG")
    (tmp_path / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    out = tmp_path / "out"
    code = run.main(["generate", "--config", "configs/trellis-image.yaml", f"model={pipeline_dir}",
                     f"image={tmp_path / 'cut.png'}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "cut.png" in err and "image=" in err and "Traceback" not in err
    assert not out.exists()


def test_device_vocabulary_is_one(tmp_path, cache_dir):
    """``auto`` is a device everywhere, and an unusable one is named with its fix."""
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, device="auto"))
    assert system_of(cfg).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="not a device"):
        system_of(load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir,
                                                                     device="tpu")))
    assert json.loads(json.dumps(jobs.JOBS))  # the registry is plain data
