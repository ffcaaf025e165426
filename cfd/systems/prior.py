"""Which 2D model a run distils from, and building it.

It lives on the 3D side of the ``guidance`` boundary because the embedded prior's images are
renders of the shape world (``cfd.shapes``); ``guidance`` itself only reads the finished dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from guidance.latent import LatentModelConfig
from guidance.prompts import PromptConfig

from ..shapes import ShapeDatasetConfig, build_shape_dataset


@dataclass
class GuidanceConfig:
    """``kind``: ``embedded`` (the closed-form prior over the shape world), ``stable-diffusion``
    or ``flow-matching`` (diffusers weights from ``model_id``: a local folder or a cached hub id)."""

    kind: str = "embedded"
    model_id: Optional[str] = None
    guidance_scale: float = 1.0
    weighting: str = "sigma_over_alpha"
    half_precision: bool = True
    resolution: Optional[int] = None
    latent_sampling: str = "sample"
    dataset: ShapeDatasetConfig = field(default_factory=ShapeDatasetConfig)


def build_guidance(cfg: GuidanceConfig, device: torch.device, view_config: PromptConfig):
    """The 2D prior a run distils from. ``view_config``: the run's prompt settings, whose view
    thresholds the embedded prior uses to label its images, so both agree on what "side" means."""
    if cfg.kind == "embedded":
        from guidance.embedded import ClosedFormPrior

        folder = build_shape_dataset(cfg.dataset)
        return ClosedFormPrior.from_pretrained(folder, device=device,
                                               guidance_scale=cfg.guidance_scale,
                                               weighting=cfg.weighting,
                                               view_config=view_config)
    # unset (None) options keep the model config's defaults
    options = {f.name: getattr(cfg, f.name) for f in fields(LatentModelConfig)
               if getattr(cfg, f.name) is not None}
    if cfg.kind == "stable-diffusion":
        from guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionGuidance

        return StableDiffusionGuidance.from_config(StableDiffusionConfig(**options), device)
    if cfg.kind == "flow-matching":
        from guidance.flow_matching import FlowMatchingConfig, FlowMatchingGuidance

        return FlowMatchingGuidance.from_config(FlowMatchingConfig(**options), device)
    raise ValueError(f"unknown guidance kind {cfg.kind!r}; use 'embedded', 'stable-diffusion' "
                     "or 'flow-matching'")
