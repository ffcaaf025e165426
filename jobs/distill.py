"""The ``distill`` job: CFD or SDS of one prompt into splats or a NeRF, resumable.

    python run.py --config configs/cfd-splats-embedded.yaml prompt_processor.prompt="a rocket"
    python run.py --resume outputs/cfd-splats-embedded/a_rocket@<time>

Writes ``config.yaml``, ``metrics.jsonl`` (every step), ``progress_*.png``, ``ckpt/`` (atomic,
verified checkpoints: a killed run continues bit for bit on CPU), the scene's files
(``splats.ply``, or ``nerf.safetensors`` and ``mesh.obj`` / ``mesh.glb``), orbit videos,
``vs_truth.png`` and ``metrics.json`` (held-out PSNR and mask IoU against the shape world, with
the embedded prior).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from cfd.cameras import fixed_orbit_cameras
from cfd.config import ConfigError, load_config
from cfd.systems.checkpoint import load_checkpoint, save_checkpoint
from cfd.systems.common import check_counts
from cfd.systems.distill import Distillation, DistillationSettings, check_settings
from cfd.systems.ground_truth import (NO_GROUND_TRUTH, evaluate_against_shape_world,
                                      has_ground_truth)
from cfd.systems.prior import GuidanceKind
from cfd.utils.media import save_grid
from cfd.visualize import write_orbit_video
from core.errors import UserError
from core.runtime import (RunInterrupted, TrainingStopped, atomic_write, interrupts_held,
                          log_records)
from jobs.skeleton import RunFolder, check_output, finished_run, typed

log = logging.getLogger(__name__)


@dataclass
class DistillConfig(DistillationSettings):
    job: str = "distill"
    name: str = "cfd-splats-embedded"
    output_dir: str = "outputs"
    checkpoint_every: int = 100
    log_every: int = 100
    max_bad_steps: int = 5
    eval_views: int = 8
    video_frames: int = 48
    video_size: int = 128


Config = DistillConfig


def check(c: DistillConfig) -> None:
    """Every setting, and the output folder, before any model loads."""
    check_settings(c)
    check_counts({"checkpoint_every": c.checkpoint_every, "log_every": c.log_every,
                  "max_bad_steps": c.max_bad_steps, "eval_views": c.eval_views,
                  "video_frames": c.video_frames, "video_size": c.video_size})
    check_output(c.output_dir, c.name)


def run(cfg) -> Dict[str, Any]:
    """Run a distillation; returns the final metrics (with ``run_dir``)."""
    c: DistillConfig = typed(cfg)
    check(c)
    system = Distillation(c)  # loads the models before a folder exists
    folder = RunFolder.create(c.output_dir, c.name, c.prompt_processor.prompt, cfg)
    return _train(system, c, folder, checkpoint_step=None)


def resume(run_dir: Path) -> Dict[str, Any]:
    """Continue a stopped run from its checkpoint, as configured. A finished run (its
    metrics.json written) only says so and returns its metrics."""
    run_dir = Path(run_dir)
    finished = finished_run(run_dir)
    if finished is not None:
        return finished
    # a damaged checkpoint is refused before any model loads
    state = load_checkpoint(run_dir / "ckpt")
    try:
        c: DistillConfig = typed(load_config(DistillConfig, run_dir / "config.yaml"))
    except ConfigError as err:
        raise UserError(f"{err}. If {run_dir} was written by an earlier cfd3d (before the jobs "
                        "layer), this version cannot resume it: start a new run") from None
    check(c)
    system = Distillation(c)
    if state is not None:
        system.load_state_dict(state)
        log.info("resumed %s at step %d", run_dir, system.step)
    return _train(system, c, RunFolder(run_dir),
                  checkpoint_step=None if state is None else system.step)


def _train(system: Distillation, c: DistillConfig, folder: RunFolder,
           checkpoint_step: Optional[int]) -> Dict[str, Any]:
    """The step loop from ``system.step`` to the end, then the outputs."""
    run_dir = folder.path
    try:
        metrics_path = _metrics_log(run_dir, system.step)
        eval_cams = fixed_orbit_cameras(c.eval_views, c.resolution, c.resolution, 20.0, 2.5,
                                        40.0, device=system.device)
        wall_before, start = system.wall_s, time.perf_counter()
        bar = tqdm(total=c.steps, initial=system.step, desc=c.prompt_processor.prompt,
                   dynamic_ncols=True)
        with open(metrics_path, "a") as metrics_file:
            while system.step < c.steps:
                record = system.train_step()
                metrics_file.write(json.dumps(record) + "\n")
                if record["skipped"]:
                    log.warning("step %d: non-finite gradient, step skipped", record["step"])
                    if system.bad_steps >= c.max_bad_steps:
                        metrics_file.flush()
                        raise TrainingStopped(_diverged(system.bad_steps, run_dir,
                                                        checkpoint_step))
                bar.set_postfix(t=f"{record['t']:.3f}", loss=f"{record['loss']:.3g}",
                                **({"splats": record["n_splats"]} if "n_splats" in record
                                   else {}))
                bar.update(1)
                if system.step % c.checkpoint_every == 0 or system.step == c.steps:
                    metrics_file.flush()
                    system.wall_s = wall_before + time.perf_counter() - start
                    with interrupts_held():  # Ctrl-C lands after the save, with its step known
                        save_checkpoint(run_dir / "ckpt", system.state_dict())
                        checkpoint_step = system.step
                if system.step % c.log_every == 0 or system.step == c.steps:
                    with torch.no_grad():
                        pred = system.render_eval(eval_cams)
                    save_grid([pred.rgb, pred.alpha],
                              run_dir / f"progress_{system.step:05d}.png")
        bar.close()
        result = {"steps": c.steps, "wall_s": wall_before + time.perf_counter() - start,
                  "prompt": c.prompt_processor.prompt}
        _write_outputs(system, c, run_dir, result)
    except KeyboardInterrupt:  # the last checkpoint is whole; a half-done step is not saved
        raise RunInterrupted(run_dir, system.step, checkpoint_step) from None
    before = f" ({wall_before:.1f} s of them before the resume)" if wall_before else ""
    return folder.finish(result, f"{c.steps} steps in {result['wall_s']:.1f} s{before}")


def _diverged(bad_steps: int, run_dir: Path, checkpoint_step: Optional[int]) -> str:
    """Why a run stopped itself after ``bad_steps`` non-finite gradients, and what to do."""
    saved = (f"The last good checkpoint (step {checkpoint_step}) is in {run_dir / 'ckpt'} "
             "(--resume would repeat the same steps)" if checkpoint_step is not None
             else "No checkpoint was written yet")
    return (f"{bad_steps} consecutive steps had NaN/Inf gradients; stopped. {saved}; start a "
            "new run with lower learning rates or guidance scale")


def _metrics_log(run_dir: Path, keep_below: int) -> Path:
    """metrics.jsonl without the lines of steps a resumed run will redo, rewritten atomically.
    A killed run's torn last line is dropped."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = "".join(json.dumps(r) + "\n" for r in log_records(path) if r["step"] < keep_below)
        atomic_write(path, lambda f: f.write(kept.encode()))
    return path


def _write_outputs(system: Distillation, c: DistillConfig, run_dir: Path, result: dict) -> None:
    """The trained scene's files and orbit videos, and the ground-truth metrics (embedded
    prior), added to ``result``."""
    result.update(system.scene.save(run_dir))
    for name, show in system.scene.videos().items():
        write_orbit_video(system.scene.scene, run_dir / name, n_frames=c.video_frames,
                          size=c.video_size, distance=2.5, background=c.background,
                          render_options=system.scene.render_options(), show=show)
    if GuidanceKind(c.guidance.kind) is GuidanceKind.embedded and has_ground_truth(c.prompt_processor.prompt):
        result.update(evaluate_against_shape_world(system.scene.scene,
                                                    c.prompt_processor.prompt,
                                                    resolution=c.resolution,
                                                    background=c.background,
                                                    comparison_path=run_dir / "vs_truth.png",
                                                    render_options=system.scene.render_options()))
        print(f"held-out PSNR {result['psnr']:.2f} dB, mask IoU {result['mask_iou']:.3f} "
              f"(best: {result['variant']} rotated {result['rotation_deg']:.0f} deg)")
    elif GuidanceKind(c.guidance.kind) is GuidanceKind.embedded:
        result["ground_truth"] = NO_GROUND_TRUTH
        print(f"no held-out PSNR or mask IoU: ground truth {NO_GROUND_TRUTH}")
