"""Stage 1's flow, diagnosed from a training run's checkpoint: IoU of structures sampled from
renders of held-out and of training shapes (equal scores: the flow underfits; training far
above held-out: it overfits), at three CFG scales, and per category; with the flow's parameter
average when the run keeps one (``flow.ema_decay``).

    python benchmarks/diagnose_structure_flow.py <train-generator run folder> [--probe]

One render per shape (its first), 12 Euler steps, the same noise for every shape; 34 training
shapes spread over the categories against every held-out one. Per category, next to the flow's
IoU: the VAE's reconstruction IoU of the same shapes, the most the flow can reach.

``--probe`` asks instead whether the condition can tell the categories apart at all: a linear
classifier of the category, fitted on the training renders' features (every view) and scored on
the held-out renders, for the run's conditioner (its tokens averaged, its class token, all its
tokens side by side), the
same architecture untrained, and the render's pixels at 32 px. If the trained conditioner's
held-out accuracy is low, the flow cannot be told which category to draw.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Dict

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfd.config import load_config  # noqa: E402
from cfd.systems.checkpoint import load_checkpoint  # noqa: E402
from jobs.skeleton import typed  # noqa: E402
from jobs.train_generator import TrainGeneratorConfig  # noqa: E402
from relaxflow.sampler import FlowEulerSampler  # noqa: E402
from relaxflow.stages import guided, sample_structure  # noqa: E402
from relaxflow.training.data import ShapeSet, build_structure_data  # noqa: E402
from relaxflow.training.structure import (StructureTrainer, condition_embeddings,  # noqa: E402
                                          occupancy_iou)


@torch.no_grad()
def sampled_iou(trainer: StructureTrainer, shapes: ShapeSet, index: torch.Tensor,
                cfg_strength: float) -> torch.Tensor:
    """IoU ``[len(index)]`` of structures sampled from each shape's first render."""
    tokens = trainer.conditioner.encode(condition_embeddings(trainer.conditioner,
                                                             shapes.rgba[index, 0]))
    sampler = FlowEulerSampler(sigma_min=trainer.s.flow.sigma_min, steps=12,
                               cfg_strength=cfg_strength, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    _, coords = sample_structure(trainer.flow, trainer.decoder,
                                 guided(sampler, tokens, torch.zeros_like(tokens)), len(index),
                                 torch.Generator().manual_seed(0), "cpu")
    truth = shapes.occupancy[index]
    pred = torch.zeros_like(truth)
    coords = coords.long()
    pred[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] = True
    return occupancy_iou(pred, truth)


@torch.no_grad()
def reconstruction_iou(trainer: StructureTrainer, shapes: ShapeSet) -> torch.Tensor:
    """IoU ``[len(shapes)]`` of each shape's occupancy encoded and decoded by the VAE."""
    truth = shapes.occupancy
    logits = trainer.decoder(trainer.encoder(truth[:, None].float()))
    return occupancy_iou(logits[:, 0] > 0, truth)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax classifier ``[D] -> classes`` fitted (L-BFGS, a little
    weight decay) on standardised features ``[N, D]``."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) \
            + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


@torch.no_grad()
def condition_features(conditioner, rgba: Tensor) -> Dict[str, Tensor]:
    """Per render ``[M, H, W, 4]``: the conditioner's tokens averaged, its class token, and
    every token side by side (what the flow's cross-attention can read)."""
    tokens = conditioner.encode(condition_embeddings(conditioner, rgba))
    return {"tokens averaged": tokens.mean(1), "class token": tokens[:, 0],
            "all tokens": tokens.flatten(1)}


def probe(trainer: StructureTrainer) -> None:
    """The ``--probe`` table (module docstring)."""
    train, held = trainer.train_set, trainer.held_out
    views = train.rgba.shape[1]
    train_rgba, train_y = train.rgba.flatten(0, 1), train.category.repeat_interleave(views)
    held_rgba, held_y = held.rgba.flatten(0, 1), held.category.repeat_interleave(views)
    classes = len(train.categories)
    print(f"{len(train_rgba)} training renders, {len(held_rgba)} held-out, {classes} "
          f"categories (chance {1 / classes:.3f})")
    untrained = copy.deepcopy(trainer.conditioner)
    torch.manual_seed(0)
    untrained.model = type(untrained.model)(untrained.model.config).eval()
    for name, conditioner in (("trained", trainer.conditioner), ("untrained", untrained)):
        a, b = condition_features(conditioner, train_rgba), condition_features(conditioner,
                                                                                held_rgba)
        for kind in a:
            accuracy = linear_probe(a[kind], train_y, b[kind], held_y, classes)
            print(f"{name} conditioner, {kind}: held-out accuracy {accuracy:.3f}")

    def pixels(rgba: Tensor) -> Tensor:
        image = rgba.permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.interpolate(image, size=32, mode="area").flatten(1)

    accuracy = linear_probe(pixels(train_rgba), train_y, pixels(held_rgba), held_y, classes)
    print(f"pixels at 32 px: held-out accuracy {accuracy:.3f}")


def main() -> None:
    run_dir = Path(sys.argv[1])
    c = typed(load_config(TrainGeneratorConfig, run_dir / "config.yaml"))
    trainer = StructureTrainer(c, build_structure_data(c.data), torch.device("cpu"))
    trainer.load_state_dict(load_checkpoint(run_dir / "ckpt"))
    for model in (trainer.encoder, trainer.flow, trainer.decoder):
        model.eval()
    print("step", trainer.step)
    if "--probe" in sys.argv[2:]:
        probe(trainer)
        return
    held_out = torch.arange(len(trainer.held_out))
    train = torch.linspace(0, len(trainer.train_set) - 1, 34).round().long()
    with trainer.averaged():  # the flow's average, as the held-out log and the export use
        for cfg_strength in (1.0, 3.0, 7.5):
            a = sampled_iou(trainer, trainer.held_out, held_out, cfg_strength)
            b = sampled_iou(trainer, trainer.train_set, train, cfg_strength)
            print(f"cfg {cfg_strength}: held-out IoU mean {a.mean():.3f} median "
                  f"{a.median():.3f}; training mean {b.mean():.3f} median {b.median():.3f}")
        iou = sampled_iou(trainer, trainer.held_out, held_out, 3.0)
    ceiling = reconstruction_iou(trainer, trainer.held_out)
    print("held-out IoU per category: flow at cfg 3 / VAE reconstruction")
    for i, name in enumerate(trainer.held_out.categories):
        mine = trainer.held_out.category == i
        print(f"{name} {iou[mine].mean():.3f} / {ceiling[mine].mean():.3f}")


if __name__ == "__main__":
    main()
