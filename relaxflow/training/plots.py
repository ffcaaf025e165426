"""The loss-curve figure of a training run, from its ``metrics.jsonl`` records."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any, Dict, List, Sequence

from matplotlib.figure import Figure

from core.runtime import atomic_write

# held-out metrics drawn on the right, with their labels: IoUs (stage 1's of occupancy, stage
# 2's of the rendered silhouettes) on the left axis, stage 2's PSNRs on the right one
HELD_OUT = {"vae_iou": "VAE reconstruction IoU", "flow_iou": "sampled structure IoU",
            "flow_iou_other_render": "sampled IoU, another render's condition",
            "vae_mask_iou": "VAE mask IoU", "flow_mask_iou": "sampled mask IoU",
            "flow_other_render_mask_iou": "sampled mask IoU, another render's condition"}
HELD_OUT_PSNR = {"vae_psnr": "VAE PSNR", "flow_psnr": "sampled PSNR",
                 "flow_other_render_psnr": "sampled PSNR, another render's condition"}


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """The mean of each ``window`` consecutive values (``len(values) - window + 1`` of them)."""
    sums = [0.0, *accumulate(values)]
    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]


def plot_losses(records: List[Dict[str, Any]], path: Path) -> Path:
    """Training losses per phase (log scale, left) and held-out metrics (right) against the
    step, written atomically to ``path`` (PNG). ``records``: training records carry
    ``phase`` and ``loss``, held-out ones ``held_out: true`` and the metrics of ``HELD_OUT``
    and ``HELD_OUT_PSNR``."""
    figure = Figure(figsize=(10, 4.6), tight_layout=True)
    losses, held_out = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    train = [r for r in records if not r.get("held_out")]
    for phase in dict.fromkeys(r["phase"] for r in train):
        steps = [r["step"] for r in train if r["phase"] == phase]
        values = [r["loss"] for r in train if r["phase"] == phase]
        line, = losses.plot(steps, values, lw=0.5, alpha=0.35, label=f"{phase} loss")
        window = max(1, len(values) // 50)
        if window > 1:  # a step's loss varies with its batch and times: the trend is the mean
            losses.plot(steps[window - 1:], running_mean(values, window), lw=1.5,
                        color=line.get_color(), label=f"{phase} loss, mean of {window} steps")
    losses.set(xlabel="step", ylabel="training loss", yscale="log", title="training")
    evaluated = [r for r in records if r.get("held_out")]
    for key, label in HELD_OUT.items():
        points = [(r["step"], r[key]) for r in evaluated if key in r]
        if points:
            held_out.plot(*zip(*points), marker="o", label=label)
    held_out.set(xlabel="step", ylabel="IoU", ylim=(0, 1), title="held-out seeds")
    if losses.get_legend_handles_labels()[0]:
        losses.legend(fontsize=8, loc="best")
    handles, labels = held_out.get_legend_handles_labels()
    if any(key in r for r in evaluated for key in HELD_OUT_PSNR):
        decibels = held_out.twinx()
        for key, label in HELD_OUT_PSNR.items():
            points = [(r["step"], r[key]) for r in evaluated if key in r]
            if points:
                decibels.plot(*zip(*points), marker="s", ls="--", label=label)
        decibels.set(ylabel="PSNR (dB)")
        more = decibels.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:  # one legend for both axes, under the panel, where it hides no line
        held_out.legend(handles, labels, fontsize=7, ncol=2, loc="upper center",
                        bbox_to_anchor=(0.5, -0.15))
    return atomic_write(Path(path), lambda f: figure.savefig(f, format="png", dpi=100))
