"""The distillation system: CFD (consistent noise, annealed t) and SDS (fresh noise) in one engine.

Each step: sample cameras -> render -> noise from the render's surface -> guidance loss ->
backward -> scene upkeep -> optimiser step -> noise refresh, with a state that lets a killed run
continue bit for bit (on CPU). The scene (splats or a NeRF, ``cfd.systems.scenes``) owns its
optimisers and upkeep, so nothing here depends on its kind. The ``distill`` job
(``jobs/distill.py``) drives it: run folder, checkpoints, progress and outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Tuple

import torch

from core.devices import resolve_device
from core.errors import UserError
from core.runtime import seed_everything
from guidance.prompts import PromptConfig, PromptProcessor

from ..cameras import Cameras
from ..noise import NoiseConfig, make_noise
from ..renderers import RenderOutput, render
from ..scene.background import BackgroundMLPConfig, MLPBackground
from .common import OrbitConfig, check_backend, check_counts, scheduled
from .ground_truth import has_ground_truth
from .prior import GuidanceConfig, GuidanceKind, build_guidance
from .scenes import (CHECKPOINT_FORMAT, NeRFSceneConfig, SceneKind, SplatSceneConfig, build_scene,
                     check_scene)
from .timesteps import TimestepConfig, TimestepSchedule


class BackgroundKind(Enum):
    solid = "solid"  # the colour ``background``
    # a learned colour per view direction (the official NeRF stages' environment map), for image
    # models
    mlp = "mlp"


@dataclass
class LossWeights:
    """Weight of each ``loss_<name>`` term: a number, or a ramp ``[start_step, start_value,
    end_value, end_step]`` (see ``common.scheduled``). The regularisers (``sparsity``,
    ``normal_smooth``) are not computed while their weight is 0; the guidance runs every step
    whatever ``lambda_sds`` is: at 0 the regularisers alone move the scene, and a step whose
    guidance gradient is not finite is still skipped.

    ``sds``: the guidance's distillation loss. ``sparsity``: mean ``sqrt(alpha^2 + 0.01)`` of the
    renders (the sparsity term of the official CFD code). It removes splats no view needs: a
    splat coloured like the background gets no gradient from the guidance and would otherwise
    stay as a floater. ``normal_smooth`` (NeRF): mean squared difference of neighbouring pixels'
    rendered normals, across and down (the official SD NeRF stages' 1000 -> 100); it irons out
    the grid's high-frequency density noise, which shading and meshes show.
    """

    lambda_sds: Any = 1.0
    lambda_sparsity: Any = 0.0
    lambda_normal_smooth: Any = 0.0


@dataclass
class DistillationSettings:
    """What a distillation is: its scene, 2D prior, noise, schedule and losses."""

    seed: int = 0
    device: str = "auto"  # core.devices: auto, cpu, cuda, cuda:<index>
    backend: str = "auto"  # splats: auto, torch or gsplat (cfd.renderers); a NeRF: auto or torch
    steps: int = 600
    batch_size: int = 4
    resolution: int = 64
    # Must match the embedded prior's dataset background (grey: see ShapeDatasetConfig).
    background: float = 0.5
    # Chance per view and step of a uniformly random background colour instead (threestudio's
    # random_aug_prob). Splats coloured like the fixed background are invisible to an image
    # prior; on a random one they are not. The guidance is told each view's colour.
    random_background: float = 0.0
    # The random colours above apply to either kind.
    background_kind: BackgroundKind = BackgroundKind.solid
    background_mlp: BackgroundMLPConfig = field(default_factory=BackgroundMLPConfig)
    scene: SceneKind = SceneKind.splats  # which section below is trained
    splats: SplatSceneConfig = field(default_factory=SplatSceneConfig)
    nerf: NeRFSceneConfig = field(default_factory=NeRFSceneConfig)
    prompt_processor: PromptConfig = field(default_factory=lambda: PromptConfig(prompt="a mug"))
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    camera: OrbitConfig = field(default_factory=lambda: OrbitConfig(distance_range=[2.4, 2.6],
                                                                     fov_range=[40.0, 40.0]))


def check_settings(c: DistillationSettings) -> None:
    """Refuse settings that cannot work together, naming the fix, before anything loads."""
    for key, p in {"random_background": c.random_background,
                   "nerf.shading.p_shaded": c.nerf.shading.p_shaded,
                   "nerf.shading.p_textureless": c.nerf.shading.p_textureless}.items():
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{key} is a probability in [0, 1], got {p}")
    if BackgroundKind(c.background_kind) is BackgroundKind.mlp and GuidanceKind(c.guidance.kind) is GuidanceKind.embedded:
        raise UserError("background_kind=mlp: the embedded prior's images lie on a solid "
                        "background, so a learned one has nothing to learn; use it with "
                        "an image model (guidance.kind=stable-diffusion or flow-matching)")
    schedules = {f"loss.{f.name}": getattr(c.loss, f.name) for f in dataclasses.fields(c.loss)}
    for key, value in {**schedules, "noise.gamma": c.noise.gamma}.items():
        try:
            scheduled(value, 0)
        except ValueError as err:
            raise UserError(f"{key}: {err}") from None
    if SceneKind(c.scene) is SceneKind.splats and c.loss.lambda_normal_smooth != 0:
        raise UserError("loss.lambda_normal_smooth is for scene=nerf (splats have no normals)")
    for key, value in {"guidance.guidance_scale": c.guidance.guidance_scale,
                       **{f"splats.lr.{k}": v
                          for k, v in dataclasses.asdict(c.splats.lr).items()},
                       **{f"nerf.lr.{k}": v for k, v in dataclasses.asdict(c.nerf.lr).items()},
                       "background_mlp.lr": c.background_mlp.lr}.items():
        if not torch.isfinite(torch.tensor(float(value))) or value < 0:
            raise UserError(f"{key} must be a finite number >= 0, got {value}")
    check_backend(resolve_device(c.device), c.backend,
                  splats_only=SceneKind(c.scene) is SceneKind.splats)
    check_scene(c.scene, c.splats, c.nerf)
    c.camera.check()
    check_counts({"steps": c.steps, "batch_size": c.batch_size, "resolution": c.resolution})
    TimestepSchedule(c.timesteps, c.steps)  # its knots and ranges
    if GuidanceKind(c.guidance.kind) is GuidanceKind.embedded:
        # the end of the run compares with the prompt's objects; an unknown prompt fails now,
        # before the prior's dataset is rendered or a run folder exists
        has_ground_truth(c.prompt_processor.prompt)


class Distillation:
    """One run's state: its scene, background, noise, RNG streams, and the step."""

    def __init__(self, c: DistillationSettings):
        check_settings(c)
        self.cfg = c
        self.device = resolve_device(c.device)
        self.generator = seed_everything(c.seed)
        self.guidance = build_guidance(c.guidance, self.device, c.prompt_processor)
        self.prompt = PromptProcessor(c.prompt_processor, self.guidance)
        self.latent_shape = self.guidance.latent_shape(c.resolution, c.resolution)
        self.noise = make_noise(c.noise, self.latent_shape[0], self.device, seed=c.seed + 1)
        self.schedule = TimestepSchedule(c.timesteps, c.steps)
        self.scene = build_scene(c.scene, c.splats, c.nerf, self.device, self.generator)
        self.background = (MLPBackground(c.background_mlp, c.background, self.generator)
                           .to(self.device) if BackgroundKind(c.background_kind) is BackgroundKind.mlp
                           else None)
        self.background_optimizer = (None if self.background is None
                                     else self.background.make_optimizer())
        self.step = 0
        self.bad_steps = 0
        self.wall_s = 0.0  # training time up to ``step``, across resumes (the job keeps it)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "bad_steps": self.bad_steps,
            "wall_s": self.wall_s,
            "scene": self.scene.state_dict(),
            "background": None if self.background is None else {
                "model": self.background.state_dict(),
                "optimizer": self.background_optimizer.state_dict()},
            "noise": self.noise.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError("this checkpoint was written by an earlier cfd3d (before the jobs "
                            "layer, checkpoint format 1) and cannot be resumed by this version; "
                            "start a new run")
        if (state["background"] is None) != (self.background is None):
            stored = "solid" if state["background"] is None else "mlp"
            raise UserError(f"this checkpoint was written with background_kind={stored}, but "
                            f"the config has background_kind={self.cfg.background_kind.value}: "
                            "the run folder's config.yaml was changed after the run started; "
                            "set it back, or start a new run")
        self.scene.load_state_dict(state["scene"])
        if self.background is not None:
            self.background.load_state_dict(state["background"]["model"])
            self.background_optimizer.load_state_dict(state["background"]["optimizer"])
        self.noise.load_state_dict(state["noise"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        self.wall_s = state["wall_s"]

    # -- one step -------------------------------------------------------------------------------
    def render_views(self, cams: Cameras, normals: bool = False
                     ) -> Tuple[RenderOutput, Optional[torch.Tensor]]:
        """Render a training camera batch on the run's backgrounds (with the scene's training
        options: a NeRF's stratified samples and lights).

        Returns the render and the per-view colours ``[B,3]`` the guidance must be told of (None
        when every view has the fixed ``background``, or a learned one)."""
        c = self.cfg
        background = c.background if self.background is None else self.background.image(cams)
        colours = None
        if c.random_background > 0:
            draws = torch.rand(len(cams), 4, generator=self.generator).to(self.device)
            random = draws[:, :1] < c.random_background
            if self.background is None:
                colours = torch.where(random, draws[:, 1:], float(c.background))
                background = colours
            else:  # image models see the colour in the pixels; nothing to tell them
                background = torch.where(random[:, :, None, None], draws[:, None, None, 1:],
                                         background)
        options = self.scene.training_options(cams, self.generator, normals)
        return render(self.scene.scene, cams, c.backend, background, **options), colours

    def render_eval(self, cams: Cameras) -> RenderOutput:
        """Render cameras as the result looks: the fixed background, no training options."""
        return render(self.scene.scene, cams, self.cfg.backend, self.cfg.background,
                      **self.scene.render_options())

    def _optimizers(self) -> list:
        return [] if self.background_optimizer is None else [self.background_optimizer]

    def _trained_parameters(self) -> list:
        return self.scene.parameters() + [p for opt in self._optimizers()
                                          for group in opt.param_groups for p in group["params"]]

    def train_step(self) -> Dict[str, Any]:
        """One optimisation step; returns its record for ``metrics.jsonl``."""
        c = self.cfg
        self.scene.before_render(self.step, self.generator)
        cams = c.camera.sample(c.batch_size, c.resolution, self.generator, self.device)
        out, colours_for_guidance = self.render_views(
            cams, normals=scheduled(c.loss.lambda_normal_smooth, self.step) > 0)
        self.scene.before_backward(self.step, out)
        t = self.schedule(self.step, self.generator)
        points = cams.centers[:, None, None, :] + out.depth.detach() * cams.ray_directions()
        noise = self.noise(points, out.alpha.detach(), self.latent_shape)
        losses = self.guidance(out.rgb, cams, self.prompt, t, noise,
                               background=colours_for_guidance)
        if scheduled(c.loss.lambda_sparsity, self.step) > 0:
            losses["loss_sparsity"] = torch.sqrt(out.alpha ** 2 + 0.01).mean()
        if scheduled(c.loss.lambda_normal_smooth, self.step) > 0:
            n = out.normal
            losses["loss_normal_smooth"] = (((n[:, 1:] - n[:, :-1]) ** 2).mean()
                                            + ((n[:, :, 1:] - n[:, :, :-1]) ** 2).mean())
        loss = 0.0
        for key, value in losses.items():
            if key.startswith("loss_"):
                weight = getattr(c.loss, "lambda_" + key[5:], None)
                if weight is None:
                    raise RuntimeError(f"guidance returned {key} but the config has no "
                                       f"loss.lambda_{key[5:]}")
                loss = loss + scheduled(weight, self.step) * value
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in self._trained_parameters()
                     if p.grad is not None)
        if finite:
            self.scene.after_backward(self.step, out)
            self.scene.step()
            for opt in self._optimizers():
                opt.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.scene.zero_grad()
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        self.noise.refresh(scheduled(c.noise.gamma, self.step))
        record = {"step": self.step, "t": t, "loss": float(loss.detach()),
                  "grad_norm": float(losses["grad_norm"]), "skipped": not finite,
                  **self.scene.log()}
        self.step += 1
        return record


__all__ = ["DistillationSettings", "Distillation", "LossWeights", "BackgroundKind",
           "check_settings"]
