"""CFD vs SDS on the embedded prompts: quality (held-out PSNR, mask IoU) and diversity.

Runs ``configs/cfd-splats-embedded.yaml`` and ``configs/sds-splats-embedded.yaml`` for every
prompt and seed, prints one row per run and a summary table: median PSNR and IoU per method, and
for prompts with several variants the mean pairwise distance between the seeds' results (RMS
difference of their held-out renders) and how many distinct variants the seeds landed on.

    python benchmarks/bench_distill.py --seeds 0 1 2
    python benchmarks/bench_distill.py --methods cfd --prompts "a mug" -- steps=300
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfd.cameras import fixed_orbit_cameras  # noqa: E402
from cfd.config import load_config  # noqa: E402
from cfd.renderers import render  # noqa: E402
from cfd.scene import Splats  # noqa: E402
from cfd.shapes import objects_for, prompts  # noqa: E402
from jobs.distill import DistillConfig, run  # noqa: E402
from core.runtime import tune_malloc  # noqa: E402

CONFIGS = {"cfd": ROOT / "configs" / "cfd-splats-embedded.yaml",
           "sds": ROOT / "configs" / "sds-splats-embedded.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["cfd", "sds"])
    parser.add_argument("--prompts", nargs="+", default=None)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    tune_malloc()
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_distill_")
    chosen = args.prompts or prompts()
    cams = fixed_orbit_cameras(8, 64, 64, 20.0, 2.5, 40.0)
    rows, renders = [], {}
    for method, prompt, seed in itertools.product(args.methods, chosen, args.seeds):
        cfg = load_config(DistillConfig, CONFIGS[method], [
            f"prompt_processor.prompt={prompt}", f"seed={seed}", f"output_dir={out_dir}",
            "video_frames=8", *args.overrides])
        result = run(cfg)
        run_dir = max(Path(out_dir, cfg.name).glob(f"{prompt.replace(' ', '_')}@*"),
                      key=lambda p: p.stat().st_mtime)
        splats = Splats.load_ply(run_dir / "splats.ply")
        with torch.no_grad():
            renders[method, prompt, seed] = render(splats, cams, background=1.0).rgb
        rows.append({"method": method, "prompt": prompt, "seed": seed, **result})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| method | prompt | PSNR (median over seeds) | mask IoU | wall s | variants hit | "
          "pairwise distance |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        for prompt in chosen:
            mine = [r for r in rows if r["method"] == method and r["prompt"] == prompt]
            pairs = list(itertools.combinations(args.seeds, 2))
            dist = (statistics.mean(
                (renders[method, prompt, a] - renders[method, prompt, b]).pow(2).mean().sqrt().item()
                for a, b in pairs) if pairs else float("nan"))
            multi = len(objects_for(prompt)) > 1
            print(f"| {method} | {prompt} | {statistics.median(r['psnr'] for r in mine):.2f} | "
                  f"{statistics.median(r['mask_iou'] for r in mine):.3f} | "
                  f"{statistics.median(r['wall_s'] for r in mine):.0f} | "
                  f"{len({r['variant'] for r in mine}) if multi else '-'} | "
                  f"{dist:.3f} |")
        per_method = [r for r in rows if r["method"] == method]
        print(f"| {method} | all | {statistics.median(r['psnr'] for r in per_method):.2f} | "
              f"{statistics.median(r['mask_iou'] for r in per_method):.3f} | | | |")


if __name__ == "__main__":
    main()
