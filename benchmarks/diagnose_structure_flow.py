"""Stage 1's flow, diagnosed from a training run's checkpoint: IoU of structures sampled from
renders of held-out and of training shapes (equal scores: the flow underfits; training far
above held-out: it overfits), at three CFG scales, and per category.

    python benchmarks/diagnose_structure_flow.py <train-generator run folder>

One render per shape (its first), 12 Euler steps, the same noise for every shape; 34 training
shapes spread over the categories against every held-out one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

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


def main() -> None:
    run_dir = Path(sys.argv[1])
    c = typed(load_config(TrainGeneratorConfig, run_dir / "config.yaml"))
    trainer = StructureTrainer(c, build_structure_data(c.data), torch.device("cpu"))
    trainer.load_state_dict(load_checkpoint(run_dir / "ckpt"))
    for model in (trainer.flow, trainer.decoder):
        model.eval()
    print("step", trainer.step)
    held_out = torch.arange(len(trainer.held_out))
    train = torch.linspace(0, len(trainer.train_set) - 1, 34).round().long()
    for cfg_strength in (1.0, 3.0, 7.5):
        a = sampled_iou(trainer, trainer.held_out, held_out, cfg_strength)
        b = sampled_iou(trainer, trainer.train_set, train, cfg_strength)
        print(f"cfg {cfg_strength}: held-out IoU mean {a.mean():.3f} median {a.median():.3f}; "
              f"training mean {b.mean():.3f} median {b.median():.3f}")
    iou = sampled_iou(trainer, trainer.held_out, held_out, 3.0)
    for i, name in enumerate(trainer.held_out.categories):
        print(f"{name} {iou[trainer.held_out.category == i].mean():.3f}")


if __name__ == "__main__":
    main()
