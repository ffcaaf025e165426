"""The distillation job: schedules, a short end-to-end run, seeding, resume after a kill, NaNs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cfd.config import load_config, to_object
from cfd.scene import Splats
from cfd.systems import distill as distillation
from cfd.systems.common import scheduled
from cfd.systems.distill import Distillation
from jobs import distill
from jobs.distill import DistillConfig
from cfd.systems.timesteps import TimestepConfig, TimestepSchedule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cfd-splats-embedded.yaml"


def system_of(cfg) -> Distillation:
    """The distillation system of a loaded config."""
    return Distillation(to_object(cfg))


def small_overrides(tmp_path, cache_dir, **extra):
    items = {
        "output_dir": str(tmp_path), "steps": 6, "batch_size": 2, "resolution": 32,
        "splats.init.n_splats": 300, "guidance.dataset.views_per_object": 8,
        "guidance.dataset.resolution": 32, "guidance.dataset.cache_dir": str(cache_dir),
        "checkpoint_every": 2, "log_every": 3, "video_frames": 4, "video_size": 32,
        "eval_views": 4,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_timestep_schedules():
    anneal = TimestepSchedule(TimestepConfig(), total_steps=101)
    g = torch.Generator().manual_seed(0)
    assert anneal(0, g) == pytest.approx(0.98) and anneal(100, g) == pytest.approx(0.02)
    assert anneal(50, g) == pytest.approx(0.5)
    knots = TimestepSchedule(TimestepConfig(knots=[[0, 0.98], [0.1, 0.692], [1, 0.212]]), 1001)
    assert knots(100, g) == pytest.approx(0.692) and knots(550, g) == pytest.approx(0.452)
    uniform = TimestepSchedule(TimestepConfig(kind="uniform", t_min=0.2, t_max=0.4), 10)
    draws = [uniform(i, torch.Generator().manual_seed(i)) for i in range(200)]
    assert 0.2 <= min(draws) and max(draws) <= 0.4 and max(draws) - min(draws) > 0.15
    with pytest.raises(ValueError, match="cover progress"):
        TimestepSchedule(TimestepConfig(knots=[[0.2, 0.9], [1, 0.1]]), 10)


@pytest.mark.parametrize("settings, key", [
    ({"knots": [[0, 1.0], [1, 0.02]]}, "timesteps.knots"),  # infinite weight at t = 1
    ({"knots": [[0, 0.98], [1, 0.0]]}, "timesteps.knots"),  # NaN noise at t = 0
    ({"kind": "uniform", "t_min": 0.0}, "timesteps.t_min and t_max"),
    ({"kind": "uniform", "t_max": 1.0}, "timesteps.t_min and t_max"),
])
def test_timesteps_must_lie_strictly_between_0_and_1(settings, key):
    with pytest.raises(ValueError, match=f"{key}.*between 0 and 1|{key}.*0 < t_min"):
        TimestepSchedule(TimestepConfig(**settings), 10)


def _floater_opacity(tmp_path, cache_dir, **overrides):
    """Opacity of a grey splat (the background's colour) above the object after 20 steps (at 10
    the fades were 0.1, too near the margin; at 20 they are 0.22-0.25)."""
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, steps=20,
                                                              **overrides))
    system = system_of(cfg)
    with torch.no_grad():  # splat 0: grey, just above the object, inside the training views
        system.scene.scene.params["means"][0] = torch.tensor([0.0, 0.0, 0.9])
        system.scene.scene.params["sh0"][0] = 0.0
        system.scene.scene.params["opacities"][0] = 0.0
    for _ in range(20):
        system.train_step()
    return torch.sigmoid(system.scene.scene.params["opacities"][0]).item()


def test_background_coloured_floater_fades_by_sparsity_or_random_backgrounds(tmp_path, cache_dir):
    """A grey splat on the grey background is invisible to the guidance: without help it stays.
    The sparsity term fades it, and so do random backgrounds, on which the prior sees it."""
    kept = _floater_opacity(tmp_path, cache_dir, random_background=0.0, **{"loss.lambda_sparsity": 0.0})
    assert _floater_opacity(tmp_path, cache_dir, random_background=0.0,
                            **{"loss.lambda_sparsity": 100.0}) < kept - 0.1
    assert _floater_opacity(tmp_path, cache_dir, random_background=1.0,
                            **{"loss.lambda_sparsity": 0.0}) < kept - 0.1
    with pytest.raises(ValueError, match="random_background"):
        _floater_opacity(tmp_path, cache_dir, random_background=1.5)


def test_scheduled_values_ramp_and_reject_bad_values(tmp_path, cache_dir):
    assert scheduled(3, 10) == 3.0
    ramp = [100, 1.0, 5.0, 200]  # threestudio's [start_step, start_value, end_value, end_step]
    assert [scheduled(ramp, s) for s in (0, 100, 150, 200, 999)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    cfg = load_config(DistillConfig, CONFIG, small_overrides(
        tmp_path, cache_dir, **{"loss.lambda_sparsity": [200, 1.0, 5.0, 100]}))
    with pytest.raises(ValueError, match="loss.lambda_sparsity.*start_step < end_step"):
        system_of(cfg)
    cfg = load_config(DistillConfig, CONFIG, small_overrides(
        tmp_path, cache_dir, **{"noise.gamma": [10, 0.01]}))
    with pytest.raises(ValueError, match="noise.gamma.*end_step"):
        system_of(cfg)


def test_short_run_writes_everything(tmp_path, cache_dir, capsys):
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir))
    result = distill.run(cfg)
    (run_dir,) = list((tmp_path / "cfd-splats-embedded").iterdir())
    assert run_dir.name.startswith("a_mug@")
    for name in ("config.yaml", "splats.ply", "metrics.json", "metrics.jsonl", "ckpt/last.pt",
                 "progress_00003.png", "progress_00006.png", "vs_truth.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "orbit.mp4").is_file() or (run_dir / "orbit.gif").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(6))
    assert lines[0]["t"] == pytest.approx(0.98) and lines[-1]["t"] == pytest.approx(0.02)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"psnr", "mask_iou", "wall_s", "steps"} <= set(metrics) and metrics["steps"] == 6
    assert metrics["psnr"] == result["psnr"] and 0.0 <= metrics["mask_iou"] <= 1.0
    # Resuming the finished run says so and leaves its outputs alone.
    written = {name: (run_dir / name).read_bytes() for name in ("splats.ply", "metrics.jsonl")}
    again = distill.resume(run_dir)
    assert again["psnr"] == result["psnr"] and again["run_dir"] == str(run_dir)
    assert all((run_dir / name).read_bytes() == data for name, data in written.items())
    assert "finished all 6 steps already" in capsys.readouterr().out


def test_same_seed_same_result(tmp_path, cache_dir):
    results = []
    for name in ("a", "b"):
        cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path / name, cache_dir,
                                                                 steps=4, seed=3))
        distill.run(cfg)
        (run_dir,) = list((tmp_path / name / "cfd-splats-embedded").iterdir())
        results.append(Splats.load_ply(run_dir / "splats.ply"))
    for k in results[0].params:
        assert torch.equal(results[0].params[k], results[1].params[k]), k


def _cli(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_bitwise(tmp_path, cache_dir):
    steps = 30
    common = ["--config", str(CONFIG)]
    over = small_overrides(tmp_path / "x", cache_dir, steps=steps, checkpoint_every=3,
                           log_every=100)
    ref = _cli(common + small_overrides(tmp_path / "ref", cache_dir, steps=steps,
                                        checkpoint_every=3, log_every=100), tmp_path)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    victim = _cli(common + over, tmp_path)
    ckpt = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tmp_path / "x").glob("*/*/ckpt/last.pt"))
        if found:
            state = torch.load(found[0], weights_only=False)
            if state["step"] >= 9:
                ckpt = found[0]
                break
        time.sleep(0.05)
    assert ckpt is not None, "no checkpoint appeared"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    run_dir = ckpt.parent.parent
    assert not (run_dir / "splats.ply").exists()  # it really died mid-way
    resumed = _cli(["--resume", str(run_dir)], tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]

    (ref_dir,) = list((tmp_path / "ref" / "cfd-splats-embedded").iterdir())
    a, b = Splats.load_ply(ref_dir / "splats.ply"), Splats.load_ply(run_dir / "splats.ply")
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k
    steps_logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(steps))


def test_nan_gradients_skip_then_stop_with_checkpoint_intact(tmp_path, cache_dir, monkeypatch,
                                                              capsys):
    """The loop stops itself after max_bad_steps; the command line says why in one line."""
    import run as cli

    real_build = distillation.build_guidance

    def poisoned(cfg, device, view_config):
        g = real_build(cfg, device, view_config)
        call = g.__call__

        class Poisoned(type(g)):
            def __call__(self, rgb, views, prompt, t, noise, **kwargs):
                out = call(rgb, views, prompt, t, noise, **kwargs)
                if distill_step["n"] >= 3:
                    out["loss_sds"] = out["loss_sds"] * float("nan")
                distill_step["n"] += 1
                return out

        g.__class__ = Poisoned
        return g

    distill_step = {"n": 0}
    monkeypatch.setattr(distillation, "build_guidance", poisoned)
    code = cli.main(["--config", str(CONFIG),
                     *small_overrides(tmp_path, cache_dir, steps=20, max_bad_steps=3)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: 3 consecutive steps had NaN/Inf gradients" in err
    assert "last good checkpoint" in err
    (run_dir,) = list((tmp_path / "cfd-splats-embedded").iterdir())
    state = torch.load(run_dir / "ckpt" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["scene"]["params"].values())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [False] * 3 + [True] * 3


def test_camera_ranges_are_checked_before_anything_is_written(tmp_path, capsys):
    import run as cli

    for key, value, message in (
            ("camera.distance_range", "[0.0, 1.0]", "camera.distance_range must be positive"),
            ("camera.elevation_range", "[0.0, 100.0]", "camera.elevation_range must lie within"),
            ("camera.fov_range", "[40.0, 30.0]", "camera.fov_range must be a finite [low, high]")):
        code = cli.main(["--config", str(CONFIG), *small_overrides(
            tmp_path / "out", tmp_path / "cache", **{key: value})])
        assert code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_unknown_prompt_is_a_clear_error(tmp_path):
    """... before the prior's dataset is rendered (a minute at full size) or a folder exists."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(CONFIG),
         *small_overrides(tmp_path / "out", tmp_path / "cache",
                          **{"prompt_processor.prompt": "a dragon"})],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown prompt 'a dragon'" in proc.stderr and "a snowman" in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_empty_prompt_is_unconditional_and_has_no_ground_truth(tmp_path, cache_dir, capsys):
    cfg = load_config(DistillConfig, CONFIG, small_overrides(
        tmp_path, cache_dir, steps=2, **{"prompt_processor.prompt": ""}))
    result = distill.run(cfg)
    (run_dir,) = list((tmp_path / "cfd-splats-embedded").iterdir())
    assert run_dir.name.startswith("run@")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "psnr" not in metrics and result["prompt"] == ""
    assert metrics["ground_truth"].startswith("none: the empty prompt is unconditional")
    assert "no held-out PSNR or mask IoU" in capsys.readouterr().out
    assert (run_dir / "splats.ply").is_file() and not (run_dir / "vs_truth.png").exists()


NERF_CONFIG = ROOT / "configs" / "cfd-nerf-embedded.yaml"


def nerf_overrides(tmp_path, cache_dir, **extra):
    items = {"nerf.n_samples": 16, "nerf.mesh_resolution": 24, "nerf.grid.n_levels": 4,
             "nerf.grid.log2_hashmap_size": 12, "nerf.grid.max_resolution": 64,
             "nerf.occupancy.resolution": 16, "nerf.occupancy.update_every": 4}
    items.update(extra)
    base = [o for o in small_overrides(tmp_path, cache_dir)
            if not o.startswith("splats.")]  # splat settings
    return base + [f"{k}={v}" for k, v in items.items()]  # later entries win


def test_nerf_run_improves_held_out_views_and_writes_a_mesh(tmp_path, cache_dir):
    """A short CFD run on a NeRF beats its own starting blob on held-out views of the shape
    world, and writes the field, a mesh and the usual run files."""
    from cfd.systems.ground_truth import evaluate_against_shape_world

    cfg = load_config(DistillConfig, NERF_CONFIG, nerf_overrides(tmp_path, cache_dir, steps=40,
                                                                 log_every=20))
    start = system_of(cfg)
    before = evaluate_against_shape_world(start.scene.scene, "a mug", resolution=32,
                                          background=0.5,
                                          render_options=start.scene.render_options())
    result = distill.run(cfg)
    assert result["psnr"] > before["psnr"] + 1.0, (before, result)
    (run_dir,) = list((tmp_path / "cfd-nerf-embedded").iterdir())
    for name in ("nerf.safetensors", "mesh.obj", "mesh.glb", "metrics.json", "ckpt/last.pt",
                 "progress_00040.png", "vs_truth.png"):
        assert (run_dir / name).is_file(), name
    for video in ("orbit", "orbit_normal"):
        assert any((run_dir / f"{video}.{ext}").is_file() for ext in ("mp4", "gif")), video
    assert not (run_dir / "splats.ply").exists()


def straight_and_resumed(cfg, tmp_path, steps: int):
    """Two systems after ``steps`` steps: one straight through, one rebuilt from the
    checkpoint a third system wrote halfway."""
    from cfd.systems.checkpoint import load_checkpoint, save_checkpoint

    straight = system_of(cfg)
    for _ in range(steps):
        straight.train_step()
    first = system_of(cfg)
    for _ in range(steps // 2):
        first.train_step()
    save_checkpoint(tmp_path / "ckpt", first.state_dict())
    second = system_of(cfg)
    second.load_state_dict(load_checkpoint(tmp_path / "ckpt"))
    for _ in range(steps - steps // 2):
        second.train_step()
    return straight, second


@pytest.mark.parametrize("extra", [{}, {"nerf.shading.p_shaded": 0.5,
                                         "nerf.max_grad_samples": 3000,
                                         "loss.lambda_normal_smooth": 10}],
                         ids=["albedo", "shaded-with-budget"])
def test_nerf_run_resumes_exactly_from_its_checkpoint(tmp_path, cache_dir, extra):
    """Field, optimisers, occupancy grid and RNG streams are all in the checkpoint: 6 steps,
    a fresh system loading the step-3 checkpoint and 3 more steps give identical weights
    (also with random lights and a gradient budget, which draw from the run's generator)."""
    cfg = load_config(DistillConfig, NERF_CONFIG, nerf_overrides(tmp_path, cache_dir, **extra))
    straight, second = straight_and_resumed(cfg, tmp_path, 6)
    want, got = straight.scene.scene.state_dict(), second.scene.scene.state_dict()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert torch.equal(straight.scene.occupancy.density, second.scene.occupancy.density)


@pytest.mark.parametrize("config, extra, message", [
        ("splats", {"loss.lambda_normal_smooth": 10}, "is for scene=nerf"),
    ("nerf", {"nerf.max_grad_samples": 0}, "positive sample count"),
    ("splats", {"nerf.shading.p_textureless": 2}, r"nerf.shading.p_textureless is a probability"),
    ("splats", {"background_kind": "mlp"}, "guidance.kind=stable-diffusion"),
        ("splats", {"splats.init.lock_visible": True}, "splats.init.lock_visible needs splats.init.kind=ply"),
        ("splats", {"splats.init.lock_threshold": 0.5}, "lock_threshold=0.5 must lie in .* needs splats.init.lock_visible=true"),
    ("splats", {"splats.init.n_splats": 0}, "splats.init.n_splats must be >= 1"),
    ("splats", {"backend": "gsplat"}, "backend=gsplat needs device=cuda.*backend=torch"),
    ("nerf", {"backend": "gsplat"}, "set backend=auto or backend=torch"),
    ("splats", {"eval_views": 0}, "eval_views must be >= 1"),
    ("splats", {"video_frames": 0}, "video_frames must be >= 1"),
    ("splats", {"timesteps.knots": [[0, 1.0], [1, 0.02]]}, "timesteps.knots"),
    ("splats", {"steps": 0}, "steps must be >= 1, got 0"),
    ("splats", {"steps": -1}, "steps must be >= 1, got -1"),
    ("nerf", {"nerf.n_samples": 0}, "nerf.n_samples must be >= 1"),
    ("nerf", {"nerf.occupancy.resolution": 0}, "occupancy.resolution must be >= 1"),
    ("nerf", {"nerf.occupancy.update_every": 0}, "occupancy.update_every must be >= 1"),
    ("nerf", {"nerf.mesh_resolution": 1}, "mesh_resolution must be >= 2"),
])
def test_settings_that_do_not_fit_the_scene_are_clear_errors(tmp_path, cache_dir, config, extra,
                                                              message):
    overrides = (nerf_overrides(tmp_path, cache_dir, **extra) if config == "nerf"
                 else small_overrides(tmp_path, cache_dir, **extra))
    cfg = load_config(DistillConfig, NERF_CONFIG if config == "nerf" else CONFIG, overrides)
    with pytest.raises(ValueError, match=message):
        distill.check(to_object(cfg))  # the job's settings, then the system's
        system_of(cfg)


def test_bad_settings_fail_before_a_run_folder_exists(tmp_path, cache_dir):
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir,
                                                             backend="gsplat"))
    with pytest.raises(ValueError, match="backend=gsplat"):
        distill.run(cfg)
    assert not (tmp_path / "cfd-splats-embedded").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, cache_dir):
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, device="cuda"))
    with pytest.raises(ValueError, match="device=cuda but this machine has no usable CUDA "
                                         "device; set device=cpu or device=auto"):
        system_of(cfg)


def test_an_empty_ply_is_refused(tmp_path, cache_dir):
    Splats.empty().save_ply(tmp_path / "empty.ply")
    cfg = load_config(DistillConfig, CONFIG, small_overrides(
        tmp_path, cache_dir, **{"splats.init.kind": "ply", "splats.init.path": tmp_path / "empty.ply"}))
    with pytest.raises(ValueError, match="holds no splats"):
        system_of(cfg)


def test_splat_run_resumes_exactly_mid_densification(tmp_path, cache_dir):
    """Densification grows the scene and resets opacities around the step-6 checkpoint; the
    resumed system ends with the same splats, bit for bit, as one run straight through."""
    densify = {"splats.densify.enabled": True, "splats.densify.refine_start_iter": 1,
               "splats.densify.refine_every": 2, "splats.densify.refine_stop_iter": 11,
               "splats.densify.reset_every": 4, "splats.densify.grow_grad2d": 1e-6}
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, steps=12,
                                                             **densify))
    straight, second = straight_and_resumed(cfg, tmp_path, 12)
    at_checkpoint = len(torch.load(tmp_path / "ckpt" / "last.pt",
                                   weights_only=False)["scene"]["params"]["means"])
    assert 300 < at_checkpoint < len(second.scene.scene)  # it grew before and after the checkpoint
    for k in straight.scene.scene.params:
        assert torch.equal(straight.scene.scene.params[k], second.scene.scene.params[k]), k


def test_metrics_log_drops_a_torn_last_line_and_redone_steps(tmp_path):
    """A kill can leave half a line at the end of metrics.jsonl; resuming must still work."""
    lines = "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(5))
    (tmp_path / "metrics.jsonl").write_text(lines + '{"step": 5, "lo')
    path = distill._metrics_log(tmp_path, keep_below=3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]


def test_learned_background_trains_and_resumes_with_an_image_model(tmp_path, cache_dir):
    """With a (tiny) Stable Diffusion, ``background_kind=mlp`` trains the background alongside
    the splats, and the checkpoint carries it: 4 steps straight equal 2 + resume + 2."""
    from .tiny_models import build_tiny_sd

    model = build_tiny_sd(tmp_path / "sd")
    cfg = load_config(DistillConfig, CONFIG, small_overrides(
        tmp_path, cache_dir, **{"guidance.kind": "stable-diffusion", "guidance.model_id": model,
                                "guidance.resolution": 32, "guidance.half_precision": False,
                                "guidance.latent_sampling": "mean", "background_kind": "mlp",
                                "random_background": 0.5, "splats.densify.enabled": False,
                                "prompt_processor.cache_dir": tmp_path / "embeddings"}))
    start = system_of(cfg).background.state_dict()
    straight, second = straight_and_resumed(cfg, tmp_path, 4)
    assert any(not torch.equal(start[k], v) for k, v in straight.background.state_dict().items())
    for want, got in ((straight.background.state_dict(), second.background.state_dict()),
                      (straight.scene.scene.params, second.scene.scene.params)):
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_lock_visible_scales_each_splats_step_by_its_hidden_share(tmp_path, cache_dir):
    """From a .ply with a visibility per splat, one step moves a splat of visibility v by
    (1 - v) of the step an unlocked run takes: 1 keeps it, 0.25 moves it three quarters."""
    from cfd.scene import random_ball

    splats = random_ball(300, 0.6, generator=torch.Generator().manual_seed(0))
    visibility = torch.tensor([1.0, 0.25, 0.0]).repeat(100)
    splats.save_ply(tmp_path / "start.ply", {"visibility": visibility})
    runs = {}
    for lock, threshold in ((False, None), (True, None), (True, 0.2)):
        cfg = load_config(DistillConfig, CONFIG, small_overrides(
            tmp_path, cache_dir, **{"splats.init.kind": "ply",
                                    "splats.init.path": tmp_path / "start.ply",
                                    "splats.init.lock_visible": lock,
                                    "splats.init.lock_threshold": threshold or "null",
                                    "splats.densify.enabled": False}))
        system = system_of(cfg)
        system.train_step()
        runs[lock, threshold] = {k: v.detach() - splats.params[k].detach()
                                 for k, v in system.scene.scene.params.items()}
    held = visibility >= 0.2  # with lock_threshold=0.2 these stay, the rest move freely
    for key, free in runs[False, None].items():
        share = (1 - visibility).view(-1, *[1] * (free.ndim - 1))
        assert torch.allclose(runs[True, None][key], share * free, atol=1e-6), key
        assert torch.equal(runs[True, None][key][visibility == 1], torch.zeros_like(free[:100]))
        assert torch.equal(runs[True, 0.2][key][held], torch.zeros_like(free[held]))
        assert torch.allclose(runs[True, 0.2][key][~held], free[~held], atol=1e-6), key
    assert runs[False, None]["means"].abs().max() > 0


def _interrupted_run(tmp_path, cache_dir, monkeypatch, at_step, **extra):
    """A run stopped by Ctrl-C while step ``at_step`` is under way; its folder."""
    from core.runtime import RunInterrupted

    step = distill.Distillation.train_step

    def interrupted(self):
        if self.step == at_step:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(distill.Distillation, "train_step", interrupted)
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, **extra))
    with pytest.raises(RunInterrupted) as stop:
        distill.run(cfg)
    monkeypatch.setattr(distill.Distillation, "train_step", step)
    (run_dir,) = list((tmp_path / "cfd-splats-embedded").iterdir())
    assert (stop.value.run_dir, stop.value.step) == (run_dir, at_step)
    return run_dir, stop.value.checkpoint_step


def test_resumed_run_counts_the_time_before_the_resume(tmp_path, cache_dir, monkeypatch, capsys):
    from cfd.systems.checkpoint import load_checkpoint, save_checkpoint

    run_dir, checkpoint_step = _interrupted_run(tmp_path, cache_dir, monkeypatch, at_step=3,
                                                steps=4, checkpoint_every=2)
    state = load_checkpoint(run_dir / "ckpt")
    assert checkpoint_step == state["step"] == 2 and state["wall_s"] > 0
    state["wall_s"] += 1000.0  # the first part, made long enough to see
    save_checkpoint(run_dir / "ckpt", state)
    capsys.readouterr()
    result = distill.resume(run_dir)
    assert result["wall_s"] > 1000.0
    assert json.loads((run_dir / "metrics.json").read_text())["wall_s"] == result["wall_s"]
    assert f"s of them before the resume); results in {run_dir}" in capsys.readouterr().out


def test_ctrl_c_during_a_checkpoint_write_stops_after_it_with_that_step(tmp_path, cache_dir,
                                                                      monkeypatch):
    """The CI failure of stop 28: a SIGINT that lands inside torch.save must not tear the write
    into a RuntimeError; the save ends, and the run stops with that checkpoint as its resume
    point."""
    import signal

    from cfd.systems import checkpoint
    from cfd.systems.checkpoint import load_checkpoint
    from core.runtime import RunInterrupted

    save = torch.save

    def save_hit_by_ctrl_c(obj, f):
        if obj["step"] == 2:
            signal.raise_signal(signal.SIGINT)  # the handler runs now, as a real Ctrl-C would
        return save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_hit_by_ctrl_c)
    cfg = load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir, steps=4,
                                                            checkpoint_every=1))
    with pytest.raises(RunInterrupted) as stop:
        distill.run(cfg)
    assert stop.value.step == stop.value.checkpoint_step == 2
    assert load_checkpoint(stop.value.run_dir / "ckpt")["step"] == 2


def test_ctrl_c_stops_a_run_with_the_command_that_resumes_it(tmp_path, cache_dir):
    """A real SIGINT: no traceback, exit status 130, the step it stopped at and the command."""
    import re

    victim = _cli(["--config", str(CONFIG), *small_overrides(tmp_path, cache_dir, steps=200,
                                                             checkpoint_every=3,
                                                             log_every=1000)], tmp_path)
    ckpt = None
    deadline = time.time() + 300
    while ckpt is None and time.time() < deadline and victim.poll() is None:
        found = list(tmp_path.glob("*/*/ckpt/last.pt"))
        if found and torch.load(found[0], weights_only=False)["step"] >= 3:
            ckpt = found[0]
        time.sleep(0.05)
    assert ckpt is not None, "no checkpoint appeared"
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "Traceback" not in err, err[-2000:]
    said = re.search(r"interrupted at step (\d+) \(its checkpoint holds step (\d+)\); "
                     r"continue with: python run.py --resume (\S+)$", err, re.MULTILINE)
    assert said, err[-2000:]
    assert Path(said[3]) == ckpt.parent.parent
    state = torch.load(ckpt, weights_only=False)  # whole: the step under way was not saved
    assert 3 <= state["step"] == int(said[2]) <= int(said[1]) < 200


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a checkpoint"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, cache_dir, capsys, damage):
    import io

    import run as cli
    from cfd.config import save_config

    run_dir = tmp_path / "run"
    save_config(load_config(DistillConfig, CONFIG, small_overrides(tmp_path, cache_dir)),
                run_dir / "config.yaml")
    whole = io.BytesIO()
    torch.save({"step": 2, "scene": {"splats": {"means": torch.zeros(300, 3)}}}, whole)
    data = {"empty": b"", "cut short": whole.getvalue()[: len(whole.getvalue()) // 2],
            "not a checkpoint": bytes(range(256))}[damage]
    (run_dir / "ckpt").mkdir()
    (run_dir / "ckpt" / "last.pt").write_bytes(data)
    assert cli.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {run_dir / 'ckpt' / 'last.pt'} is damaged" in err, err
    assert f"delete {run_dir / 'ckpt'} to restart that run folder from step 0" in err


def test_a_checkpoint_of_other_scene_settings_is_a_clear_error(tmp_path, cache_dir, capsys):
    """config.yaml edited after the run started: the checkpoint's parts no longer fit it."""
    import run as cli
    from cfd.config import save_config
    from cfd.systems.checkpoint import save_checkpoint

    splats = system_of(load_config(DistillConfig, CONFIG,
                                              small_overrides(tmp_path, cache_dir)))
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "ckpt", splats.state_dict())
    nerf_cfg = load_config(DistillConfig, NERF_CONFIG, nerf_overrides(tmp_path, cache_dir))
    save_config(nerf_cfg, run_dir / "config.yaml")
    assert cli.main(["--resume", str(run_dir)]) == 2
    assert ("error: this checkpoint was written with scene=splats, but the config has "
            "scene=nerf: the run folder's config.yaml was changed") in capsys.readouterr().err
    no_grid = system_of(load_config(DistillConfig, NERF_CONFIG, nerf_overrides(
        tmp_path, cache_dir, **{"nerf.occupancy.enabled": False})))
    with pytest.raises(ValueError, match="written with nerf.occupancy.enabled=true, but the "
                                         "config has nerf.occupancy.enabled=false"):
        no_grid.load_state_dict(system_of(nerf_cfg).state_dict())
