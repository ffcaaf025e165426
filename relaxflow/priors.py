"""Prior images for RelaxFlow from text, drawn from the project's own 2D models.

The embedded prior (the closed-form denoiser over the shape world) samples one view per
direction suffix of the prompt (front, side, back, ...) with the deterministic ODE; each sample
is one of its dataset images, whose alpha removes the background. Only prompts it knows work;
users with other prompts pass their own images (``priors=[...]``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def embedded_prior_images(prompt: str, n_images: int = 3, seed: int = 0, steps: int = 40,
                          guidance_scale: float = 3.0, dataset=None) -> np.ndarray:
    """``[n, R, R, 4]`` uint8 RGBA views of ``prompt`` sampled from the embedded prior."""
    from cfd.shapes import build_shape_dataset, prompts
    from cfd.shapes.dataset import ShapeDatasetConfig
    from guidance.embedded import ClosedFormPrior
    from guidance.prompts import PromptConfig
    from guidance.sampling import sample_latents

    if prompt not in prompts():
        raise ValueError(f"the embedded prior cannot draw {prompt!r} (it knows: "
                         f"{', '.join(prompts())}); give your own prior images: "
                         "priors=[a.png,b.png]")
    prior = ClosedFormPrior.from_pretrained(build_shape_dataset(dataset or ShapeDatasetConfig()))
    suffixes = PromptConfig().suffixes()
    texts = [prompt + suffixes[i % len(suffixes)] for i in range(n_images)]
    cond, uncond = prior.encode_text(texts), prior.encode_text([""] * n_images)
    R = prior.resolution
    x = sample_latents(prior, cond, uncond, (n_images, 3, R, R), steps, guidance_scale,
                       torch.Generator().manual_seed(seed))
    rgb = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    alpha = prior.nearest_alpha(x).permute(0, 2, 3, 1)
    return (torch.cat([rgb, alpha], -1) * 255).round().to(torch.uint8).cpu().numpy()


def prior_images(prompt: Optional[str], n_images: int, seed: int) -> np.ndarray:
    """Prior images for a prompt when the user gave none (the embedded prior's)."""
    if not prompt:
        raise ValueError("no prior images: give priors=[a.png,b.png] showing what the hidden "
                         "part should be, or a prompt the embedded prior knows")
    return embedded_prior_images(prompt, n_images, seed)
