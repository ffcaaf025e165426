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
projections side by side), ``occupancy.npz`` and ``metrics.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cfd.config import save_config, to_object
from cfd.utils.runtime import make_run_dir, write_json

from .generate import (StageOverrides, resolve_device, resolve_precision, save_voxel_views,
                       with_overrides)
from .priors import PriorImagesConfig


@dataclass
class BranchSettings:
    """One stage's RelaxFlow settings (released defaults: linear cutoff at 0.4, prior weight 1,
    blur sigma 2.5 on stage 1's cross-attention; stage 2 unblurred as released)."""

    schedule: str = "linear_cutoff"
    alpha0: float = 1.0
    cutoff: float = 0.4
    prior_weight: float = 1.0
    sigma_query: float = 2.5
    sigma_key: float = 2.5
    topology: str = "grid"  # "flat": the released code's blur along the raw token index
    sampler: StageOverrides = field(default_factory=StageOverrides)

    def check(self, key: str) -> None:
        """Refuse what this stage's sampler would refuse, before anything loads or runs
        (``key``: the config key, ``stage1`` or ``stage2``)."""
        from .dual_branch import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ValueError(f"{key}.schedule is one of {', '.join(SCHEDULES)}, got "
                             f"{self.schedule!r}")
        if self.topology not in ("grid", "flat"):
            raise ValueError(f"{key}.topology is 'grid' or 'flat', got {self.topology!r}")


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
    prior_pooling: str = "concat"
    image_cond_model: str = "facebook/dinov2-with-registers-large"
    camera: ObservationCamera = field(default_factory=ObservationCamera)
    stage1: BranchSettings = field(default_factory=BranchSettings)
    stage2: BranchSettings = field(default_factory=lambda: BranchSettings(sigma_query=0.0,
                                                                          sigma_key=0.0))
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"  # as in the generate job
    offload: str = "reload"  # as in the generate job
    output_dir: str = "outputs"
    video_frames: int = 60
    video_size: int = 256


def _relax_sampler(base, settings: BranchSettings, n_priors: int, query_grid, pooling: str):
    from .dual_branch import RelaxFlowSampler
    from .relaxation import AttentionRelaxation, KeyLayout

    relaxation = None
    if settings.sigma_query > 0 or settings.sigma_key > 0:
        keys = KeyLayout(n_images=n_priors if pooling == "concat" else 1)
        relaxation = AttentionRelaxation(settings.sigma_query, settings.sigma_key,
                                         settings.topology, query_grid, keys)
    return RelaxFlowSampler(base=with_overrides(base, settings.sampler),
                            schedule=settings.schedule, alpha0=settings.alpha0,
                            cutoff=settings.cutoff, prior_weight=settings.prior_weight,
                            relaxation=relaxation)


PRIOR_FIX = "save the prior image as RGBA with its background transparent (priors take no masks)"
DRAWN_FIX = ("the 2D model's view has no background to cut out (image models: see "
             "generate_priors.key_low/key_high); try another seed, or give your own "
             "priors=[a.png,b.png]")


def _prior_images(c: RelaxFlowConfig, device):
    """The priors preprocessed, ``[N, 3, S, S]``, and the RGBA views ``[N, R, R, 4]`` when they
    are drawn here (None when given)."""
    from .conditioning import load_object, preprocess_image
    from .priors import prior_images

    if c.priors:
        return torch.stack([load_object(p, opaque_fix=PRIOR_FIX) for p in c.priors]), None
    drawn = prior_images(c.prompt, c.seed, c.generate_priors, device)
    return torch.stack([preprocess_image(rgba, source=f"drawn prior view {i}",
                                         opaque_fix=DRAWN_FIX)
                        for i, rgba in enumerate(drawn)]), drawn


def _observation_camera(cam: ObservationCamera):
    from cfd.cameras import orbit_cameras

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return orbit_cameras(one(cam.elevation), one(cam.azimuth), one(cam.distance), one(cam.fov),
                         cam.resolution, cam.resolution)


def _tokens(c: RelaxFlowConfig, observation, prior_images, device):
    """(condition, negative) of the observation and of the pooled priors."""
    from .conditioning import ImageConditioner
    from .dual_branch import pool_priors

    conditioner = ImageConditioner.from_pretrained(c.image_cond_model, device)
    obs_cond = conditioner(observation[None])
    prior_cond = pool_priors(conditioner(prior_images), c.prior_pooling)
    return (obs_cond, torch.zeros_like(obs_cond)), (prior_cond, torch.zeros_like(prior_cond))


def _three_runs(sampler, obs, prior, visibility=None, progress=False):
    """RelaxFlow and the two single branches, as integrators for one stage."""
    from .stages import guided

    relaxation = sampler.relaxation

    def prior_only(model, noise):
        if relaxation is None:
            return sampler.base.sample(model, noise, *prior)
        return sampler.base.sample(lambda x, t, cond: model(x, t, cond, relaxation=relaxation),
                                   noise, *prior)

    return {"relaxflow": lambda model, noise: sampler.sample(model, noise, obs, prior, visibility,
                                                             progress),
            "observation_only": guided(sampler.base, *obs), "prior_only": prior_only}


def check_settings(c: RelaxFlowConfig) -> None:
    """Refuse settings that cannot run, naming the fix, before a model loads or a file is
    written (the inputs' files are read and checked by ``run``)."""
    if c.image is None:
        raise ValueError("give the occluded observation: image=path.png [mask=path.png]")
    c.stage1.check("stage1")
    c.stage2.check("stage2")
    resolve_precision(c.precision)
    if not c.priors:
        from .priors import check_prior_request

        check_prior_request(c.prompt, c.generate_priors)


def run(cfg) -> Dict[str, Any]:
    from .conditioning import load_object
    from .pipeline import TrellisPipeline

    c: RelaxFlowConfig = to_object(cfg)
    # every input is checked before a model loads or a file is written
    check_settings(c)
    device = resolve_device(c.device)
    observation = load_object(c.image, c.mask)
    pipe = TrellisPipeline.from_pretrained(c.model, device=device,
                                           half_dtype=resolve_precision(c.precision),
                                           offload=c.offload)
    pipe.spec.require("image", "relaxflow")
    priors, drawn = _prior_images(c, device)
    obs, prior = _tokens(c, observation, priors, device)
    run_dir = make_run_dir(c.output_dir, c.name, Path(c.image).stem)
    save_config(cfg, run_dir / "config.yaml")
    if drawn is not None:
        from cfd.utils.media import save_image

        for i, rgba in enumerate(drawn):
            save_image(torch.from_numpy(rgba[..., :3] / 255.0), run_dir / f"prior_{i}.png")
    n_priors = len(priors)
    # one random stream per run through both stages, all from the same seed
    generators = {name: torch.Generator().manual_seed(c.seed)
                  for name in ("relaxflow", "observation_only", "prior_only")}
    timings: Dict[str, float] = {}

    # One function per stage: its models are locals there, so when the stage ends nothing but
    # the pipeline holds them (with offload=reload, the default, it lets them go).
    def structures():
        from .stages import group_by_item, sample_structure

        with pipe.stage("structure") as m:
            flow, decoder = m["sparse_structure_flow_model"], m["sparse_structure_decoder"]
            grid = (flow.resolution // flow.patch_size,) * 3
            stage1 = _relax_sampler(pipe.sampler("structure"), c.stage1, n_priors, grid,
                                    c.prior_pooling)
            coords = {}
            for name, integrate in _three_runs(stage1, obs, prior, progress=True).items():
                start = time.perf_counter()
                voxels = sample_structure(flow, decoder, integrate, 1, generators[name], device)[1]
                coords[name] = group_by_item(voxels, 1)
                timings[f"structure_{name}_s"] = time.perf_counter() - start
            return coords, flow.resolution * decoder.upsample_factor

    def latents(coords, visibility):
        from .stages import sample_latent

        with pipe.stage("latent") as m:
            stage2 = _relax_sampler(pipe.sampler("latent"), c.stage2, n_priors, None,
                                    c.prior_pooling)
            sampled = {}
            for name, integrate in _three_runs(stage2, obs, prior, visibility[:, None]).items():
                start = time.perf_counter()
                sampled[name] = sample_latent(m["slat_flow_model"], integrate, coords[name], 1,
                                              pipe.spec.slat_normalization, generators[name])
                timings[f"latent_{name}_s"] = time.perf_counter() - start
            return sampled

    def decode(slats, visibility):
        from cfd.visualize import write_orbit_video

        from .stages import decode_splats

        files = {"relaxflow": ("splats.ply", "orbit.mp4"),
                 "observation_only": ("observation_only.ply", "observation_only.mp4"),
                 "prior_only": ("prior_only.ply", "prior_only.mp4")}
        with pipe.stage("decode") as m:
            per_voxel = m["slat_decoder_gs"].num_gaussians
            for name, latent in slats.items():
                (splats,) = decode_splats(m["slat_decoder_gs"], latent)
                extra = None
                if name == "relaxflow":
                    # each voxel decodes to num_gaussians splats, in voxel order: they carry its
                    # visibility, what CFD may change when it refines
                    if len(splats) != per_voxel * len(visibility):
                        raise RuntimeError(f"{len(splats)} splats from {len(visibility)} voxels: "
                                           f"expected {per_voxel} per voxel")
                    extra = {"visibility": visibility.repeat_interleave(per_voxel)}
                splats.save_ply(run_dir / files[name][0], extra)
                write_orbit_video(splats, run_dir / files[name][1], n_frames=c.video_frames,
                                  size=c.video_size, distance=2.0)

    from .visibility import voxel_visibility

    voxels, resolution = structures()
    completed = voxels["relaxflow"]
    visibility = (voxel_visibility(completed[:, 1:], resolution,
                                   _observation_camera(c.camera).to(device))
                  if c.camera.enabled else torch.zeros(len(completed), device=device))
    decode(latents(voxels, visibility), visibility)
    cells = completed[:, 1:].cpu().numpy().astype(np.int16)
    np.savez_compressed(run_dir / "occupancy.npz", coords=cells, resolution=resolution,
                        visibility=visibility.cpu().numpy())
    save_voxel_views(cells, run_dir / "visibility.png", resolution,
                     values=visibility.cpu().numpy())
    metrics = {**timings, "voxels": {k: len(v) for k, v in voxels.items()},
               "visible_fraction": float((visibility > 0.5).float().mean()),
               "priors": n_priors, "device": str(device)}
    write_json(run_dir / "metrics.json", metrics)
    metrics["run_dir"] = str(run_dir)
    print(f"RelaxFlow: {len(cells)} voxels, {metrics['visible_fraction']:.0%} visible; wrote "
          f"splats.ply, orbit.mp4, the single-branch results and visibility.png to {run_dir}")
    return metrics
