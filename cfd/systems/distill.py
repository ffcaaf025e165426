"""The distillation loop: CFD (consistent noise, annealed t) and SDS (fresh noise) in one engine.

Each step: sample cameras -> render -> noise from the render's surface -> guidance loss ->
backward -> densify -> optimiser step -> noise refresh -> log, with atomic checkpoints that let a
killed run resume bit for bit (on CPU). The scene is Gaussian splats (``scene: splats``) or a
hash-grid NeRF (``scene: nerf``); both render the same ``rgb, alpha, depth``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from guidance.prompts import PromptConfig, PromptProcessor

from ..cameras import fixed_orbit_cameras
from ..config import save_config, to_object
from ..noise import NoiseConfig, make_noise
from ..renderers import render
from ..renderers.occupancy import OccupancyConfig, OccupancyGrid
from ..scene import (Densifier, DensifyConfig, NeRFConfig, NeRFField, NeRFLearningRates, Splats,
                     random_ball)
from ..scene.background import BackgroundMLPConfig, MLPBackground
from ..scene.mesh import check_mesh_resolution, extract_mesh, write_glb, write_obj
from ..scene.ply import read_ply_property
from ..utils.media import save_grid
from ..utils.runtime import (RunInterrupted, TrainingStopped, atomic_write, make_run_dir,
                             seed_everything, write_json)
from ..visualize import write_orbit_video
from .checkpoint import load_checkpoint, save_checkpoint
from .common import (LearningRates, OrbitConfig, ShadingConfig, check_counts, check_device,
                     scheduled)
from .ground_truth import NO_GROUND_TRUTH, evaluate_against_shape_world, has_ground_truth
from .prior import GuidanceConfig, build_guidance
from .timesteps import TimestepConfig, TimestepSchedule

log = logging.getLogger(__name__)


@dataclass
class InitConfig:
    """``ball``: ``n_splats`` grey splats in a ball; ``ply``: a 3DGS ``.ply`` at ``path``
    (e.g. a RelaxFlow completion's ``splats.ply``)."""

    kind: str = "ball"
    n_splats: int = 3000
    radius: float = 0.5
    scale: float = 0.04
    opacity: float = 0.1
    path: Optional[str] = None
    # ply: rescale about the origin so that 99% of the centres lie within this radius (a
    # TRELLIS-style generator's box is [-0.5, 0.5]^3; cameras here orbit a unit-sized object)
    fit_radius: Optional[float] = None
    # ply: then turn it about the up (z) axis by this many degrees, so that the side the
    # prompts call "front" (azimuth 0) faces azimuth 0 (refine sets it from the observation's)
    turn_deg: float = 0.0
    # ply: keep what the observation showed. Each splat moves by (1 - v) of every optimiser
    # step, v its `visibility` property (RelaxFlow writes it: 1 seen, 0 hidden), so CFD changes
    # only what the image did not show.
    lock_visible: bool = False


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
class DistillConfig:
    job: str = "distill"
    name: str = "cfd-splats-embedded"
    seed: int = 0
    output_dir: str = "outputs"
    device: str = "cpu"
    backend: str = "auto"
    steps: int = 600
    batch_size: int = 4
    resolution: int = 64
    # Must match the embedded prior's dataset background (grey: see ShapeDatasetConfig).
    background: float = 0.5
    # Chance per view and step of a uniformly random background colour instead (threestudio's
    # random_aug_prob). Splats coloured like the fixed background are invisible to an image
    # prior; on a random one they are not. The guidance is told each view's colour.
    random_background: float = 0.0
    # "solid" (the colour above) or "mlp": a learned colour per view direction (the official
    # NeRF stages' environment map), for image models; the random colours above still apply.
    background_kind: str = "solid"
    background_mlp: BackgroundMLPConfig = field(default_factory=BackgroundMLPConfig)
    sh_degree: int = 0
    scene: str = "splats"  # or "nerf"
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    nerf_lr: NeRFLearningRates = field(default_factory=NeRFLearningRates)
    n_samples: int = 64  # NeRF: samples per ray (stratified in training)
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)  # NeRF: skips empty space
    shading: ShadingConfig = field(default_factory=ShadingConfig)  # NeRF: lit training views
    # NeRF: at most this many samples per step carry gradients (the official "gradient budget",
    # 13M at 512 px); None: all of them.
    max_grad_samples: Optional[int] = None
    mesh_resolution: int = 128  # NeRF: marching-cubes grid of the exported mesh
    mesh_threshold: Optional[float] = None  # NeRF: surface density; None: read off the field
    prompt_processor: PromptConfig = field(default_factory=lambda: PromptConfig(prompt="a mug"))
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    init: InitConfig = field(default_factory=InitConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    loss: LossWeights = field(default_factory=LossWeights)
    camera: OrbitConfig = field(default_factory=lambda: OrbitConfig(distance_range=[2.4, 2.6],
                                                                     fov_range=[40.0, 40.0]))
    densify: DensifyConfig = field(default_factory=lambda: DensifyConfig(
        refine_start_iter=100, refine_stop_iter=450, refine_every=50, reset_every=100000))
    checkpoint_every: int = 100
    log_every: int = 100
    max_bad_steps: int = 5
    eval_views: int = 8
    video_frames: int = 48
    video_size: int = 128
    video_normals: bool = True  # NeRF: also orbit_normal.mp4, the field's normals as colours


def check_settings(c: DistillConfig) -> None:
    """Reject settings that cannot work together, naming the fix, before anything loads."""
    for key, p in {"random_background": c.random_background,
                   "shading.p_shaded": c.shading.p_shaded,
                   "shading.p_textureless": c.shading.p_textureless}.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key} is a probability in [0, 1], got {p}")
    if c.background_kind not in ("solid", "mlp"):
        raise ValueError(f"background_kind is 'solid' or 'mlp', got {c.background_kind!r}")
    if c.background_kind == "mlp" and c.guidance.kind == "embedded":
        raise ValueError("background_kind=mlp: the embedded prior's images lie on a solid "
                         "background, so a learned one has nothing to learn; use it with "
                         "an image model (guidance.kind=stable-diffusion or flow-matching)")
    schedules = {f"loss.{f.name}": getattr(c.loss, f.name) for f in dataclasses.fields(c.loss)}
    for key, value in {**schedules, "noise.gamma": c.noise.gamma}.items():
        try:
            scheduled(value, 0)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    if c.scene not in ("splats", "nerf"):
        raise ValueError(f"scene is 'splats' or 'nerf', got {c.scene!r}")
    if c.scene == "nerf" and c.backend not in ("auto", "torch"):
        raise ValueError(f"backend={c.backend} renders splats; a NeRF renders with nerfacc: set "
                         "backend=auto or backend=torch")
    if c.scene == "splats" and c.init.kind == "ball" and c.init.n_splats < 1:
        raise ValueError(f"init.n_splats must be >= 1, got {c.init.n_splats}: an empty scene has "
                         "nothing to train (densification only splits and clones splats)")
    if c.init.lock_visible and (c.init.kind != "ply" or c.scene != "splats"
                                or c.densify.enabled):
        raise ValueError("init.lock_visible needs scene=splats, init.kind=ply and "
                         "densify.enabled=false (densification would split and prune the "
                         "splats the visibility belongs to)")
    if c.scene == "nerf" and c.densify.enabled:
        raise ValueError("densify is for splats; set densify.enabled=false with scene=nerf")
    if c.max_grad_samples is not None and c.max_grad_samples < 1:
        raise ValueError(f"max_grad_samples is a positive sample count or null, got "
                         f"{c.max_grad_samples}")
    if c.scene == "splats" and (c.shading.p_shaded > 0 or c.max_grad_samples is not None
                                or c.loss.lambda_normal_smooth != 0):
        raise ValueError("shading, loss.lambda_normal_smooth and max_grad_samples are for "
                         "scene=nerf (splats have no normals, and their backward is "
                         "already bounded by the tiles)")
    check_device(c.device, c.backend)
    c.camera.check()
    check_counts({"steps": c.steps, "batch_size": c.batch_size, "resolution": c.resolution,
                  "checkpoint_every": c.checkpoint_every, "log_every": c.log_every,
                  "eval_views": c.eval_views, "video_frames": c.video_frames,
                  "video_size": c.video_size})
    if c.scene == "nerf":
        # the occupancy grid checks its own sizes when the system builds it, before a run folder
        check_counts({"n_samples": c.n_samples})
        check_mesh_resolution(c.mesh_resolution)  # used only at the end: refused now
    TimestepSchedule(c.timesteps, c.steps)  # its knots and ranges
    if c.guidance.kind == "embedded":
        # the end of the run compares with the prompt's objects; an unknown prompt fails now,
        # before the prior's dataset is rendered or a run folder exists
        has_ground_truth(c.prompt_processor.prompt)


class Distillation:
    """One run: its scene, optimisers, noise, RNG streams and the step loop."""

    def __init__(self, cfg):
        self.cfg: DistillConfig = to_object(cfg)
        c = self.cfg
        check_settings(c)
        self.device = torch.device(c.device)
        self.generator = seed_everything(c.seed)
        self.guidance = build_guidance(c.guidance, self.device, c.prompt_processor)
        self.prompt = PromptProcessor(c.prompt_processor, self.guidance)
        self.latent_shape = self.guidance.latent_shape(c.resolution, c.resolution)
        self.noise = make_noise(c.noise, self.latent_shape[0], self.device, seed=c.seed + 1)
        self.schedule = TimestepSchedule(c.timesteps, c.steps)
        self.scene = self._initial_scene()
        # [N] share of each optimiser step a splat takes (1 - visibility); None: all of it
        self.change_weight = (1 - read_ply_property(c.init.path, "visibility")
                              .clamp(0, 1)).to(self.device) if c.init.lock_visible else None
        self.occupancy = (OccupancyGrid(c.nerf.radius, c.occupancy, self.device)
                          if c.scene == "nerf" and c.occupancy.enabled else None)
        self.background = (MLPBackground(c.background_mlp, c.background, self.generator)
                           .to(self.device) if c.background_kind == "mlp" else None)
        self.optimizers = self._make_optimizers()
        self.background_optimizer = (None if self.background is None
                                     else self.background.make_optimizer())
        self.densifier = Densifier(c.densify, scene_scale=c.init.radius)
        if isinstance(self.scene, Splats):
            self.densifier.check(self.scene, self.optimizers)
        self.step = 0
        self.bad_steps = 0
        self.wall_s = 0.0  # training time up to ``step``, across resumes (``run`` keeps it)

    def _make_optimizers(self) -> dict:
        """The scene's optimisers, one per parameter group."""
        splats = isinstance(self.scene, Splats)
        return self.scene.make_optimizers(
            dataclasses.asdict(self.cfg.lr if splats else self.cfg.nerf_lr))

    def _step_optimizers(self) -> None:
        """One step of every optimiser; locked splats keep their share of the old values."""
        before = None
        if self.change_weight is not None:
            before = {k: v.detach().clone() for k, v in self.scene.params.items()}
        for opt in self._all_optimizers():
            opt.step()
        if before is not None:
            with torch.no_grad():
                for key, param in self.scene.params.items():
                    weight = self.change_weight.view(-1, *[1] * (param.ndim - 1))
                    param.copy_(torch.lerp(before[key], param, weight))

    def _all_optimizers(self) -> list:
        return list(self.optimizers.values()) + (
            [] if self.background_optimizer is None else [self.background_optimizer])

    def _initial_scene(self):
        if self.cfg.scene == "nerf":
            return NeRFField(self.cfg.nerf, self.device, self.generator)
        return self._initial_splats().to(self.device)

    def _trained_parameters(self) -> list:
        return [p for opt in self._all_optimizers() for group in opt.param_groups
                for p in group["params"]]

    def _initial_splats(self) -> Splats:
        init = self.cfg.init
        if init.kind == "ply":
            if not init.path:
                raise ValueError("init.kind=ply needs init.path=<file.ply>")
            splats = Splats.load_ply(init.path)
            if not len(splats):
                raise ValueError(f"init.path={init.path} holds no splats; a run needs at least "
                                 "one to train")
            if init.fit_radius is not None:
                extent = torch.quantile(splats.means.detach().norm(dim=-1), 0.99).item()
                splats = splats.scaled(init.fit_radius / max(extent, 1e-6))
            return splats.turned(init.turn_deg) if init.turn_deg else splats
        if init.kind != "ball":
            raise ValueError(f"unknown init kind {init.kind!r}; use 'ball' or 'ply'")
        splats = random_ball(init.n_splats, init.radius, init.scale, init.opacity,
                             self.cfg.sh_degree, generator=self.generator)
        with torch.no_grad():
            splats.params["sh0"].zero_()  # grey: colour 0.5
        return splats

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "wall_s": self.wall_s,
            "scene": self._scene_state(),
            "background": None if self.background is None else {
                "model": self.background.state_dict(),
                "optimizer": self.background_optimizer.state_dict()},
            "occupancy": None if self.occupancy is None else self.occupancy.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "densifier": self.densifier.state_dict(),
            "noise": self.noise.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def _scene_state(self) -> dict:
        if isinstance(self.scene, Splats):
            return {"splats": {k: v.detach().clone() for k, v in self.scene.params.items()},
                    "sh_degree": self.scene.sh_degree}
        return {"nerf": {k: v.detach().clone() for k, v in self.scene.state_dict().items()}}

    def _layout(self) -> dict:
        """The settings that decide which parts a checkpoint holds, as this run has them."""
        return {"scene": self.cfg.scene, "background_kind": self.cfg.background_kind,
                "occupancy.enabled": self.occupancy is not None}

    @staticmethod
    def _checkpoint_layout(state: dict) -> dict:
        """The same settings, read off the parts a checkpoint holds."""
        return {"scene": "splats" if "splats" in state["scene"] else "nerf",
                "background_kind": "solid" if state.get("background") is None else "mlp",
                "occupancy.enabled": state.get("occupancy") is not None}

    def load_state_dict(self, state: dict) -> None:
        if "scene" not in state:
            raise ValueError("this checkpoint predates NeRF scenes (cfd3d 0.1 layout, splats "
                             "at the top level) and cannot be resumed by this version; start "
                             "a new run")
        stored, wanted = self._checkpoint_layout(state), self._layout()
        differ = (["scene"] if stored["scene"] != wanted["scene"]  # the rest follows from it
                  else [k for k in wanted if stored[k] != wanted[k]])
        if differ:
            def settings(layout):
                return ", ".join(f"{k}={str(layout[k]).lower()}" for k in differ)

            raise ValueError(f"this checkpoint was written with {settings(stored)}, but the "
                             f"config has {settings(wanted)}: the run folder's config.yaml was "
                             "changed after the run started; set it back, or start a new run")
        scene = state["scene"]
        if "splats" in scene:
            self.scene = Splats(scene["splats"], scene["sh_degree"]).to(self.device)
        else:
            self.scene.load_state_dict(scene["nerf"])
        self.optimizers = self._make_optimizers()
        if self.background is not None:
            self.background.load_state_dict(state["background"]["model"])
            self.background_optimizer.load_state_dict(state["background"]["optimizer"])
        if self.occupancy is not None:
            self.occupancy.load_state_dict(state["occupancy"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.densifier.load_state_dict(state["densifier"])
        self.noise.load_state_dict(state["noise"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        # checkpoints from before it was kept: the time before the resume is not known
        self.wall_s = state.get("wall_s", 0.0)

    # -- one step -------------------------------------------------------------------------------
    def render_views(self, cams):
        """Render a camera batch on the run's backgrounds (and, for a NeRF, lights).

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
        options = {}
        if isinstance(self.scene, NeRFField):
            # a NeRF's training samples are stratified from the run's generator
            options = {"generator": self.generator, "max_grad_samples": c.max_grad_samples,
                       "lighting": c.shading.sample(cams, self.generator),
                       "normals": scheduled(c.loss.lambda_normal_smooth, self.step) > 0}
        out = render(self.scene, cams, c.backend, background, **options, **self.render_options())
        return out, colours

    def render_options(self) -> dict:
        """What a NeRF render needs beyond the cameras (nothing for splats)."""
        if isinstance(self.scene, Splats):
            return {}
        return {"n_samples": self.cfg.n_samples, "occupancy": self.occupancy}

    def update_occupancy(self) -> None:
        c = self.cfg
        if self.occupancy is not None and self.step % c.occupancy.update_every == 0:
            step_size = 2 * c.nerf.radius / c.n_samples
            self.occupancy.update(lambda p: self.scene.query(p)[0], step_size, self.generator)

    def train_step(self) -> dict:
        c = self.cfg
        self.update_occupancy()
        cams = c.camera.sample(c.batch_size, c.resolution, self.generator, self.device)
        out, colours_for_guidance = self.render_views(cams)
        if isinstance(self.scene, Splats):
            self.densifier.before_backward(self.scene, self.optimizers, self.step, out.info)
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
                    raise ValueError(f"guidance returned {key} but the config has no "
                                     f"loss.lambda_{key[5:]}")
                loss = loss + scheduled(weight, self.step) * value
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in self._trained_parameters()
                     if p.grad is not None)
        if finite:
            if isinstance(self.scene, Splats):
                self.densifier.after_backward(self.scene, self.optimizers, self.step, out.info)
            self._step_optimizers()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        for opt in self._all_optimizers():
            opt.zero_grad(set_to_none=True)
        self.noise.refresh(scheduled(c.noise.gamma, self.step))
        record = {"step": self.step, "t": t, "loss": float(loss.detach()),
                  "grad_norm": float(losses["grad_norm"]), "skipped": not finite}
        if isinstance(self.scene, Splats):
            record["n_splats"] = len(self.scene)
        self.step += 1
        return record


def _metrics_log(run_dir: Path, keep_below: int) -> Path:
    """metrics.jsonl without the lines of steps a resumed run will redo, rewritten atomically.
    A killed run can leave a torn last line (the log is flushed in blocks); it is dropped."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        *complete, _torn = path.read_text().split("\n")
        kept = "".join(ln + "\n" for ln in complete if json.loads(ln)["step"] < keep_below)
        atomic_write(path, lambda f: f.write(kept.encode()))
    return path


def run(cfg, resume_dir: Optional[Path] = None) -> dict:
    """Run (or resume) a distillation; returns the final metrics. Resuming a finished run (its
    metrics.json written) only says so and returns them."""
    c: DistillConfig = to_object(cfg)
    if resume_dir is not None and (Path(resume_dir) / "metrics.json").is_file():
        print(f"{resume_dir} finished all {c.steps} steps already; nothing to resume (start a "
              "new run to train again)")
        return {**json.loads((Path(resume_dir) / "metrics.json").read_text()),
                "run_dir": str(resume_dir)}
    # a damaged checkpoint is refused before any model loads
    state = load_checkpoint(Path(resume_dir) / "ckpt") if resume_dir is not None else None
    system = Distillation(cfg)  # checks the settings and loads the models before a folder exists
    if state is not None:
        system.load_state_dict(state)
    if resume_dir is None:
        run_dir = make_run_dir(c.output_dir, c.name, c.prompt_processor.prompt)
        save_config(cfg, run_dir / "config.yaml")
    else:
        run_dir = Path(resume_dir)
        log.info("resumed %s at step %d", run_dir, system.step)
    checkpoint_step = None if state is None else system.step
    try:
        metrics_path = _metrics_log(run_dir, system.step)
        eval_cams = fixed_orbit_cameras(c.eval_views, c.resolution, c.resolution, 20.0, 2.5,
                                        40.0, device=system.device)
        wall_before, start = system.wall_s, time.perf_counter()
        bar = tqdm(total=c.steps, initial=system.step, desc=c.prompt_processor.prompt,
                   dynamic_ncols=True)
        with open(metrics_path, "a") as metrics_file:
            while system.step < c.steps:
                record = system.train_step()
                metrics_file.write(json.dumps(record) + "\n")
                if record["skipped"]:
                    log.warning("step %d: non-finite gradient, step skipped", record["step"])
                    if system.bad_steps >= c.max_bad_steps:
                        metrics_file.flush()
                        raise TrainingStopped(
                            f"{system.bad_steps} consecutive steps had NaN/Inf gradients; "
                            f"stopped. The last good checkpoint is in {run_dir / 'ckpt'} "
                            "(--resume would repeat the same steps); start a new run with lower "
                            "learning rates or guidance scale")
                bar.set_postfix(t=f"{record['t']:.3f}", loss=f"{record['loss']:.3g}",
                                **({"splats": record["n_splats"]} if "n_splats" in record
                                   else {}))
                bar.update(1)
                if system.step % c.checkpoint_every == 0 or system.step == c.steps:
                    metrics_file.flush()
                    system.wall_s = wall_before + time.perf_counter() - start
                    save_checkpoint(run_dir / "ckpt", system.state_dict())
                    checkpoint_step = system.step
                if system.step % c.log_every == 0 or system.step == c.steps:
                    with torch.no_grad():
                        pred = render(system.scene, eval_cams, c.backend, c.background,
                                      **system.render_options())
                    save_grid([pred.rgb, pred.alpha],
                              run_dir / f"progress_{system.step:05d}.png")
        bar.close()
        result = {"steps": c.steps, "wall_s": wall_before + time.perf_counter() - start,
                  "prompt": c.prompt_processor.prompt}
        _write_outputs(system, run_dir, result)
    except KeyboardInterrupt:  # the last checkpoint is whole; a half-done step is not saved
        raise RunInterrupted(run_dir, system.step, checkpoint_step) from None
    before = f" ({wall_before:.1f} s of them before the resume)" if wall_before else ""
    print(f"{c.steps} steps in {result['wall_s']:.1f} s{before}; results in {run_dir}")
    return {**result, "run_dir": str(run_dir)}


def _write_outputs(system: Distillation, run_dir: Path, result: dict) -> None:
    """The trained scene, its orbit videos, the ground-truth metrics (embedded prior) and
    ``metrics.json`` (``result`` and what this adds to it)."""
    c = system.cfg
    if isinstance(system.scene, Splats):
        system.scene.save_ply(run_dir / "splats.ply")
        result["n_splats"] = len(system.scene)
    else:
        save_nerf_outputs(system.scene, run_dir, c.mesh_resolution, c.mesh_threshold)
    videos = [("rgb", "orbit.mp4")]
    if c.video_normals and isinstance(system.scene, NeRFField):
        videos.append(("normal", "orbit_normal.mp4"))
    for show, name in videos:
        write_orbit_video(system.scene, run_dir / name, n_frames=c.video_frames,
                          size=c.video_size, distance=2.5, background=c.background,
                          render_options=system.render_options(), show=show)
    if c.guidance.kind == "embedded" and has_ground_truth(c.prompt_processor.prompt):
        result.update(evaluate_against_shape_world(system.scene, c.prompt_processor.prompt,
                                                    resolution=c.resolution,
                                                    background=c.background,
                                                    comparison_path=run_dir / "vs_truth.png",
                                                    render_options=system.render_options()))
        print(f"held-out PSNR {result['psnr']:.2f} dB, mask IoU {result['mask_iou']:.3f} "
              f"(best: {result['variant']} rotated {result['rotation_deg']:.0f} deg)")
    elif c.guidance.kind == "embedded":
        result["ground_truth"] = NO_GROUND_TRUTH
        print(f"no held-out PSNR or mask IoU: ground truth {NO_GROUND_TRUTH}")
    write_json(run_dir / "metrics.json", result)


def save_nerf_outputs(field: NeRFField, run_dir: Path, mesh_resolution: int,
                      mesh_threshold: Optional[float] = None) -> None:
    """The field's weights and its mesh (``mesh.obj``, ``mesh.glb``; skipped, with a warning,
    when the field is empty)."""
    from safetensors.torch import save

    weights = save({k: v.detach().cpu().contiguous() for k, v in field.state_dict().items()})
    atomic_write(run_dir / "nerf.safetensors", lambda f: f.write(weights))
    try:
        mesh = extract_mesh(field, mesh_resolution, mesh_threshold)
    except ValueError as err:
        log.warning("no mesh written: %s", err)
        return
    write_obj(mesh, run_dir / "mesh.obj")
    write_glb(mesh, run_dir / "mesh.glb")


__all__ = ["DistillConfig", "run", "Distillation"]
