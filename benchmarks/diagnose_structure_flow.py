"""Stage 1's flow, diagnosed from a training run's checkpoint: IoU of structures sampled from
renders of held-out and of training shapes (equal scores: the flow underfits; training far
above held-out: it overfits), at three CFG scales, and per category; with the flow's parameter
average when the run keeps one (``flow.ema_decay``).

    python benchmarks/diagnose_structure_flow.py <train-generator run folder> [--probe | --reading]

One render per shape (its first), 12 Euler steps, the same noise for every shape; 34 training
shapes spread over the categories against every held-out one. Per category, next to the flow's
IoU: the VAE's reconstruction IoU of the same shapes, the most the flow can reach.

``--probe`` asks instead whether the condition can tell the categories apart at all: a linear
classifier of the category, fitted on the training renders' features (every view) and scored on
the held-out renders, for the run's conditioner (its tokens averaged, its class token, all its
tokens side by side), the
same architecture untrained, and the render's pixels at 32 px. If the trained conditioner's
held-out accuracy is low, the flow cannot be told which category to draw.

``--reading`` asks where a sample's shape is lost, on 68 training shapes (their first render):
the IoU of their latents decoded with noise added (what an error in the latent costs), of the
flow's one-step estimate of the latent, ``x_0 = x_t - t v``, from the true latent noised to
``t`` (near 0 the latent says it all, at ``t = 1`` only the image does), and how much of the
latent a ridge regression reads linearly from the image (fitted on every training shape's first
render, scored on training and held-out shapes: R^2 and the decoded estimate's IoU), from the
conditioner's tokens side by side, from the render's pixels at 32 px and from the image the
conditioner is given (the render cut by the run's ``image_framing``) at 32 px.
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
from relaxflow.conditioning import preprocess_image  # noqa: E402
from relaxflow.sampler import FlowEulerSampler  # noqa: E402
from relaxflow.stages import guided, sample_structure  # noqa: E402
from relaxflow.training.data import ShapeSet, build_structure_data  # noqa: E402
from relaxflow.training.structure import (StructureTrainer, condition_embeddings,  # noqa: E402
                                          noisy_latent, occupancy_iou)


@torch.no_grad()
def sampled_iou(trainer: StructureTrainer, shapes: ShapeSet, index: torch.Tensor,
                cfg_strength: float) -> torch.Tensor:
    """IoU ``[len(index)]`` of structures sampled from each shape's first render."""
    tokens = trainer.conditioner.encode(condition_embeddings(
        trainer.conditioner, shapes.rgba[index, 0], trainer.s.image_framing))
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


def pixels(rgba: Tensor) -> Tensor:
    """Renders ``[M, H, W, 4]`` uint8 -> their RGBA at 32 px, side by side ``[M, 4096]``."""
    image = rgba.permute(0, 3, 1, 2).float() / 255
    return torch.nn.functional.interpolate(image, size=32, mode="area").flatten(1)


def cut_pixels(rgba: Tensor, framing: str) -> Tensor:
    """Renders ``[M, H, W, 4]`` uint8 -> the image the conditioner is given (cut by
    ``framing``, premultiplied), at 32 px side by side ``[M, 3072]``."""
    images = torch.stack([preprocess_image(image.numpy(), size=128, framing=framing)
                          for image in rgba])
    return torch.nn.functional.interpolate(images, size=32, mode="area").flatten(1)


@torch.no_grad()
def condition_features(conditioner, rgba: Tensor, framing: str) -> Dict[str, Tensor]:
    """Per render ``[M, H, W, 4]``, cut by ``framing``: the conditioner's tokens averaged, its
    class token, and every token side by side (what the flow's cross-attention can read)."""
    tokens = conditioner.encode(condition_embeddings(conditioner, rgba, framing))
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
    framing = trainer.s.image_framing
    for name, conditioner in (("trained", trainer.conditioner), ("untrained", untrained)):
        a = condition_features(conditioner, train_rgba, framing)
        b = condition_features(conditioner, held_rgba, framing)
        for kind in a:
            accuracy = linear_probe(a[kind], train_y, b[kind], held_y, classes)
            print(f"{name} conditioner, {kind}: held-out accuracy {accuracy:.3f}")

    accuracy = linear_probe(pixels(train_rgba), train_y, pixels(held_rgba), held_y, classes)
    print(f"pixels at 32 px: held-out accuracy {accuracy:.3f}")


READING_TIMES = (0.5, 0.8, 0.9, 0.95, 1.0)
RIDGE = 100.0  # of the standardised features; 1 overfits (held-out R^2 < 0), 1000 underfits


def ridge_fit(x: Tensor, y: Tensor, strength: float) -> Tensor:
    """Weights ``[D + 1, K]`` of ``y [N, K] ~ [x, 1] W`` with an L2 penalty ``strength`` (the
    dual form, ``N x N``, when features outnumber rows)."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    if x.shape[1] > x.shape[0]:
        return x.T @ torch.linalg.solve(x @ x.T + strength * torch.eye(len(x)), y)
    return torch.linalg.solve(x.T @ x + strength * torch.eye(x.shape[1]), x.T @ y)


def r_squared(prediction: Tensor, target: Tensor) -> float:
    """``1 - SSE / SST`` over every value of ``[N, K]``."""
    return float(1 - (prediction - target).square().sum()
                 / (target - target.mean(0)).square().sum())


@torch.no_grad()
def reading(trainer: StructureTrainer) -> None:
    """The ``--reading`` tables (module docstring)."""
    train, held = trainer.train_set, trainer.held_out
    index = torch.linspace(0, len(train) - 1, 68).round().long()
    truth = train.occupancy[index]
    latents = trainer.prepare_flow_data().latents  # [N, C, r, r, r], every training shape

    def decoded_iou(latent: Tensor, grids: Tensor) -> float:
        return float(occupancy_iou(trainer.decoder(latent)[:, 0] > 0, grids).mean())

    x0 = latents[index]
    generator = torch.Generator().manual_seed(0)
    for scale in (0.0, 0.25, 0.5):  # how much a wrong latent costs once decoded
        noise = torch.randn(x0.shape, generator=generator)
        print(f"the latent plus noise of {scale} its scale, decoded: IoU "
              f"{decoded_iou(x0 + scale * noise, truth):.3f}")
    framing = trainer.s.image_framing
    tokens = trainer.conditioner.encode(condition_embeddings(trainer.conditioner,
                                                             train.rgba[index, 0], framing))
    with trainer.averaged():
        for t in READING_TIMES:
            noise = torch.randn(x0.shape, generator=generator)
            times = torch.full((len(index),), t)
            x_t, _ = noisy_latent(x0, noise, times, trainer.s.flow.sigma_min)
            estimate = x_t - t * trainer.flow(x_t, 1000 * times, tokens)
            print(f"one-step estimate from t = {t}: IoU {decoded_iou(estimate, truth):.3f}")

    def all_tokens(rgba: Tensor) -> Tensor:  # in slices: every training render at once is GBs
        return torch.cat([condition_features(trainer.conditioner, rgba[start:start + 256],
                                             framing)["all tokens"]
                          for start in range(0, len(rgba), 256)])

    held_latents = trainer.encoder(held.occupancy[:, None].float())
    for name, features in (("tokens side by side", all_tokens), ("pixels at 32 px", pixels),
                           (f"the conditioner's image ({framing}) at 32 px",
                            lambda rgba: cut_pixels(rgba, framing))):
        a, b = features(train.rgba[:, 0]), features(held.rgba[:, 0])
        mean, std = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mean) / std, (b - mean) / std
        weights = ridge_fit(a, latents.flatten(1), RIDGE)
        fit = torch.cat([a, torch.ones(len(a), 1)], 1) @ weights
        guess = torch.cat([b, torch.ones(len(b), 1)], 1) @ weights
        print(f"ridge from {name}: R^2 training {r_squared(fit, latents.flatten(1)):.3f} "
              f"held-out {r_squared(guess, held_latents.flatten(1)):.3f}; IoU training "
              f"{decoded_iou(fit[index].view_as(x0), truth):.3f} held-out "
              f"{decoded_iou(guess.view_as(held_latents), held.occupancy):.3f}")


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
    if "--reading" in sys.argv[2:]:
        reading(trainer)
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
