"""Which 2D model a run distils from, and building it.

It lives on the 3D side of the ``guidance`` boundary because the embedded prior's images are
renders of the shape world (``cfd.shapes``); ``guidance`` itself only reads the finished dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Optional

import torch

from guidance.base import Weighting
from guidance.embedded import ClosedFormPrior
from guidance.flow_matching import FlowMatchingConfig, FlowMatchingGuidance
from guidance.latent import LatentModelConfig, LatentSampling
from guidance.loading import resolve_model_path
from guidance.prompts import PromptConfig
from guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionGuidance

from ..shapes import ShapeDatasetConfig, build_shape_dataset


class GuidanceKind(Enum):
    embedded = "embedded"  # the closed-form prior over the shape world
    stable_diffusion = "stable-diffusion"  # diffusers weights from ``model_id``
    flow_matching = "flow-matching"  # an SD3-style flow model, from ``model_id``


@dataclass
class ModelChoice:
    """Which 2D model, and where its weights or data come from: what every use of a model reads
    (RelaxFlow's prior images take exactly this). ``kind``: ``embedded`` (the closed-form prior
    over the shape world, drawn from ``dataset``), ``stable-diffusion`` or ``flow-matching``
    (diffusers weights from ``model_id``: a local folder or a cached hub id; ``half_precision``
    on CUDA)."""

    kind: GuidanceKind = GuidanceKind.embedded
    model_id: Optional[str] = None
    half_precision: bool = True
    dataset: ShapeDatasetConfig = field(default_factory=ShapeDatasetConfig)


@dataclass
class GuidanceConfig(ModelChoice):
    """A model and how it guides a distillation. The options below carry the names of
    :class:`guidance.latent.LatentModelConfig`'s (``build_guidance`` hands them on by name, and a
    test keeps the two in step); unset ones keep the model's defaults."""

    guidance_scale: float = 1.0
    weighting: Weighting = Weighting.sigma_over_alpha
    resolution: Optional[int] = None
    latent_sampling: LatentSampling = LatentSampling.sample


def build_guidance(cfg: GuidanceConfig, device: torch.device, view_config: PromptConfig):
    """The 2D prior a run distils from. ``view_config``: the run's prompt settings, whose view
    thresholds the embedded prior uses to label its images, so both agree on what "side" means."""
    if GuidanceKind(cfg.kind) is GuidanceKind.embedded:
        folder = build_shape_dataset(cfg.dataset)
        return ClosedFormPrior.from_pretrained(folder, device=device,
                                               guidance_scale=cfg.guidance_scale,
                                               weighting=cfg.weighting,
                                               view_config=view_config)
    model = _model_config(cfg)
    if GuidanceKind(cfg.kind) is GuidanceKind.stable_diffusion:
        return StableDiffusionGuidance.from_config(model, device)
    return FlowMatchingGuidance.from_config(model, device)


def _model_config(cfg: GuidanceConfig) -> LatentModelConfig:
    """A diffusers prior's own config; unset (None) options keep its defaults."""
    options = {f.name: getattr(cfg, f.name) for f in fields(LatentModelConfig)
               if getattr(cfg, f.name) is not None}
    if GuidanceKind(cfg.kind) is GuidanceKind.stable_diffusion:
        return StableDiffusionConfig(**options)
    return FlowMatchingConfig(**options)


def check_guidance_model(cfg: GuidanceConfig) -> None:
    """Find a diffusers prior's folder (its ``model_index.json``) without loading it, so that
    a missing model stops a job before it runs anything (``ModelWeightsNotFound``)."""
    if GuidanceKind(cfg.kind) is not GuidanceKind.embedded:
        resolve_model_path(_model_config(cfg).model_id)
