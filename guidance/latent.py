"""What every VAE-latent diffusers prior shares: its options, the render -> latent path, frozen
modules and the text-embedding cache key. ``guidance.stable_diffusion`` (UNet) and
``guidance.flow_matching`` (SD3 transformer) add the denoiser and the text encoding.

Renders ``[B,H,W,3]`` in [0,1] go to [-1,1], are resized (bilinear, differentiable) to the
model's square resolution and encoded by the VAE; the latents are
``(z - shift_factor) * scaling_factor``. All networks are frozen and in eval mode; gradients
flow from the latents through the VAE encoder back to the renders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from enum import Enum
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from core.devices import model_dtype
from core.errors import UserError

from .base import Guidance, Weighting
from .fingerprint import module_digest, tokenizer_digest

logger = logging.getLogger(__name__)

class LatentSampling(Enum):
    sample = "sample"  # a draw from the VAE posterior
    mean = "mean"  # its mean (deterministic)
# Bumped whenever the way text becomes a condition changes, so old caches are not reused.
TEXT_ENCODING_VERSION = "1"


@dataclass
class LatentModelConfig:
    """Options of every latent prior; each model's config sets ``model_id``, ``guidance_scale``
    and ``resolution`` defaults for its model."""

    # A local pipeline folder, or a hub id already in the Hugging Face cache.
    model_id: str
    guidance_scale: float
    # Renders are resized to this square size before the VAE; None or 0 keeps their size.
    resolution: Optional[int]
    weighting: Weighting = Weighting.sigma_over_alpha
    half_precision: bool = True
    # "sample" draws from the VAE posterior, "mean" takes its mean (deterministic).
    latent_sampling: LatentSampling = LatentSampling.sample


def config_from_kwargs(config_cls, model_id, overrides: dict):
    """``config_cls(**overrides)`` with ``model_id`` (when given) and a clear error for unknown
    option names."""
    known = {f.name for f in fields(config_cls)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} option(s) {sorted(unknown)}; "
                        f"expected some of {sorted(known)}")
    if model_id is not None:
        overrides = {**overrides, "model_id": str(model_id)}
    return config_cls(**overrides)


def fp32_module_names(module: torch.nn.Module, dtype: torch.dtype) -> Tuple[str, ...]:
    """Names of the submodules that ``module``'s library keeps in float32 when the rest of it is
    in ``dtype``: transformers' and diffusers' ``_keep_in_fp32_modules`` for float16 (T5's
    ``wo`` layers, whose outputs overflow float16), and transformers'
    ``_keep_in_fp32_modules_strict`` for float16 and bfloat16."""
    names = []
    if dtype == torch.float16:
        names += list(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(dict.fromkeys(names))


def _kept(name: str, keep: Sequence[str]) -> bool:
    """Whether the tensor ``name`` (dotted) lies in one of the ``keep`` submodules (each a dotted
    name matched as whole components, as transformers matches them)."""
    dotted = f".{name}."
    return any(f".{k}." in dotted for k in keep)


def _target_dtypes(module: torch.nn.Module, dtype: torch.dtype):
    """``(owner module, "_parameters" or "_buffers", attribute name, tensor, target dtype)`` for
    each floating parameter and buffer."""
    keep = fp32_module_names(module, dtype)
    for name, sub in module.named_modules():
        for kind in ("_parameters", "_buffers"):
            for attr, tensor in getattr(sub, kind).items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                full = f"{name}.{attr}" if name else attr
                yield sub, kind, attr, tensor, torch.float32 if _kept(full, keep) else dtype


def freeze(module: Optional[torch.nn.Module], device, dtype) -> Optional[torch.nn.Module]:
    """The module on ``device`` in ``dtype``, in eval mode, with no parameter requiring grad.

    Submodules the model's library keeps in float32 (:func:`fp32_module_names`, e.g. T5's ``wo``
    in float16) stay in (or go back to) float32, as ``from_pretrained(torch_dtype=...)`` leaves
    them; the models' forwards cast their inputs to those layers' dtype."""
    if module is None:
        return None
    targets = list(_target_dtypes(module, dtype))
    # Cast only when a parameter needs it (diffusers warns about any .to(dtype) on loaded
    # models); buffers computed at construction (positional tables) are left as loaded.
    if any(t.dtype != want for _, kind, _, t, want in targets if kind == "_parameters"):
        if all(want == dtype for *_, want in targets):
            module.to(dtype=dtype)
        else:
            for sub, kind, attr, tensor, want in targets:
                if tensor.dtype != want:
                    if kind == "_parameters":
                        tensor.data = tensor.data.to(want)
                    else:
                        sub._buffers[attr] = tensor.to(want)
    module.to(device=device)
    module.eval()
    module.requires_grad_(False)
    return module


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` with the tokenizer's special tokens (CLIP's BOS/EOS, T5's EOS)."""
    return len(tokenizer(text, truncation=False, verbose=False).input_ids)


def warn_truncated(tokenizer, texts: Sequence[str], limit: int, what: str) -> None:
    """Log one warning per text whose token count (with BOS/EOS) exceeds ``limit``."""
    for text in texts:
        n = token_count(tokenizer, text)
        if n > limit:
            logger.warning("prompt %r is %d tokens long and is truncated to %d tokens, the "
                           "limit of %s", text, n, limit, what)


# (what, tokenizer, limit): one text encoder's token window.
TextWindow = Tuple[str, object, int]


class LatentDiffusersGuidance(Guidance):
    """Shared parts of the VAE-latent diffusers priors (subclasses add the denoiser and text)."""

    def __init__(self, vae, cfg: LatentModelConfig, device, dtype: Optional[torch.dtype] = None):
        super().__init__(cfg.guidance_scale, cfg.weighting)
        self.sample_posterior = LatentSampling(cfg.latent_sampling) is LatentSampling.sample
        if cfg.resolution is not None and cfg.resolution < 0:
            raise UserError(f"resolution must be positive, 0 or None, got {cfg.resolution}")
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
        z = posterior.sample() if self.sample_posterior else posterior.mode()
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

    def _tokenizers(self) -> Dict[str, object]:
        raise NotImplementedError

    def _text_settings(self) -> str:
        return ""

    def text_windows(self) -> List[TextWindow]:
        """``(what, tokenizer, limit)`` for each text encoder: its tokenizer cuts a text after
        ``limit`` tokens (with its special tokens). The prompt processor trims long prompts so
        that the view suffix stays inside every window
        (:func:`guidance.prompts.fit_view_prompt`)."""
        raise NotImplementedError

    def warn_truncated(self, texts: Sequence[str]) -> None:
        """One warning for each text and window that cuts it."""
        for what, tokenizer, limit in self.text_windows():
            warn_truncated(tokenizer, texts, limit, what)

    def text_fingerprint(self) -> str:
        """Model id, encoding settings, and exact digests of every text encoder's weights and
        every tokenizer's vocabulary: a changed one re-encodes the prompts."""
        if self._fingerprint is None:
            parts = [self.model_id, type(self).__name__, TEXT_ENCODING_VERSION, str(self.dtype),
                     self._text_settings()]
            parts += [f"{name}={module_digest(m)}" for name, m in self._text_encoders().items()]
            parts += [f"{name}={tokenizer_digest(t)}" for name, t in self._tokenizers().items()]
            self._fingerprint = "|".join(parts)
        return self._fingerprint
