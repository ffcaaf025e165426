"""Stable Diffusion 3 style rectified-flow transformers as a guidance model (offline, diffusers).

The network (``SD3Transformer2DModel``) predicts the velocity ``u = eps - x_0`` of
``x_t = (1 - s) x_0 + s eps`` with the scheduler's shifted noise level ``s``
(:class:`FlowMatchingSchedule` with ``FlowMatchEulerDiscreteScheduler``'s ``shift``); its
timestep input is ``1000 s``. Latents are ``(z - shift_factor) * scaling_factor`` of the VAE
posterior. Text goes through the pipeline's own ``encode_prompt`` (two CLIP encoders and, when
present, T5), giving per-token states and pooled projections. Rendering to latents, frozen
modules and the text fingerprint are :class:`guidance.latent.LatentDiffusersGuidance`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from core.devices import model_dtype

from .base import Condition
from .latent import (LatentDiffusersGuidance, LatentModelConfig, config_from_kwargs, freeze,
                     warn_truncated)
from .loading import load_pipeline
from .schedules import FlowMatchingSchedule

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class FlowMatchingConfig(LatentModelConfig):
    """Options of :class:`FlowMatchingGuidance`: SD3 defaults, plus the T5 branch."""

    model_id: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    guidance_scale: float = 7.0
    resolution: Optional[int] = 1024
    # Token length of the T5 branch (zeros when the pipeline has no T5 encoder).
    max_sequence_length: int = 77
    # False skips loading the (large) T5 encoder; SD3 then sees zeros in its place.
    use_t5: bool = True


class FlowMatchingGuidance(LatentDiffusersGuidance):
    """SD3-style flow-matching transformer prior (prediction type ``flow``)."""

    prediction_type = "flow"

    def __init__(self, pipe, cfg: Optional[FlowMatchingConfig] = None, device="cpu",
                 dtype: Optional[torch.dtype] = None):
        cfg = cfg or FlowMatchingConfig()
        super().__init__(pipe.vae, cfg, device, dtype)
        self.pipe = pipe
        self.transformer = freeze(pipe.transformer, self.device, self.dtype)
        for name in TEXT_ENCODERS:
            freeze(getattr(pipe, name, None), self.device, self.dtype)
        self.scheduler = pipe.scheduler
        if getattr(self.scheduler.config, "use_dynamic_shifting", False):
            raise ValueError(f"{self.model_id!r} uses resolution-dependent (dynamic) shifting, "
                             "which FlowMatchingGuidance does not model")
        self.schedule = FlowMatchingSchedule(
            shift=self.scheduler.config.shift,
            num_train_timesteps=self.scheduler.config.num_train_timesteps)

    @classmethod
    def from_config(cls, cfg: FlowMatchingConfig, device="cpu") -> "FlowMatchingGuidance":
        """Load ``cfg.model_id`` (local folder or cached hub id) without network access."""
        from diffusers import StableDiffusion3Pipeline

        dtype = model_dtype(device, cfg.half_precision)
        extra = {} if cfg.use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = load_pipeline(StableDiffusion3Pipeline, cfg.model_id, dtype=dtype, **extra)
        return cls(pipe, cfg=cfg, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, model_id_or_path=None, device="cpu", **config
                        ) -> "FlowMatchingGuidance":
        """``from_pretrained("folder-or-hub-id", device="cuda", guidance_scale=7.0, ...)``."""
        return cls.from_config(config_from_kwargs(FlowMatchingConfig, model_id_or_path, config),
                               device)

    # -- text ---------------------------------------------------------------------------------
    def _text_encoders(self):
        return {name: getattr(self.pipe, name, None) for name in TEXT_ENCODERS}

    def _tokenizers(self):
        return {name: getattr(self.pipe, name, None) for name in TOKENIZERS}

    def _text_settings(self) -> str:
        return f"max_sequence_length={self.cfg.max_sequence_length}"

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Condition:
        texts = list(texts)
        pipe = self.pipe
        warn_truncated(pipe.tokenizer, texts, pipe.tokenizer_max_length, "the CLIP text encoders")
        if getattr(pipe, "text_encoder_3", None) is not None:
            warn_truncated(pipe.tokenizer_3, texts, self.cfg.max_sequence_length,
                           "the T5 text encoder (max_sequence_length)")
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    # -- denoiser -----------------------------------------------------------------------------
    def model_output(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        timestep = self.schedule.model_time(t).to(device=self.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=x_t.to(self.device, self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.device, self.dtype),
            pooled_projections=cond["pooled_projections"].to(self.device, self.dtype),
            return_dict=True,
        ).sample
        return out.float()
