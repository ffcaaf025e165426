"""The scene a distillation trains, with everything it needs kept beside it.

Each scene kind is one object that owns its parameters' optimisers, its per-step upkeep
(densification of splats; a NeRF's occupancy grid), the options its renders take, its part of a
checkpoint, its output files and its own config section (``splats:`` or ``nerf:``), the way
gsplat's strategies own their state. The distillation loop talks to either through the same
methods and never asks which kind it holds:

    scene = build_scene(kind, cfg.splats or cfg.nerf, device, generator)
    scene.before_render(step, generator)                    # upkeep before the step's render
    out = render(scene.scene, cams, backend, bg, **scene.training_options(cams, generator, ...))
    scene.before_backward(step, out); loss.backward(); scene.after_backward(step, out)
    scene.step(); scene.zero_grad()
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from core.errors import InputFileError, UserError
from core.runtime import atomic_write

from ..cameras import Cameras
from ..renderers.occupancy import OccupancyConfig, OccupancyGrid
from ..renderers.types import RenderOutput
from ..scene import (Densifier, DensifyConfig, NeRFConfig, NeRFField, NeRFLearningRates, Splats,
                     group_mean, merge_to_count, random_ball)
from ..scene.mesh import check_mesh_resolution, extract_mesh, write_glb, write_obj
from ..scene.ply import read_ply_property
from .common import LearningRates, ShadingConfig, check_counts

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # the layout below; cfd3d before the jobs layer wrote format 1 (unmarked)


class SceneKind(Enum):
    splats = "splats"
    nerf = "nerf"


class InitKind(Enum):
    ball = "ball"  # ``n_splats`` grey splats in a ball
    ply = "ply"  # a 3DGS ``.ply`` at ``path`` (e.g. a RelaxFlow completion's ``splats.ply``)


@dataclass
class InitConfig:
    kind: InitKind = InitKind.ball
    n_splats: int = 3000
    radius: float = 0.5
    scale: float = 0.04
    opacity: float = 0.1
    path: Optional[str] = None
    # ply: rescale about the origin so that 99% of the centres lie within this radius (a
    # TRELLIS-style generator's box is [-0.5, 0.5]^3; cameras here orbit a unit-sized object)
    fit_radius: Optional[float] = None
    # ply: or rescale about the origin by exactly this factor (the embedded generator's box to
    # the shape world it was trained on: 1 / cfd.shapes.GENERATOR_SCALE = 1.6)
    scale_by: Optional[float] = None
    # ply: then turn it about the up (z) axis by this many degrees, so that the side the
    # prompts call "front" (azimuth 0) faces azimuth 0 (refine sets it from the observation's)
    turn_deg: float = 0.0
    # ply: keep what the observation showed. Each splat moves by (1 - v) of every optimiser
    # step, v its `visibility` property (RelaxFlow writes it: 1 seen, 0 hidden), so CFD changes
    # only what the image did not show.
    lock_visible: bool = False
    # ply, with lock_visible: null locks in proportion, as above; a value holds every splat of
    # visibility >= it fixed and lets the others move freely (0.5 on issue 20's two refine
    # cases: no different from the proportional lock, BENCHMARKS.md, seventeenth session)
    lock_threshold: Optional[float] = None
    # ply: then, if it holds more splats than this, merge those whose centres share a cube
    # into one, in the smallest cubes that leave at most this many (cfd.scene.merge_to_count;
    # their visibility merged with them): a generator's 32 splats per voxel make every step
    # slow, and a few thousand hold an object at 64 px. null: keep them all.
    max_splats: Optional[int] = None


@dataclass
class SplatSceneConfig:
    """``scene: splats``: 3D Gaussian splats."""

    sh_degree: int = 0
    init: InitConfig = field(default_factory=InitConfig)
    lr: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=lambda: DensifyConfig(
        refine_start_iter=100, refine_stop_iter=450, refine_every=50, reset_every=100000))


@dataclass
class NeRFSceneConfig(NeRFConfig):
    """``scene: nerf``: a hash-grid field (its settings above) and how it is trained."""

    lr: NeRFLearningRates = field(default_factory=NeRFLearningRates)
    n_samples: int = 64  # samples per ray (stratified in training)
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)  # skips empty space
    shading: ShadingConfig = field(default_factory=ShadingConfig)  # lit training views
    # At most this many samples per step carry gradients (the official "gradient budget", 13M at
    # 512 px); None: all of them.
    max_grad_samples: Optional[int] = None
    mesh_resolution: int = 128  # marching-cubes grid of the exported mesh
    mesh_threshold: Optional[float] = None  # surface density; None: read off the field
    video_normals: bool = True  # also orbit_normal.mp4, the field's normals as colours


def change_weight(visibility: Tensor, threshold: Optional[float]) -> Tensor:
    """The share ``[N]`` of each optimiser step a splat of ``visibility [N]`` takes:
    ``1 - v`` (in proportion), or with ``threshold`` 0 for ``v >= threshold`` and 1 below."""
    if threshold is None:
        return 1 - visibility.clamp(0, 1)
    return (visibility < threshold).to(visibility.dtype)


class SplatScene:
    """Splats, one Adam per parameter, gsplat's densification and the visibility lock."""

    kind = SceneKind.splats

    def __init__(self, cfg: SplatSceneConfig, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.device = cfg, device
        splats, visibility = self._initial_splats(generator)
        self.scene = splats.to(device)
        # [N] share of each optimiser step a splat takes; None: all of it
        self.change_weight = None if visibility is None else change_weight(
            visibility, cfg.init.lock_threshold).to(device)
        self.optimizers = self.scene.make_optimizers(asdict(cfg.lr))
        self.densifier = Densifier(cfg.densify, scene_scale=cfg.init.radius)
        self.densifier.check(self.scene, self.optimizers)

    @staticmethod
    def check(cfg: SplatSceneConfig) -> None:
        """Refuse settings that cannot work, before anything is built."""
        init = cfg.init
        if InitKind(init.kind) is InitKind.ball and init.n_splats < 1:
            raise UserError(f"splats.init.n_splats must be >= 1, got {init.n_splats}: an empty "
                            "scene has nothing to train (densification only splits and clones "
                            "splats)")
        if InitKind(init.kind) is InitKind.ply and not init.path:
            raise UserError("splats.init.kind=ply needs splats.init.path=<file.ply>")
        if init.fit_radius is not None and init.scale_by is not None:
            raise UserError("splats.init.fit_radius and splats.init.scale_by both rescale the "
                            "ply: set one of them (null the other)")
        if init.scale_by is not None and not init.scale_by > 0:
            raise UserError(f"splats.init.scale_by must be > 0, got {init.scale_by}")
        if init.max_splats is not None and init.max_splats < 1:
            raise UserError(f"splats.init.max_splats must be >= 1, got {init.max_splats}; null "
                            "keeps every splat")
        if init.lock_visible and (InitKind(init.kind) is not InitKind.ply or cfg.densify.enabled):
            raise UserError("splats.init.lock_visible needs splats.init.kind=ply and "
                            "splats.densify.enabled=false (densification would split and prune "
                            "the splats the visibility belongs to)")

        if init.lock_threshold is not None and not (
                init.lock_visible and 0 < init.lock_threshold <= 1):
            raise UserError(f"splats.init.lock_threshold={init.lock_threshold} must lie in "
                            "(0, 1] and needs splats.init.lock_visible=true (it says which "
                            "visibility holds a splat); null locks in proportion to visibility")

    def _initial_splats(self, generator: torch.Generator) -> Tuple[Splats, Optional[Tensor]]:
        """The starting splats, and with ``lock_visible`` each one's visibility ``[N]``."""
        init = self.cfg.init
        if InitKind(init.kind) is not InitKind.ply:
            splats = random_ball(init.n_splats, init.radius, init.scale, init.opacity,
                                 self.cfg.sh_degree, generator=generator)
            with torch.no_grad():
                splats.params["sh0"].zero_()  # grey: colour 0.5
            return splats, None
        splats = Splats.load_ply(init.path)
        if not len(splats):
            raise UserError(f"splats.init.path={init.path} holds no splats; a run needs at "
                            "least one to train")
        visibility = read_ply_property(init.path, "visibility") if init.lock_visible else None
        if init.fit_radius is not None:
            extent = torch.quantile(splats.means.detach().norm(dim=-1), 0.99).item()
            splats = splats.scaled(init.fit_radius / max(extent, 1e-6))
        if init.scale_by is not None:
            splats = splats.scaled(init.scale_by)
        if init.turn_deg:
            splats = splats.turned(init.turn_deg)
        if init.max_splats is not None:
            opacity = splats.opacities.detach()
            splats, group = merge_to_count(splats, init.max_splats)
            if visibility is not None:
                visibility = group_mean(visibility, opacity, group, len(splats))
        return splats, visibility

    # -- one step -------------------------------------------------------------------------------
    def before_render(self, step: int, generator: torch.Generator) -> None:
        """Splats need no upkeep before a render."""

    def training_options(self, cameras: Cameras, generator: torch.Generator,
                         normals: bool) -> Dict[str, Any]:
        """Splats render the same in training and evaluation (and have no normals)."""
        return {}

    def render_options(self) -> Dict[str, Any]:
        return {}

    def before_backward(self, step: int, out: RenderOutput) -> None:
        self.densifier.before_backward(self.scene, self.optimizers, step, out.info)

    def after_backward(self, step: int, out: RenderOutput) -> None:
        self.densifier.after_backward(self.scene, self.optimizers, step, out.info)

    def parameters(self) -> List[torch.Tensor]:
        return [p for opt in self.optimizers.values() for group in opt.param_groups
                for p in group["params"]]

    def step(self) -> None:
        """One step of every optimiser; locked splats keep their share of the old values."""
        before = None
        if self.change_weight is not None:
            before = {k: v.detach().clone() for k, v in self.scene.params.items()}
        for opt in self.optimizers.values():
            opt.step()
        if before is not None:
            with torch.no_grad():
                for key, param in self.scene.params.items():
                    weight = self.change_weight.view(-1, *[1] * (param.ndim - 1))
                    param.copy_(torch.lerp(before[key], param, weight))

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def log(self) -> Dict[str, Any]:
        """What a step's record adds about the scene."""
        return {"n_splats": len(self.scene)}

    # -- checkpoints and outputs ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind.value,
                "params": {k: v.detach().clone() for k, v in self.scene.params.items()},
                "sh_degree": self.scene.sh_degree,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "densifier": self.densifier.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_layout(state, self.kind)
        self.scene = Splats(state["params"], state["sh_degree"]).to(self.device)
        self.optimizers = self.scene.make_optimizers(asdict(self.cfg.lr))
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.densifier.load_state_dict(state["densifier"])

    def save(self, run_dir: Path) -> Dict[str, Any]:
        """``splats.ply``; returns what ``metrics.json`` gains."""
        self.scene.save_ply(run_dir / "splats.ply")
        return {"n_splats": len(self.scene)}

    def videos(self) -> Dict[str, str]:
        """The orbit videos to write: ``{file name: what they show}``."""
        return {"orbit.mp4": "rgb"}


class NeRFScene:
    """A hash-grid field, its optimisers, its occupancy grid and its training renders'
    options (stratified samples, shading, the gradient budget)."""

    kind = SceneKind.nerf

    def __init__(self, cfg: NeRFSceneConfig, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.device = cfg, device
        self.scene = NeRFField(cfg, device, generator)
        self.occupancy = (OccupancyGrid(cfg.radius, cfg.occupancy, device)
                          if cfg.occupancy.enabled else None)
        self.optimizers = self.scene.make_optimizers(asdict(cfg.lr))

    @staticmethod
    def check(cfg: NeRFSceneConfig) -> None:
        """Refuse settings that cannot work, before anything is built (the occupancy grid checks
        its own sizes when it is built, which is also before a run folder)."""
        check_counts({"nerf.n_samples": cfg.n_samples})
        if cfg.max_grad_samples is not None and cfg.max_grad_samples < 1:
            raise UserError(f"nerf.max_grad_samples is a positive sample count or null, got "
                            f"{cfg.max_grad_samples}")
        check_mesh_resolution(cfg.mesh_resolution)  # used only at the end: refused now

    # -- one step -------------------------------------------------------------------------------
    def before_render(self, step: int, generator: torch.Generator) -> None:
        """Every ``occupancy.update_every`` steps, re-estimate which cells are empty."""
        if self.occupancy is not None and step % self.cfg.occupancy.update_every == 0:
            step_size = 2 * self.cfg.radius / self.cfg.n_samples
            self.occupancy.update(lambda p: self.scene.query(p)[0], step_size, generator)

    def training_options(self, cameras: Cameras, generator: torch.Generator,
                         normals: bool) -> Dict[str, Any]:
        """A training render's samples are stratified from the run's generator; some views are
        lit (``shading``); ``normals``: render them (a loss needs them)."""
        return {"generator": generator, "max_grad_samples": self.cfg.max_grad_samples,
                "lighting": self.cfg.shading.sample(cameras, generator), "normals": normals,
                **self.render_options()}

    def render_options(self) -> Dict[str, Any]:
        """What every render of the field needs beyond the cameras."""
        return {"n_samples": self.cfg.n_samples, "occupancy": self.occupancy}

    def before_backward(self, step: int, out: RenderOutput) -> None:
        """Nothing to record before the backward pass."""

    def after_backward(self, step: int, out: RenderOutput) -> None:
        """Nothing to change after it."""

    def parameters(self) -> List[torch.Tensor]:
        return [p for opt in self.optimizers.values() for group in opt.param_groups
                for p in group["params"]]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def log(self) -> Dict[str, Any]:
        return {}

    # -- checkpoints and outputs ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind.value,
                "params": {k: v.detach().clone() for k, v in self.scene.state_dict().items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "occupancy": None if self.occupancy is None else self.occupancy.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_layout(state, self.kind)
        if (state["occupancy"] is None) != (self.occupancy is None):
            stored = str(state["occupancy"] is not None).lower()
            raise UserError(f"this checkpoint was written with nerf.occupancy.enabled={stored}, "
                            f"but the config has nerf.occupancy.enabled="
                            f"{str(self.occupancy is not None).lower()}: the run folder's "
                            "config.yaml was changed after the run started; set it back, or "
                            "start a new run")
        self.scene.load_state_dict(state["params"])
        self.optimizers = self.scene.make_optimizers(asdict(self.cfg.lr))
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        if self.occupancy is not None:
            self.occupancy.load_state_dict(state["occupancy"])

    def save(self, run_dir: Path) -> Dict[str, Any]:
        """``nerf.safetensors`` and the mesh (``mesh.obj``, ``mesh.glb``)."""
        save_nerf_outputs(self.scene, run_dir, self.cfg.mesh_resolution, self.cfg.mesh_threshold)
        return {}

    def videos(self) -> Dict[str, str]:
        return {"orbit.mp4": "rgb", **({"orbit_normal.mp4": "normal"}
                                       if self.cfg.video_normals else {})}


def check_layout(state: Dict[str, Any], kind: SceneKind) -> None:
    """Refuse a checkpoint's scene part of another kind than the config's."""
    if state["kind"] != kind.value:
        raise UserError(f"this checkpoint was written with scene={state['kind']}, but the config "
                        f"has scene={kind.value}: the run folder's config.yaml was changed after "
                        "the run started; set it back, or start a new run")


SCENES = {SceneKind.splats: SplatScene, SceneKind.nerf: NeRFScene}


def scene_config(kind: SceneKind, splats: SplatSceneConfig, nerf: NeRFSceneConfig):
    """The config section of the scene kind a run trains."""
    return splats if SceneKind(kind) is SceneKind.splats else nerf


def check_scene(kind: SceneKind, splats: SplatSceneConfig, nerf: NeRFSceneConfig) -> None:
    SCENES[SceneKind(kind)].check(scene_config(kind, splats, nerf))


def build_scene(kind: SceneKind, splats: SplatSceneConfig, nerf: NeRFSceneConfig,
                device: torch.device, generator: torch.Generator):
    """The :class:`SplatScene` or :class:`NeRFScene` of ``kind``, built from its section."""
    return SCENES[SceneKind(kind)](scene_config(kind, splats, nerf), device, generator)


def save_nerf_outputs(nerf: NeRFField, run_dir: Path, mesh_resolution: int,
                      mesh_threshold: Optional[float] = None) -> None:
    """The field's weights and its mesh (``mesh.obj``, ``mesh.glb``; skipped, with a warning,
    when the field is empty)."""
    weights = safetensors_bytes({k: v.detach().cpu().contiguous()
                                 for k, v in nerf.state_dict().items()})
    atomic_write(run_dir / "nerf.safetensors", lambda f: f.write(weights))
    try:
        mesh = extract_mesh(nerf, mesh_resolution, mesh_threshold)
    except ValueError as err:
        log.warning("no mesh written: %s", err)
        return
    write_obj(mesh, run_dir / "mesh.obj")
    write_glb(mesh, run_dir / "mesh.glb")


def load_saved_scene(run_dir: Path, device: Union[str, torch.device] = "cpu"
                     ) -> Tuple[Union[Splats, NeRFField], Dict[str, Any]]:
    """The scene a finished run saved, and the options its renders take: ``splats.ply`` (any job
    that writes splats), else ``nerf.safetensors`` built with the ``nerf:`` section of the
    run's ``config.yaml`` (rendered with its ``n_samples``, without the occupancy grid, which
    is not saved: the same image, only slower)."""
    run_dir = Path(run_dir)
    if (run_dir / "splats.ply").is_file():
        return Splats.load_ply(run_dir / "splats.ply").to(device), {}
    weights = run_dir / "nerf.safetensors"
    if not weights.is_file():
        raise InputFileError(f"{run_dir} holds no saved scene (splats.ply or nerf.safetensors): "
                             "only a finished run of a job that writes one can be scored")
    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(NeRFSceneConfig),
                                              saved.get("nerf", {})))
    field = NeRFField(cfg, device)
    field.load_state_dict(load_safetensors(str(weights), device=str(device)))
    return field.eval(), {"n_samples": cfg.n_samples}
