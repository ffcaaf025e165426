"""Step-time breakdown of a distillation step: render, noise, encode, guidance, backward, optimiser.

Builds the run from a config (default: the embedded CFD config), warms up, then times each phase
of ``--steps`` steps separately and prints medians and shares of the step. It also times the
step's floor, the 2D model's own work on the same renders (encode with its backward, the CFG
forward), and prints step / floor: what the engine adds around the model.

    python benchmarks/bench_step.py
    python benchmarks/bench_step.py --config configs/sds-splats-embedded.yaml
    # SD 2.1-base sized (random weights; see bench_guidance_sd.py --save-pipeline), on a GPU:
    python benchmarks/bench_step.py --config configs/cfd-splats-sd21.yaml \
        guidance.model_id=/tmp/sd21-random
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfd.config import load_config  # noqa: E402
from cfd.config import to_object  # noqa: E402
from cfd.systems.distill import Distillation  # noqa: E402
from jobs.distill import DistillConfig  # noqa: E402
from core.runtime import tune_malloc  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "cfd-splats-embedded.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_malloc()
    cfg = load_config(DistillConfig, Path(args.config), args.overrides)
    system = Distillation(to_object(cfg))
    c, dev, g = system.cfg, system.device, system.guidance
    phases = {k: [] for k in ("render", "noise", "encode", "guidance", "backward", "optimizer",
                              "floor")}
    for i in range(args.steps + 3):
        tick = {}

        def mark(name, t0):
            _sync(dev)
            tick[name] = time.perf_counter() - t0
            return time.perf_counter()

        t0 = time.perf_counter()
        # a NeRF's grid refreshes on the step count, as in training
        system.scene.before_render(system.step, system.generator)
        system.step += 1
        cams = c.camera.sample(c.batch_size, c.resolution, system.generator, dev)
        out, background = system.render_views(cams)
        t0 = mark("render", t0)
        points = cams.centers[:, None, None, :] + out.depth.detach() * cams.ray_directions()
        noise = system.noise(points, out.alpha.detach(), system.latent_shape)
        t0 = mark("noise", t0)
        latents = g.encode(out.rgb)
        t0 = mark("encode", t0)
        cond, uncond = g.conditions(system.prompt, cams, background)
        with torch.no_grad():
            x_t = g.schedule.add_noise(latents.detach(), noise, 0.5)
            eps = g.predict_eps(x_t, 0.5, cond, uncond)
            target = latents.detach() - (eps - noise)
        t0 = mark("guidance", t0)
        (0.5 * ((latents - target) ** 2).sum()).backward()
        t0 = mark("backward", t0)
        system.scene.step()
        system.scene.zero_grad()
        t0 = mark("optimizer", t0)
        rgb = out.rgb.detach().requires_grad_()
        latents = g.encode(rgb)
        with torch.no_grad():
            g.predict_eps(g.schedule.add_noise(latents.detach(), noise, 0.5), 0.5, cond, uncond)
        latents.backward(torch.ones_like(latents))
        mark("floor", t0)
        if i >= 3:
            for k, v in tick.items():
                phases[k].append(v)
    medians = {k: statistics.median(v) for k, v in phases.items()}
    floor = medians.pop("floor")
    total = sum(medians.values())
    print(f"device={dev} guidance={c.guidance.kind.value} batch={c.batch_size} res={c.resolution} "
          f"scene={c.scene.value} noise={c.noise.mode} steps={args.steps}")
    print("| phase | median s | share |")
    print("|---|---|---|")
    for k, v in medians.items():
        print(f"| {k} | {v:.4f} | {100 * v / total:.1f}% |")
    print(f"| step | {total:.4f} | 100% |")
    print(f"floor (encode + its backward, CFG model forward) {floor:.4f} s; "
          f"step / floor = {total / floor:.3f}")


if __name__ == "__main__":
    main()
