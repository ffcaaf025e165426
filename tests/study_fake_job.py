"""A stand-in for ``run.py`` that the study tests launch instead of real jobs (fast, no torch).

    python tests/study_fake_job.py --config <yaml> key=value ...
    python tests/study_fake_job.py --resume <run folder>

Like a distill run it makes ``<output_dir>/<name>/<prompt slug>@<time>/`` with config.yaml,
checkpoints its step in ``ckpt/step.json`` after every step, and ends with orbit.mp4 (or .gif)
and metrics.json (psnr, mask_iou, wall_s: fixed functions of the config; omp_threads: its
OMP_NUM_THREADS). Config keys: ``steps``, ``step_s`` (seconds per step), ``fail_prompt`` (exit 1
with an error for that prompt), ``quality`` (added to psnr), ``video`` (mp4, gif or none),
``splats`` (a .ply copied to the run's ``splats.ply``, as its scene; ``{seed}`` in it is the
seed).
It appends ``start <step> <pid>`` or ``resume <step> <pid>`` to ``<output_dir>/invocations.txt``
and writes its parent's pid (the process that launched it) to ``<output_dir>/parent.pid``, so
tests can see what it was asked to do and kill who runs it.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import yaml

TEXT_KEYS = {"prompt_processor.prompt", "name", "output_dir"}


def apply_override(cfg: dict, item: str) -> None:
    key, value = item.split("=", 1)
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value if key in TEXT_KEYS else yaml.safe_load(value)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_video(path: Path, seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    frames = [np.full((32, 32, 3), rng.integers(0, 255, 3), dtype=np.uint8) for _ in range(4)]
    if kind == "mp4":
        imageio.mimwrite(path.with_suffix(".mp4"), frames, fps=4, codec="libx264",
                         macro_block_size=1)
    elif kind == "gif":
        imageio.mimwrite(path.with_suffix(".gif"), frames, duration=250, loop=0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.resume is not None:
        run_dir = args.resume
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        step = json.loads((run_dir / "ckpt" / "step.json").read_text())["step"]
    else:
        cfg = yaml.safe_load(args.config.read_text())
        for item in args.overrides:
            apply_override(cfg, item)
        step = 0
    prompt = cfg["prompt_processor"]["prompt"]
    output_dir = Path(cfg["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "parent.pid").write_text(str(os.getppid()))
    with open(output_dir / "invocations.txt", "a") as f:
        f.write(f"{'start' if args.resume is None else 'resume'} {step} {os.getpid()}\n")
    print(f"fake job: {prompt!r} seed {cfg['seed']} from step {step}", flush=True)
    if prompt == cfg.get("fail_prompt"):
        print("error: this prompt was told to fail", file=sys.stderr)
        return 1
    if args.resume is None:
        slug = re.sub(r"[^\w.-]+", "_", prompt).strip("_")
        run_dir = output_dir / cfg["name"] / f"{slug}@{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "ckpt").mkdir(exist_ok=True)
    while step < cfg.get("steps", 3):
        time.sleep(cfg.get("step_s", 0.0))
        step += 1
        write_json(run_dir / "ckpt" / "step.json", {"step": step})
    if cfg.get("splats"):
        shutil.copy(cfg["splats"].replace("{seed}", str(cfg["seed"])), run_dir / "splats.ply")
    write_video(run_dir / "orbit", cfg["seed"], cfg.get("video", "mp4"))
    psnr = 20.0 + cfg.get("quality", 0.0) + cfg["seed"] + len(prompt) % 3
    write_json(run_dir / "metrics.json", {"psnr": psnr, "mask_iou": 0.5 + 0.1 * cfg["seed"],
                                          "wall_s": 1.0 + cfg["seed"], "prompt": prompt,
                                          "omp_threads": int(os.environ["OMP_NUM_THREADS"])})
    print(f"done; results in {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
