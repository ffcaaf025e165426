"""Prior images for RelaxFlow from text, drawn from the project's own 2D models.

One image per view suffix of the prompt (front, side, back, ...), sampled with the
deterministic ODE from seeded noise (``guidance.sampling.sample_images``), then cut out:

- the embedded prior (default) knows its objects' alpha: each sample is one of its dataset
  images, whose alpha it returns. It draws only its own prompts.
- an image model (Stable Diffusion, SD3-style flow matching; weights local, as for distillation)
  is asked for the object "isolated on a plain white background", which is then keyed out:
  pixels that differ from the border's colour by more than ``key_low`` start to count as
  object, fully from ``key_high``, and background-coloured pixels that the border's background
  cannot reach (a white mug's inside) stay object.

Users with other models or prompts pass their own RGBA images (``priors=[...]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cfd.shapes import prompts
from cfd.systems.prior import GuidanceConfig, GuidanceKind, ModelChoice, build_guidance
from core.errors import UserError, as_choice
from guidance.prompts import PromptConfig
from guidance.sampling import sample_images


def guidance_config(model: ModelChoice, size: int) -> GuidanceConfig:
    """The guidance builder's settings for ``model`` drawing ``size``-pixel images (the embedded
    prior ignores ``size``: it draws at its dataset's resolution)."""
    return GuidanceConfig(**{f.name: getattr(model, f.name) for f in fields(ModelChoice)},
                          resolution=size)


@dataclass
class PriorImagesConfig:
    """How prior images are drawn when none are given."""

    n_images: int = 3
    # the model drawing them: only what sampling reads (a distillation's guidance scale,
    # weighting and latent sampling are not settings here; ``guidance_scale`` below is the
    # sampling's own)
    model: ModelChoice = field(default_factory=ModelChoice)
    # CFG of the sampling; None: 3 for the embedded prior, 7.5 for image models
    guidance_scale: Optional[float] = None
    steps: int = 40
    size: int = 512  # an image model's image size (the embedded prior draws at its own)
    suffix: str = ", a single object isolated on a plain white background"  # image models
    negative_prompt: str = ""
    key_low: float = 0.06
    key_high: float = 0.18


def key_out_background(images: Tensor, low: float = 0.06, high: float = 0.18) -> Tensor:
    """Alpha ``[B,H,W,1]`` of objects on a plain background, ``images [B,H,W,3]`` in [0,1].

    The background colour is the median of each image's border pixels; a pixel's distance to it
    (largest channel difference) maps linearly from ``low`` (alpha 0) to ``high`` (alpha 1).
    Pixels below ``low`` count as background only if they connect to the border through such
    pixels; enclosed ones are object.
    """
    B, H, W, _ = images.shape
    border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    colour = border.median(dim=1).values  # [B,3]
    distance = (images - colour[:, None, None, :]).abs().amax(-1)  # [B,H,W]
    alpha = ((distance - low) / (high - low)).clamp(0, 1)
    open_space = (distance < low).float()[:, None]
    reached = torch.zeros_like(open_space)
    reached[..., 0, :] = reached[..., -1, :] = reached[..., :, 0] = reached[..., :, -1] = 1
    reached = reached * open_space
    while True:  # flood fill from the border through background-coloured pixels
        grown = F.max_pool2d(reached, 3, stride=1, padding=1) * open_space
        if torch.equal(grown, reached):
            break
        reached = grown
    return torch.where(reached[:, 0].bool() | (distance >= low), alpha, 1.0)[..., None]


def check_prior_request(prompt: Optional[str], cfg: PriorImagesConfig,
                        key: str = "generate_priors",
                        own: str = "priors=[a.png,b.png] (images of your own)") -> None:
    """Refuse a request for prior images that cannot be drawn, before a model loads. ``key``:
    where ``cfg`` sits in the job's config; ``own``: how to give images instead, for the
    errors."""
    if not prompt:
        raise UserError(f"no prior images: give {own}, or a prompt to draw them from")
    if cfg.n_images < 1:
        raise UserError(f"{key}.n_images is {cfg.n_images}: draw at least one prior image "
                        f"({key}.n_images=3), or give {own}")
    kind = as_choice(GuidanceKind, cfg.model.kind, f"{key}.model.kind")
    if kind is GuidanceKind.embedded and prompt not in prompts():
        raise UserError(f"the embedded prior cannot draw {prompt!r} (it knows: "
                        f"{', '.join(prompts())}); give {own}, or an image model: "
                        f"{key}.model.kind=stable-diffusion {key}.model.model_id=<folder>")


def prior_images(prompt: Optional[str], seed: int, cfg: Optional[PriorImagesConfig] = None,
                 device="cpu") -> np.ndarray:
    """``[n, R, R, 4]`` uint8 RGBA views of ``prompt`` (``cfg.n_images`` of them)."""
    cfg = cfg or PriorImagesConfig()
    check_prior_request(prompt, cfg)
    embedded = GuidanceKind(cfg.model.kind) is GuidanceKind.embedded
    guidance = build_guidance(guidance_config(cfg.model, cfg.size), torch.device(device),
                              PromptConfig())
    suffixes = PromptConfig().suffixes()
    texts = [prompt + suffixes[i % len(suffixes)] + ("" if embedded else cfg.suffix)
             for i in range(cfg.n_images)]
    scale = cfg.guidance_scale if cfg.guidance_scale is not None else (3.0 if embedded else 7.5)
    images = sample_images(guidance, texts, cfg.size, cfg.size, cfg.steps, scale,
                           torch.Generator().manual_seed(seed), negative=cfg.negative_prompt)
    if embedded:
        alpha = guidance.nearest_opacity(guidance.encode(images)).permute(0, 2, 3, 1)
    else:
        alpha = key_out_background(images, cfg.key_low, cfg.key_high)
    del guidance  # the 3D models load next: give its memory back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rgba = torch.cat([images, alpha.to(images)], -1)
    return (rgba * 255).round().to(torch.uint8).cpu().numpy()
