"""The ``fit-splats`` job, a renderer demo: fit splats to multi-view renders of a known object (the shape world's snowman).

A photometric multi-view fit exercises the whole foundation (cameras, splats, the differentiable
renderer with its backward pass, densification, export) and measures itself: held-out PSNR
against the target. It is the README's run command until the distillation job exists.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cfd.cameras import fixed_orbit_cameras
from cfd.renderers import render
from cfd.scene import Densifier, DensifyConfig, random_ball
from cfd.shapes import object_splats, objects_for
from cfd.systems.common import LearningRates, OrbitConfig, check_backend, check_counts
from cfd.systems.ground_truth import psnr
from cfd.utils.media import save_grid
from cfd.visualize import write_orbit_video
from core.devices import resolve_device
from core.runtime import seed_everything
from jobs.skeleton import RunFolder, check_output, typed

log = logging.getLogger(__name__)


@dataclass
class FitSplatsConfig:
    job: str = "fit-splats"
    name: str = "demo-fit-splats"
    tag: str = "snowman"
    seed: int = 0
    output_dir: str = "outputs"
    device: str = "auto"
    backend: str = "auto"
    steps: int = 400
    batch_size: int = 4
    resolution: int = 64
    init_splats: int = 2000
    background: float = 1.0
    log_every: int = 100
    eval_views: int = 8
    video_frames: int = 48
    video_size: int = 128
    lr: LearningRates = field(default_factory=LearningRates)
    camera: OrbitConfig = field(default_factory=OrbitConfig)
    densify: DensifyConfig = field(
        default_factory=lambda: DensifyConfig(
            refine_start_iter=100, refine_stop_iter=300, refine_every=50, reset_every=200
        )
    )


def run(cfg) -> dict:
    """Run the fit described by ``cfg`` (an OmegaConf ``FitSplatsConfig``); returns the metrics."""
    c: FitSplatsConfig = typed(cfg)
    device = resolve_device(c.device)
    check_backend(device, c.backend)
    c.camera.check()
    check_counts({"init_splats": c.init_splats, "batch_size": c.batch_size,
                  "resolution": c.resolution, "log_every": c.log_every,
                  "eval_views": c.eval_views, "video_frames": c.video_frames,
                  "video_size": c.video_size})
    check_output(c.output_dir, c.name)
    gen = seed_everything(c.seed)
    folder = RunFolder.create(c.output_dir, c.name, c.tag, cfg)
    run_dir = folder.path

    target = object_splats(objects_for("a snowman")[0]).to(device)
    splats = random_ball(c.init_splats, radius=0.6, opacity=0.1, generator=gen).to(device)
    optimizers = splats.make_optimizers(vars(c.lr))
    densifier = Densifier(c.densify, scene_scale=1.0)
    densifier.check(splats, optimizers)

    eval_cams = fixed_orbit_cameras(c.eval_views, c.resolution, c.resolution, elevation_deg=25.0,
                                    device=device)
    with torch.no_grad():
        eval_target = render(target, eval_cams, c.backend, c.background).rgb

    start = time.perf_counter()
    bar = tqdm(range(c.steps), desc="fit", dynamic_ncols=True)
    for step in bar:
        cams = c.camera.sample(c.batch_size, c.resolution, gen, device)
        with torch.no_grad():
            gt = render(target, cams, c.backend, c.background).rgb
        out = render(splats, cams, c.backend, c.background)
        densifier.before_backward(splats, optimizers, step, out.info)
        loss = torch.nn.functional.l1_loss(out.rgb, gt)
        loss.backward()
        densifier.after_backward(splats, optimizers, step, out.info)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}", splats=len(splats))
        if (step + 1) % c.log_every == 0 or step + 1 == c.steps:
            with torch.no_grad():
                pred = render(splats, eval_cams, c.backend, c.background).rgb
            save_grid([pred, eval_target], run_dir / f"progress_{step + 1:05d}.png")
    wall = time.perf_counter() - start

    with torch.no_grad():
        pred = render(splats, eval_cams, c.backend, c.background).rgb
    metrics = {"psnr": psnr(pred, eval_target), "steps": c.steps, "wall_s": wall,
               "n_splats": len(splats)}
    splats.save_ply(run_dir / "splats.ply")
    video = write_orbit_video(splats, run_dir / "orbit.mp4", n_frames=c.video_frames,
                              size=c.video_size)
    return folder.finish(metrics, f"held-out PSNR {metrics['psnr']:.2f} dB with {len(splats)} "
                                  f"splats in {wall:.1f} s; wrote splats.ply, {video.name} and "
                                  "progress grids")


Config = FitSplatsConfig
