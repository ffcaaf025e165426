"""Sampling images from a guidance model: the deterministic DDIM / probability-flow ODE.

``x_{t'} = a' x0_hat + s' eps_hat`` with ``x0_hat`` from ``eps_hat``
(:func:`guidance.parameterization.x0_from_eps`) on a uniform grid from ``t_max`` to 0,
classifier-free guided. ``sample_latents`` returns the model's latents
(pixel-space models: images in [-1, 1]); ``sample_images`` decodes them with the model's
``decode`` (a latent model's VAE).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import Condition, Guidance
from .parameterization import x0_from_eps


@torch.no_grad()
def sample_latents(guidance: Guidance, cond: Condition, uncond: Condition,
                   shape: Tuple[int, ...], steps: int = 50, guidance_scale: Optional[float] = None,
                   generator: Optional[torch.Generator] = None, t_max: float = 0.999,
                   progress: bool = False) -> Tensor:
    """``shape = (B, C, h, w)`` latents for the ``B`` conditions, from seeded noise."""
    x = torch.randn(shape, generator=generator).to(guidance.device)
    times = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    for i in tqdm(range(steps), desc="sampling", disable=not progress):
        t, t_next = times[i], times[i + 1]
        eps = guidance.predict_eps(x, t, cond, uncond, guidance_scale)
        a, s = (float(f(t)) for f in (guidance.schedule.alpha, guidance.schedule.sigma))
        a_next, s_next = (float(f(t_next)) for f in (guidance.schedule.alpha,
                                                      guidance.schedule.sigma))
        x = a_next * x0_from_eps(eps, x, a, s) + s_next * eps
    return x


@torch.no_grad()
def sample_images(guidance: Guidance, texts: List[str], height: int, width: int,
                  steps: int = 50, guidance_scale: Optional[float] = None,
                  generator: Optional[torch.Generator] = None, negative: str = "",
                  progress: bool = False) -> Tensor:
    """Images ``[B,H,W,3]`` in [0,1] of ``texts`` (one each) from any guidance model:
    deterministic DDIM from seeded noise, CFG against ``negative``, decoded by the model."""
    cond = guidance.encode_text(list(texts))
    uncond = guidance.encode_text([negative] * len(texts))
    shape = (len(texts), *guidance.latent_shape(height, width))
    return guidance.decode(sample_latents(guidance, cond, uncond, shape, steps, guidance_scale,
                                          generator, progress=progress))
