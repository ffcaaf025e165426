"""Time of one call of the embedded prior, with and without leaving negligible images out of its
weighted sum (``guidance.embedded.NEGLIGIBLE_WEIGHT``), and how far the two results differ.

The call is the main job's: its four views' conditions (the prompt with a view sector each) and
the four unconditional ones in one batch, half of the views on a random background, at a range of
t. Each input is a dataset image of the prompt, jittered, noised to t as the run does. The two
arms run alternately on the same inputs, so both see the same machine load, and the ratio of the
medians is printed per t. The dataset is the config's (1200 views an object for the
distillation configs); ``--views-per-object 300`` gives the other jobs' one.

    python benchmarks/bench_prior_call.py
    python benchmarks/bench_prior_call.py --views-per-object 300 --rounds 5
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

from cfd.config import load_config, to_object  # noqa: E402
from cfd.shapes import ShapeDatasetConfig, build_shape_dataset  # noqa: E402
from guidance import embedded  # noqa: E402
from guidance.embedded import ClosedFormPrior  # noqa: E402
from jobs.distill import DistillConfig  # noqa: E402

TIMES = (0.98, 0.9, 0.8, 0.6, 0.4, 0.2, 0.02)


def call_inputs(prior: ClosedFormPrior, prompt: str, suffixes, t: float, generator):
    """``x_t [8,3,R,R]``, ``t [8]`` and the condition of one guided call: four views of ``prompt``
    (one per sector in ``suffixes``) and the same four unconditioned, every other view on a
    random background."""
    members = (prior.prompt_index == prior.prompts.index(prompt)).nonzero()[:, 0]
    picks = members[torch.randint(len(members), (4,), generator=generator)]
    x0 = prior.data[picks].float().reshape(4, 3, prior.resolution, prior.resolution)
    x0 = x0 + 0.05 * torch.randn(x0.shape, generator=generator)
    tt = torch.tensor(t)
    x_t = prior.schedule.alpha(tt) * x0 + prior.schedule.sigma(tt) * torch.randn(
        x0.shape, generator=generator)
    cond = prior.encode_text([prompt + suffix for suffix in suffixes] + [""] * 4)
    background = torch.rand(4, 3, generator=generator)
    background[::2] = 0.5
    return x_t.repeat(2, 1, 1, 1), torch.full((8,), t), {**cond,
                                                        "background": background.repeat(2, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "cfd-splats-embedded.yaml"))
    parser.add_argument("--views-per-object", type=int, default=None,
                        help="the dataset's views of each named object (default: the config's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = to_object(load_config(DistillConfig, Path(args.config), args.overrides))
    dataset: ShapeDatasetConfig = cfg.guidance.dataset
    if args.views_per_object is not None:
        dataset.views_per_object = args.views_per_object
    prior = ClosedFormPrior.from_pretrained(build_shape_dataset(dataset),
                                            guidance_scale=cfg.guidance.guidance_scale,
                                            view_config=cfg.prompt_processor)
    suffixes = [s for s in cfg.prompt_processor.suffixes() if s][:4]
    generator = torch.Generator().manual_seed(0)
    arms = {"every image": -1.0, "negligible left out": embedded.NEGLIGIBLE_WEIGHT}

    print(f"prompt={cfg.prompt_processor.prompt!r} images={prior.data.shape[0]} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print("| t | every image, s/call | negligible left out, s/call | ratio | max abs difference |")
    print("|---|---|---|---|---|")
    totals = {name: 0.0 for name in arms}
    for t in TIMES:
        inputs = call_inputs(prior, cfg.prompt_processor.prompt, suffixes, t, generator)
        times = {name: [] for name in arms}
        outputs = {}
        for r in range(args.rounds + 1):  # the first round warms up
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                embedded.NEGLIGIBLE_WEIGHT = arms[name]
                start = time.perf_counter()
                outputs[name] = prior.model_output(*inputs)
                if r:
                    times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(v) for name, v in times.items()}
        for name in arms:
            totals[name] += median[name]
        difference = (outputs["every image"] - outputs["negligible left out"]).abs().max()
        print(f"| {t} | {median['every image']:.3f} | {median['negligible left out']:.3f} | "
              f"{median['negligible left out'] / median['every image']:.2f} | "
              f"{difference.item():.1e} |")
    print(f"mean over the t above: {totals['every image'] / len(TIMES):.3f} -> "
          f"{totals['negligible left out'] / len(TIMES):.3f} s/call "
          f"({totals['negligible left out'] / totals['every image']:.2f})")


if __name__ == "__main__":
    main()
