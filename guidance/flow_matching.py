"""Stable Diffusion 3 style rectified-flow transformers as a guidance model (offline, diffusers).

The network (``SD3Transformer2DModel``) predicts the velocity ``u = eps - x_0`` of
``x_t = (1 - s) x_0 + s eps`` with the scheduler's shifted noise level ``s``
(:class:`FlowMatchingSchedule` with ``FlowMatchEulerDiscreteScheduler``'s ``shift``); its
timestep input is ``1000 s``. Latents are ``(z - shift_factor) * scaling_factor`` of the VAE
posterior. Text goes through the pipeline's own ``encode_prompt`` (two CLIP encoders and, when
present, T5), giving per-token states and pooled projections. Rendering to latents, frozen
modules and the text fingerprint are :class:`guidance.latent.LatentDiffusersGuidance`'s.

The distillation gradient ``w (eps - noise)`` is computed as ``w a (x_0 + u - noise)``: with
``eps = x_t + a u`` (``guidance.parameterization``) and ``x_t = a x_0 + s noise``,
``eps - noise = a (x_0 + u - noise)`` exactly, so for ``w = s / a`` it is ``s (x_0 + u - noise)``.
The first form subtracts two nearly equal numbers near ``t = 1`` (``x_t`` and the noise) and
multiplies the float32 rounding of that difference by ``s / a`` (147 at ``t = 0.98`` with SD3's
shift 3, 597 at 0.995); the second has no cancellation (see :meth:`FlowMatchingGuidance.latent_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor

from core.devices import model_dtype

from .base import Condition, concat
from .latent import LatentDiffusersGuidance, LatentModelConfig, config_from_kwargs, freeze
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
    # Token length of the T5 branch (zeros when the pipeline has no T5 encoder). 77, not the
    # 256 of diffusers' StableDiffusion3Pipeline, on purpose: view prompts are trimmed to fit
    # the CLIP encoders' 77 tokens anyway (so the view suffix survives), so a longer T5 window
    # would only add padding tokens, which SD3 attends to (no mask); and every transformer call
    # carries 77 + max_sequence_length text tokens next to the image tokens, 154 against 333:
    # at 512 px (1024 image tokens) 256 makes each call's sequence 15% longer (joint attention
    # about 33% dearer), at 1024 px (4096) 4% (attention 9%). Set 256 to reproduce diffusers'
    # sampling conditions exactly, e.g. for long negative prompts that T5 should read in full.
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

    def text_windows(self):
        pipe = self.pipe
        windows = [("the CLIP text encoders", pipe.tokenizer, pipe.tokenizer_max_length)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            windows.append(("the T5 text encoder (max_sequence_length)", pipe.tokenizer_3,
                            self.cfg.max_sequence_length))
        return windows

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Condition:
        texts = list(texts)
        pipe = self.pipe
        self.warn_truncated(texts)
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

    # -- distillation -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_velocity(self, x_t: Tensor, t: Union[float, Tensor], cond: Condition,
                         uncond: Condition, guidance_scale: Optional[float] = None) -> Tensor:
        """Classifier-free-guided velocity ``u = eps - x_0`` (``predict_eps`` is ``x_t + a u``
        of it, CFG being linear): cond and uncond in one batch, ``x_t [B,C,h,w]``, ``t`` scalar
        or ``[B]`` in [0, 1] -> ``[B,C,h,w]``."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        t = self._batch_t(t, x_t.shape[0], x_t.device)
        if scale == 1.0:
            return self.model_output(x_t, t, cond)
        if scale == 0.0:
            return self.model_output(x_t, t, uncond)
        u_c, u_u = self.model_output(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     concat([cond, uncond])).chunk(2)
        return u_u + scale * (u_c - u_u)

    def latent_gradient(self, latents: Tensor, noise: Tensor, t: Tensor, cond: Condition,
                        uncond: Condition, guidance_scale: Optional[float]) -> Tensor:
        """``w a (x_0 + u - noise)``, the algebraically equal form of ``w (eps - noise)``
        without its cancellation near ``t = 1`` (module docstring); ``w a`` (``s`` for
        ``sigma_over_alpha``) is taken in float64. The two agree to float32 rounding, and this
        one is the more accurate: against a float64 evaluation on the tiny test model (shift 3)
        the relative error is 5e-8 here against 2e-5 at t = 0.98 and 9e-5 at t = 0.995
        (tests/test_guidance_diffusers.py)."""
        x_t = self.schedule.add_noise(latents, noise, t)
        u = self.predict_velocity(x_t, t, cond, uncond, guidance_scale)
        coef = self.weight(t) * self.schedule.alpha(t)  # float64: s / a * a = s
        coef = coef.to(latents.dtype).reshape((-1,) + (1,) * (latents.ndim - 1))
        return coef * (latents + u - noise)
