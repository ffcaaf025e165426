"""The ``relaxflow`` job: complete an occluded object from its image and images of a prompt.

    python run.py relaxflow --config configs/relaxflow-trellis.yaml image=obs.png mask=mask.png \
        prompt="a chair" priors=[a.png,b.png,c.png]

Stage 1 samples the structure with both branches (visibility 0 everywhere: nothing is known
yet); stage 2 samples the latent on that structure with each voxel's visibility from the
observation camera, so what the image shows stays the observation's. From the same noise it also
runs the two single branches (observation only: plain TRELLIS; prior only: plain sampling on
the pooled prior tokens with the relaxation) for comparison. Writes ``splats.ply`` and
``orbit.mp4`` (RelaxFlow; each splat's ``visibility`` is a ``.ply`` property, for CFD's
``init.lock_visible``), ``observation_only.ply`` / ``prior_only.ply`` with their orbits,
``visibility.png`` (the voxels' visibility, its maximum along each grid axis: three
projections side by side), ``occupancy.npz``, ``branch_voxels.npz`` (each branch's voxels,
``coords [N, 3]`` under its name, and ``resolution``) and ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from cfd.cameras import Cameras, orbit_cameras
from cfd.utils.media import save_image
from cfd.visualize import write_orbit_video
from core.devices import Precision, resolve_device
from core.errors import UserError
from guidance.loading import resolve_model_path
from jobs.skeleton import RunFolder, check_output, typed
from relaxflow.conditioning import ImageConditioner, load_object, preprocess_image
from relaxflow.dual_branch import Pooling, RelaxFlowSampler, Schedule, pool_priors
from relaxflow.loading import PipelineSpec, check_pipeline_files, conditioning_model
from relaxflow.pipeline import Offload, Stopwatch, TrellisPipeline
from relaxflow.priors import PriorImagesConfig, check_prior_request, prior_images
from relaxflow.relaxation import AttentionRelaxation, KeyLayout, Topology
from relaxflow.runner import Branches, decode, sample_latents, sample_structures, save_voxels
from relaxflow.sampler import FlowEulerSampler, StageOverrides, with_overrides
from relaxflow.stages import guided
from relaxflow.visibility import voxel_visibility


@dataclass
class BranchSettings:
    """One stage's RelaxFlow settings (released defaults: linear cutoff at 0.4, prior weight 1,
    blur sigma 2.5 on stage 1's cross-attention; stage 2 unblurred as released)."""

    schedule: Schedule = Schedule.linear_cutoff
    alpha0: float = 1.0
    cutoff: float = 0.4
    prior_weight: float = 1.0
    sigma_query: float = 2.5
    sigma_key: float = 2.5
    topology: Topology = Topology.grid  # flat: the released code's blur along the token index
    sampler: StageOverrides = field(default_factory=StageOverrides)


@dataclass
class ObservationCamera:
    """Where the observation was taken from, in the generator's box (TRELLIS predicts no pose):
    by default TRELLIS's front view (its renders' yaw 0, looking from +y: our azimuth 90)."""

    enabled: bool = True  # false: visibility 0 everywhere, the prior may change every voxel
    elevation: float = 0.0
    azimuth: float = 90.0
    distance: float = 2.0
    fov: float = 40.0
    resolution: int = 518


@dataclass
class RelaxFlowConfig:
    job: str = "relaxflow"
    name: str = "relaxflow-trellis"
    model: str = "microsoft/TRELLIS-image-large"
    image: Optional[str] = None  # the occluded observation (RGBA, or RGB with ``mask``)
    mask: Optional[str] = None  # the observation's visible object pixels (white)
    prompt: Optional[str] = None  # what the hidden part should be
    priors: List[str] = field(default_factory=list)  # images that show the prompt (RGBA)
    # With no priors: views of the prompt drawn from a 2D model, the embedded prior by default
    # (it knows only its own prompts; see `python run.py prompts`) or an image model
    # (generate_priors.model.kind=stable-diffusion, generate_priors.model.model_id=<folder>).
    generate_priors: PriorImagesConfig = field(default_factory=PriorImagesConfig)
    prior_pooling: Pooling = Pooling.concat
    # null: the pipeline's own (a conditioner folder inside it, else DINOv2-L with registers)
    image_cond_model: Optional[str] = None
    camera: ObservationCamera = field(default_factory=ObservationCamera)
    stage1: BranchSettings = field(default_factory=BranchSettings)
    stage2: BranchSettings = field(default_factory=lambda: BranchSettings(sigma_query=0.0,
                                                                          sigma_key=0.0))
    seed: int = 42
    device: str = "auto"  # as in the generate job
    precision: Precision = Precision.auto  # as in the generate job
    offload: Offload = Offload.reload  # as in the generate job
    output_dir: str = "outputs"
    video_frames: int = 60
    video_size: int = 256


Config = RelaxFlowConfig

PRIOR_FIX = "save the prior image as RGBA with its background transparent (priors take no masks)"
DRAWN_FIX = ("the 2D model's view has no background to cut out (image models: see "
             "generate_priors.key_low/key_high); try another seed, or give your own "
             "priors=[a.png,b.png]")
BRANCH_FILES = {"relaxflow": ("splats.ply", "orbit.mp4"),
                "observation_only": ("observation_only.ply", "observation_only.mp4"),
                "prior_only": ("prior_only.ply", "prior_only.mp4")}


def check(c: RelaxFlowConfig) -> Tensor:
    """Every setting and input, before a model loads or a file is written: reads the
    observation (returned preprocessed, ``[3, S, S]``), the pipeline folder and the given
    prior images."""
    if c.image is None:
        raise UserError("give the occluded observation: image=path.png [mask=path.png]")
    if not c.priors:
        check_prior_request(c.prompt, c.generate_priors)
    resolve_device(c.device)
    check_output(c.output_dir, c.name)
    spec = check_pipeline_files(c.model)
    spec.require("image", "relaxflow")
    spec.require_stages("relaxflow")
    observation = load_object(c.image, c.mask, framing=spec.image_framing)
    for prior in c.priors:
        load_object(prior, opaque_fix=PRIOR_FIX, setting="priors", framing=spec.image_framing)
    resolve_model_path(conditioning_model(spec, c.image_cond_model), index_file="config.json",
                       option="image_cond_model")
    return observation


def _relax_sampler(base: FlowEulerSampler, settings: BranchSettings, keys: KeyLayout,
                   query_grid: Optional[Tuple[int, int, int]]) -> RelaxFlowSampler:
    relaxation = None
    if settings.sigma_query > 0 or settings.sigma_key > 0:
        relaxation = AttentionRelaxation(settings.sigma_query, settings.sigma_key,
                                         settings.topology.value, query_grid, keys)
    return RelaxFlowSampler(base=with_overrides(base, settings.sampler),
                            schedule=settings.schedule.value, alpha0=settings.alpha0,
                            cutoff=settings.cutoff, prior_weight=settings.prior_weight,
                            relaxation=relaxation)


def _prior_images(c: RelaxFlowConfig, framing: str, device: torch.device
                  ) -> Tuple[Tensor, Optional[np.ndarray]]:
    """The priors preprocessed with the pipeline's ``framing``, ``[N, 3, S, S]``, and the RGBA
    views ``[N, R, R, 4]`` when they are drawn here (None when given)."""
    if c.priors:
        return torch.stack([load_object(p, opaque_fix=PRIOR_FIX, setting="priors",
                                        framing=framing) for p in c.priors]), None
    drawn = prior_images(c.prompt, c.seed, c.generate_priors, device)
    return torch.stack([preprocess_image(rgba, source=f"drawn prior view {i}",
                                         opaque_fix=DRAWN_FIX, framing=framing)
                        for i, rgba in enumerate(drawn)]), drawn


def _observation_camera(cam: ObservationCamera) -> Cameras:
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return orbit_cameras(one(cam.elevation), one(cam.azimuth), one(cam.distance), one(cam.fov),
                         cam.resolution, cam.resolution)


def _tokens(c: RelaxFlowConfig, spec: PipelineSpec, observation: Tensor,
            prior_images: Tensor, device: torch.device):
    """(condition, negative) of the observation and of the pooled priors, and the layout of
    the prior condition's tokens (the keys the relaxation blurs)."""
    conditioner = ImageConditioner.from_pretrained(conditioning_model(spec, c.image_cond_model),
                                                   device)
    obs_cond = conditioner(observation[None])
    prior_cond = pool_priors(conditioner(prior_images), c.prior_pooling.value)
    prefix, grid = conditioner.token_layout()
    keys = KeyLayout(len(prior_images) if c.prior_pooling is Pooling.concat else 1, prefix, grid)
    return ((obs_cond, torch.zeros_like(obs_cond)), (prior_cond, torch.zeros_like(prior_cond)),
            keys)


def _three_branches(sampler: RelaxFlowSampler, obs, prior, visibility=None,
                    progress=False) -> Branches:
    """RelaxFlow and the two single branches, as integrators for one stage."""
    relaxation = sampler.relaxation

    def prior_only(model, noise):
        if relaxation is None:
            return sampler.base.sample(model, noise, *prior)
        return sampler.base.sample(lambda x, t, cond: model(x, t, cond, relaxation=relaxation),
                                   noise, *prior)

    return {"relaxflow": lambda model, noise: sampler.sample(model, noise, obs, prior, visibility,
                                                             progress),
            "observation_only": guided(sampler.base, *obs), "prior_only": prior_only}


def run(cfg) -> Dict[str, Any]:
    c: RelaxFlowConfig = typed(cfg)
    # 1. every setting and input, before a model loads or a file is written
    observation = check(c)
    device = resolve_device(c.device)
    pipe = TrellisPipeline.from_pretrained(c.model, device=device, precision=c.precision,
                                           offload=c.offload)
    # 2. the prior images (drawn from a 2D model when none are given) and both conditions
    priors, drawn = _prior_images(c, pipe.spec.image_framing, device)
    obs, prior, keys = _tokens(c, pipe.spec, observation, priors, device)
    # 3. the run folder
    folder = RunFolder.create(c.output_dir, c.name, Path(c.image).stem, cfg)
    for i, rgba in enumerate([] if drawn is None else drawn):
        save_image(torch.from_numpy(rgba[..., :3] / 255.0), folder.path / f"prior_{i}.png")
    # 4. stage 1 for RelaxFlow and both single branches, from the same noise (one random
    # stream per branch through both stages, all from the same seed)
    n_priors, clock = len(priors), Stopwatch(device)
    generators = {name: torch.Generator().manual_seed(c.seed) for name in BRANCH_FILES}

    def stage1_branches(flow):
        grid = (flow.resolution // flow.patch_size,) * 3
        stage1 = _relax_sampler(pipe.sampler("structure"), c.stage1, keys, grid)
        return _three_branches(stage1, obs, prior, progress=True)

    voxels, resolution = sample_structures(pipe, stage1_branches, generators, device, clock)
    # 5. each voxel of the completion's structure: seen from the observation camera or not
    completed = voxels["relaxflow"]
    visibility = (voxel_visibility(completed[:, 1:], resolution,
                                   _observation_camera(c.camera).to(device))
                  if c.camera.enabled else torch.zeros(len(completed), device=device))
    # 6. stage 2 on each branch's structure, RelaxFlow's fused by that visibility
    stage2 = _relax_sampler(pipe.sampler("latent"), c.stage2, keys, None)
    latents = sample_latents(pipe, _three_branches(stage2, obs, prior, visibility[:, None]),
                             voxels, generators, clock)
    # 7. the splats of each branch; the completion's carry each voxel's visibility (what CFD
    # may change when it refines), its voxels decoding to per_voxel splats in voxel order
    splats, per_voxel = decode(pipe, latents)
    if len(splats["relaxflow"]) != per_voxel * len(visibility):
        raise RuntimeError(f"{len(splats['relaxflow'])} splats from {len(visibility)} voxels: "
                           f"expected {per_voxel} per voxel")
    for name, (ply, video) in BRANCH_FILES.items():
        extra = ({"visibility": visibility.repeat_interleave(per_voxel)}
                 if name == "relaxflow" else None)
        splats[name].save_ply(folder.path / ply, extra)
        write_orbit_video(splats[name], folder.path / video, n_frames=c.video_frames,
                          size=c.video_size, distance=2.0)
    # 8. the voxels (the completion's with their visibility; every branch's in
    # branch_voxels.npz), and metrics.json
    save_voxels(folder.path, completed, resolution, visibility)
    np.savez_compressed(folder.path / "branch_voxels.npz", resolution=resolution,
                        **{name: v[:, 1:].cpu().numpy().astype(np.int16)
                           for name, v in voxels.items()})
    metrics = {**clock.seconds, "voxels": {k: len(v) for k, v in voxels.items()},
               "visible_fraction": float((visibility > 0.5).float().mean()),
               "priors": n_priors, "device": str(device)}
    return folder.finish(metrics, f"RelaxFlow: {len(completed)} voxels, "
                                  f"{metrics['visible_fraction']:.0%} visible; wrote splats.ply, "
                                  "orbit.mp4, the single-branch results and visibility.png")
