"""The guidance interface: rendered images + prompt + timestep + noise -> distillation gradient.

A guidance model works in a latent space (``latent_shape``), maps images into it (``encode``,
differentiable), defines a noise schedule ``x_t = alpha(t) x + sigma(t) eps`` on continuous
``t`` in [0, 1], and predicts the noise with classifier-free guidance (``predict_eps``).
``predict_eps`` takes the closed interval (for samplers), except ``t = 0`` for a model that
predicts the clean sample: with no noise in ``x_t`` there is none to infer (``eps = (x_t - a x0)
/ sigma`` is 0/0; ``model_output`` still gives the clean sample there). The distillation loss
takes only ``0 < t < 1``.

Conditions are dicts of tensors with a leading batch dimension (whatever the model's text encoder
produces: CLIP hidden states, SD3's pooled embeddings, the embedded prior's prompt ids), so the
prompt processor can cache, select per view and concatenate them without knowing the model.

CFG convention: ``eps = eps_uncond + s (eps_cond - eps_uncond)``; ``s = 1`` is the conditional
model, ``s = 0`` the unconditional one.

Loss contract (as threestudio): ``guidance(rgb, views, prompt, t, noise)`` returns a dict whose
``loss_*`` entries are surrogate losses: ``loss_sds = 0.5 * sum((z - sg(z - g))^2)`` with
``g = w(t) (eps_cfg - noise)``, so its gradient with respect to the latents ``z`` is exactly
``g`` and autograd carries it through ``encode`` into the scene. Other entries are for logging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .parameterization import eps_from_prediction
from .schedules import NoiseSchedule

Condition = Dict[str, Tensor]
class Weighting(Enum):
    """``w(t)`` of the distillation gradient (:meth:`Guidance.weight`)."""

    sigma_over_alpha = "sigma_over_alpha"  # CFD's official choice
    uniform = "uniform"
    sds = "sds"  # sigma^2, DreamFusion's



def select(cond: Condition, index: Tensor) -> Condition:
    return {k: v[index] for k, v in cond.items()}


def concat(conds: List[Condition]) -> Condition:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class Guidance(ABC):
    """Base class of every 2D prior. Subclasses set ``schedule``, ``prediction_type``, ``model_id``."""

    schedule: NoiseSchedule
    prediction_type: str
    model_id: str
    device: torch.device

    def __init__(self, guidance_scale: float = 7.5,
                 weighting: Union[Weighting, str] = Weighting.sigma_over_alpha):
        self.guidance_scale = float(guidance_scale)
        self.weighting = Weighting(weighting)

    # -- what subclasses provide -----------------------------------------------------------
    @abstractmethod
    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """``(C, h, w)`` of the latent for ``height x width`` renders."""

    @abstractmethod
    def encode(self, rgb: Tensor) -> Tensor:
        """``[B,H,W,3]`` in [0,1] -> latents ``[B,C,h,w]`` (differentiable)."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B,C,h,w]`` -> images ``[B,H,W,3]`` in [0,1] (what ``encode`` inverts)."""

    @abstractmethod
    def encode_text(self, texts: List[str]) -> Condition:
        """Condition tensors for each text, leading dimension ``len(texts)``."""

    @abstractmethod
    def text_fingerprint(self) -> str:
        """Identifies the text encoder (model id plus weights): the embedding-cache key."""

    @abstractmethod
    def model_output(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """Raw network prediction (of ``prediction_type``) for ``x_t [B,C,h,w]``, ``t [B]``."""

    # -- shared machinery -------------------------------------------------------------------
    def _coefficients(self, t: Tensor, like: Tensor) -> Tuple[Tensor, Tensor]:
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = self.schedule.alpha(t).to(like.dtype).reshape(shape)
        s = self.schedule.sigma(t).to(like.dtype).reshape(shape)
        return a, s

    def _batch_t(self, t: Union[float, Tensor], batch: int, device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,) or not ((t >= 0) & (t <= 1)).all():
            raise ValueError(f"t must be a scalar or [B]={batch} values in [0, 1], got {t}")
        return t

    def weight(self, t: Tensor) -> Tensor:
        """``w(t)``: ``sigma/alpha`` (CFD's official choice), ``1``, or ``sigma^2`` (DreamFusion)."""
        if self.weighting is Weighting.uniform:
            return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        return s / a if self.weighting is Weighting.sigma_over_alpha else s * s

    @torch.no_grad()
    def predict_eps(self, x_t: Tensor, t: Union[float, Tensor], cond: Condition,
                    uncond: Condition, guidance_scale: Optional[float] = None) -> Tensor:
        """Classifier-free-guided noise estimate; cond and uncond are evaluated in one batch.
        ``x_t [B,C,h,w]``, ``t`` scalar or ``[B]`` in [0, 1] (not 0 for a sample-predicting
        model) -> ``[B,C,h,w]``."""
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        B = x_t.shape[0]
        t = self._batch_t(t, B, x_t.device)
        if self.prediction_type == "sample" and (t == 0).any():
            raise ValueError("the noise is undefined at t = 0 for a model that predicts the "
                             "clean sample (sigma = 0: eps = (x_t - a x0) / sigma is 0/0); call "
                             "model_output for the clean sample there, or keep t > 0")
        if scale == 1.0:
            x_in, t_in, c_in = x_t, t, cond
        elif scale == 0.0:
            x_in, t_in, c_in = x_t, t, uncond
        else:
            x_in, t_in, c_in = torch.cat([x_t, x_t]), torch.cat([t, t]), concat([cond, uncond])
        a, s = self._coefficients(t_in, x_in)
        eps = eps_from_prediction(self.model_output(x_in, t_in, c_in), x_in, a, s,
                                  self.prediction_type)
        if scale in (0.0, 1.0):
            return eps
        eps_c, eps_u = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    def conditions(self, prompt, views, background: Optional[Tensor] = None
                   ) -> Tuple[Condition, Condition]:
        """Conditional and unconditional inputs for views (see ``__call__`` for the arguments)."""
        cond, uncond = prompt(views.elevation, views.azimuth)
        if background is not None:
            cond, uncond = ({**c, "background": background} for c in (cond, uncond))
        return cond, uncond

    def __call__(self, rgb: Tensor, views, prompt, t: Union[float, Tensor], noise: Tensor,
                 guidance_scale: Optional[float] = None,
                 background: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Distillation loss for rendered views.

        Args:
            rgb: renders ``[B,H,W,3]`` in [0,1], differentiable.
            views: anything with ``elevation`` and ``azimuth`` ``[B]`` tensors (degrees).
            prompt: a :class:`guidance.prompts.PromptProcessor` for this model.
            t: scalar or ``[B]`` strictly inside (0, 1); noise: ``[B, *latent_shape]``.
            background: ``[B,3]`` colour each render was composited on, handed to the model as
                ``cond["background"]``: the embedded prior re-composites its images on it;
                image models, which see the background in the pixels, ignore it.
        """
        if rgb.shape[0] < 1:
            raise ValueError(f"guidance needs at least one rendered view, got an empty batch "
                             f"(rgb {tuple(rgb.shape)}); render B >= 1 cameras")
        latents = self.encode(rgb)
        if noise.shape != latents.shape:
            raise ValueError(f"noise must match the latents {tuple(latents.shape)}, "
                             f"got {tuple(noise.shape)}")
        B = latents.shape[0]
        t = self._batch_t(t, B, latents.device)
        if not ((t > 0) & (t < 1)).all():
            # At t = 0 there is no noise to predict (a sample-predicting prior divides by
            # sigma = 0); at t = 1 no signal is left (sigma/alpha is infinite, and the gradient
            # of the latents vanishes).
            raise ValueError(f"distillation needs every t strictly between 0 and 1, got "
                             f"{t.tolist()}; keep the timestep schedule inside (0, 1), "
                             "e.g. [0.02, 0.98]")
        cond, uncond = self.conditions(prompt, views, background)
        with torch.no_grad():
            # Not sanitised: a non-finite gradient reaches the caller, which skips the step.
            grad = self.latent_gradient(latents.detach(), noise, t, cond, uncond, guidance_scale)
            target = latents.detach() - grad
        loss = 0.5 * ((latents - target) ** 2).sum()
        return {
            "loss_sds": loss,
            "grad_norm": grad.norm(),
            "t": t.float().mean(),
            "guidance_scale": torch.tensor(
                self.guidance_scale if guidance_scale is None else guidance_scale),
        }

    def latent_gradient(self, latents: Tensor, noise: Tensor, t: Tensor, cond: Condition,
                        uncond: Condition, guidance_scale: Optional[float]) -> Tensor:
        """The distillation gradient on ``latents [B, ...]`` at ``t [B]``:
        ``w(t) (eps_cfg - noise)``. A model whose output makes another equal form better
        conditioned overrides this."""
        x_t = self.schedule.add_noise(latents, noise, t)
        eps = self.predict_eps(x_t, t, cond, uncond, guidance_scale)
        w = self.weight(t).to(latents.dtype).reshape((-1,) + (1,) * (latents.ndim - 1))
        return w * (eps - noise)
