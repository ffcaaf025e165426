"""Step time and memory of the main job with the embedded prior's dataset before and after the
category variants were added (issue 19).

Two distillations of one config (default: the README run's), same seed: one distils from the
prior over today's dataset, the other from a prior over its named objects' images alone, which
are the dataset before the variants came, bit for bit (the variants are appended after them).
Both priors run today's code. Their training steps are timed in alternating blocks, so both
see the same machine load, and the ratio of the medians is printed; so are the bytes each prior
holds and the peak memory of building it (each in a fresh process).

    python benchmarks/bench_prior_dataset.py
    python benchmarks/bench_prior_dataset.py --rounds 8 --steps 10 prompt_processor.prompt="a barn"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import peak_memory_mb, reset_peak_memory, rss_mb  # noqa: E402
from cfd.config import load_config, to_object  # noqa: E402
from cfd.shapes import SHAPE_WORLD, build_shape_dataset  # noqa: E402
from cfd.systems.distill import Distillation  # noqa: E402
from core.runtime import tune_malloc  # noqa: E402
from guidance.embedded import ClosedFormPrior  # noqa: E402
from guidance.prompts import PromptProcessor  # noqa: E402
from jobs.distill import DistillConfig  # noqa: E402


def named_only_prior(folder: Path, view_config, **settings) -> ClosedFormPrior:
    """The prior over the named objects' images of the dataset at ``folder`` (its first rows):
    the prior of the dataset before the category variants. ``settings``: ``ClosedFormPrior``'s
    other arguments (guidance scale, weighting)."""
    meta = json.loads((folder / "meta.json").read_text())
    t = load_file(str(folder / "images.safetensors"))
    named = t["object_index"] < len(SHAPE_WORLD)
    n = int(named.sum())
    assert named[:n].all(), "the named objects' images come first"
    prompts = sorted({meta["prompts"][i] for i in t["prompt_index"][:n].tolist()},
                     key=meta["prompts"].index)
    assert prompts == meta["prompts"][:len(prompts)]
    return ClosedFormPrior(t["rgb"][:n].float() / 255.0, t["prompt_index"][:n],
                           t["elevation"][:n], t["azimuth"][:n], prompts,
                           model_id=f"embedded:{meta['fingerprint']}:named-only",
                           view_config=view_config, opacity=t["alpha"][:n].float() / 255.0,
                           data_background=float(meta["settings"]["background"]), **settings)


def build_peak_mb(folder: Path, view_config, named_only: bool) -> float:
    """How far building a prior (loading the dataset included) raises a fresh process's peak
    resident memory, in MB."""
    tune_malloc()
    base = rss_mb()
    reset_peak_memory(torch.device("cpu"))
    if named_only:
        named_only_prior(folder, view_config)
    else:
        ClosedFormPrior.from_pretrained(folder, view_config=view_config)
    return peak_memory_mb(torch.device("cpu")) - base


def held_mb(prior: ClosedFormPrior) -> float:
    """Megabytes of the tensors a prior holds."""
    return sum(v.nbytes for v in vars(prior).values() if torch.is_tensor(v)) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "cfd-splats-embedded.yaml"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per arm and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_malloc()
    cfg = to_object(load_config(DistillConfig, Path(args.config), args.overrides))
    folder = build_shape_dataset(cfg.guidance.dataset)
    view_config = cfg.prompt_processor

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        build_mb = {name: pool.apply(build_peak_mb, (folder, view_config, name == "before"))
                    for name in ("before", "after")}

    arms = {"after": Distillation(cfg), "before": Distillation(cfg)}
    new = arms["after"].guidance
    old = named_only_prior(folder, view_config, guidance_scale=new.guidance_scale,
                           weighting=new.weighting)
    arms["before"].guidance, arms["before"].prompt = old, PromptProcessor(view_config, old)

    for system in arms.values():
        for _ in range(args.warmup):
            system.train_step()
    times = {name: [] for name in arms}
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            for _ in range(args.steps):
                start = time.perf_counter()
                arms[name].train_step()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"prompt={cfg.prompt_processor.prompt!r} batch={cfg.batch_size} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} steps/round={args.steps}")
    print("| dataset | images | prompts | median step s | prior holds MB | build peak +MB |")
    print("|---|---|---|---|---|---|")
    for name, prior in (("before", old), ("after", new)):
        print(f"| {name} | {prior.data.shape[0]} | {len(prior.prompts)} | {median[name]:.4f} | "
              f"{held_mb(prior):.0f} | {build_mb[name]:.0f} |")
    print(f"step time after / before: {median['after'] / median['before']:.3f} (median), "
          f"{sum(times['after']) / sum(times['before']):.3f} (total)")


if __name__ == "__main__":
    main()
