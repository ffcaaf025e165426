"""The ``relaxflow`` job: complete an occluded object from its image and images of a prompt.

    python run.py relaxflow --config configs/relaxflow-trellis.yaml image=obs.png mask=mask.png \
        prompt="a chair" priors=[a.png,b.png,c.png]

Stage 1 samples the structure with both branches (visibility 0 everywhere: nothing is known
yet); stage 2 samples the latent on that structure with each voxel's visibility from the
observation camera, so what the image shows stays the observation's. From the same noise it also
runs the two single branches (observation only: plain TRELLIS; prior only: plain sampling on
the pooled prior tokens with the relaxation) for comparison. Writes ``splats.ply`` and
``orbit.mp4`` (RelaxFlow), ``observation_only.ply`` / ``prior_only.ply`` with their orbits,
``visibility.png`` (the voxels' visibility, three axis projections and the observation view),
``occupancy.npz`` and ``metrics.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cfd.config import save_config, to_object
from cfd.utils.runtime import make_run_dir, write_json

from .generate import StageOverrides, resolve_device, resolve_precision, save_voxel_views


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
    # With no priors: this many views of the prompt drawn from the embedded prior (it knows
    # only its own prompts; see `python run.py prompts`).
    generated_priors: int = 3
    prior_pooling: str = "concat"
    image_cond_model: str = "facebook/dinov2-with-registers-large"
    camera: ObservationCamera = field(default_factory=ObservationCamera)
    stage1: BranchSettings = field(default_factory=BranchSettings)
    stage2: BranchSettings = field(default_factory=lambda: BranchSettings(sigma_query=0.0,
                                                                          sigma_key=0.0))
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"  # as in the generate job
    output_dir: str = "outputs"
    video_frames: int = 60
    video_size: int = 256


def _relax_sampler(base, settings: BranchSettings, n_priors: int, query_grid, pooling: str):
    from .dual_branch import RelaxFlowSampler
    from .relaxation import AttentionRelaxation, KeyLayout

    overrides = {k: v for k, v in vars(settings.sampler).items() if v is not None}
    relaxation = None
    if settings.sigma_query > 0 or settings.sigma_key > 0:
        keys = KeyLayout(n_images=n_priors if pooling == "concat" else 1)
        relaxation = AttentionRelaxation(settings.sigma_query, settings.sigma_key,
                                         settings.topology, query_grid, keys)
    return RelaxFlowSampler(base=replace(base, **overrides), schedule=settings.schedule,
                            alpha0=settings.alpha0, cutoff=settings.cutoff,
                            prior_weight=settings.prior_weight, relaxation=relaxation)


def _inputs(c: RelaxFlowConfig):
    """Preprocessed observation and prior images (and the RGBA priors when drawn here),
    checked before any model loads."""
    from .conditioning import load_rgba, preprocess_image
    from .priors import prior_images

    if c.image is None:
        raise ValueError("give the occluded observation: image=path.png [mask=path.png]")
    observation = preprocess_image(load_rgba(c.image, c.mask))
    drawn = None
    if c.priors:
        rgba = [load_rgba(p) for p in c.priors]
    else:
        drawn = prior_images(c.prompt, c.generated_priors, c.seed)
        rgba = list(drawn)
    return observation, torch.stack([preprocess_image(r) for r in rgba]), drawn


def run(cfg) -> Dict[str, Any]:
    from cfd.cameras import orbit_cameras
    from cfd.visualize import write_orbit_video

    from .conditioning import ImageConditioner
    from .dual_branch import pool_priors
    from .loading import load_model, read_pipeline
    from .stages import decode_splats, group_by_item, guided, sample_latent, sample_structure
    from .visibility import voxel_visibility

    c: RelaxFlowConfig = to_object(cfg)
    device, half = resolve_device(c.device), resolve_precision(c.precision)
    observation, prior_images, drawn = _inputs(c)
    spec = read_pipeline(c.model)
    run_dir = make_run_dir(c.output_dir, c.name, Path(c.image).stem)
    save_config(cfg, run_dir / "config.yaml")
    if drawn is not None:
        from cfd.utils.media import save_image

        for i, rgba in enumerate(drawn):
            save_image(torch.from_numpy(rgba[..., :3] / 255.0), run_dir / f"prior_{i}.png")

    conditioner = ImageConditioner.from_pretrained(c.image_cond_model, device)
    obs_cond = conditioner(observation[None])
    prior_cond = pool_priors(conditioner(prior_images), c.prior_pooling)
    del conditioner
    obs = (obs_cond, torch.zeros_like(obs_cond))
    prior = (prior_cond, torch.zeros_like(prior_cond))
    n_priors = len(prior_images)
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cam = c.camera
    camera = orbit_cameras(one(cam.elevation), one(cam.azimuth), one(cam.distance), one(cam.fov),
                           cam.resolution, cam.resolution)

    timings: Dict[str, float] = {}
    flow = load_model(spec.root, spec.models["sparse_structure_flow_model"], device, half)
    decoder = load_model(spec.root, spec.models["sparse_structure_decoder"], device, half)
    grid = (flow.resolution // flow.patch_size,) * 3
    stage1 = _relax_sampler(spec.samplers["sparse_structure_sampler"], c.stage1, n_priors, grid,
                            c.prior_pooling)
    relaxed_prior = stage1.relaxation
    runs = {
        "relaxflow": lambda model, noise: stage1.sample(model, noise, obs, prior, progress=True),
        "observation_only": guided(stage1.base, *obs),
        "prior_only": guided(stage1.base, *prior) if relaxed_prior is None else (
            lambda model, noise: stage1.base.sample(
                lambda x, t, cond: model(x, t, cond, relaxation=relaxed_prior), noise, *prior)),
    }
    # one random stream per run, through both stages, from the same seed: the same noise for
    # every run
    generators = {name: torch.Generator().manual_seed(c.seed) for name in runs}
    structures = {}
    for name, integrate in runs.items():
        start = time.perf_counter()
        coords = sample_structure(flow, decoder, integrate, 1, generators[name], device)[1]
        structures[name] = group_by_item(coords, 1)
        timings[f"structure_{name}_s"] = time.perf_counter() - start
    resolution = flow.resolution * decoder.upsample_factor
    del flow, decoder

    flow = load_model(spec.root, spec.models["slat_flow_model"], device, half)
    stage2 = _relax_sampler(spec.samplers["slat_sampler"], c.stage2, n_priors, None,
                            c.prior_pooling)
    visibility = (voxel_visibility(structures["relaxflow"][:, 1:], resolution, camera.to(device))
                  if cam.enabled else torch.zeros(len(structures["relaxflow"]), device=device))
    latents = {}
    for name, coords in structures.items():
        start = time.perf_counter()
        if name == "relaxflow":
            m = visibility[:, None]
            integrate = (lambda model, noise: stage2.sample(model, noise, obs, prior, m))
        else:
            integrate = guided(stage2.base, *(obs if name == "observation_only" else prior))
        latents[name] = sample_latent(flow, integrate, coords, 1, spec.slat_normalization,
                                      generators[name])
        timings[f"latent_{name}_s"] = time.perf_counter() - start
    del flow

    decoder = load_model(spec.root, spec.models["slat_decoder_gs"], device, half)
    outputs = {"relaxflow": "splats", "observation_only": "observation_only",
               "prior_only": "prior_only"}
    for name, latent in latents.items():
        (splats,) = decode_splats(decoder, latent)
        stem = outputs[name]
        splats.save_ply(run_dir / f"{stem}.ply")
        write_orbit_video(splats, run_dir / ("orbit.mp4" if name == "relaxflow" else f"{stem}.mp4"),
                          n_frames=c.video_frames, size=c.video_size, distance=2.0)
    voxels = structures["relaxflow"][:, 1:].cpu().numpy().astype(np.int16)
    np.savez_compressed(run_dir / "occupancy.npz", coords=voxels, resolution=resolution,
                        visibility=visibility.cpu().numpy())
    save_voxel_views(voxels, run_dir / "visibility.png", resolution,
                     values=visibility.cpu().numpy())
    metrics = {**timings, "voxels": {k: len(v) for k, v in structures.items()},
               "visible_fraction": float((visibility > 0.5).float().mean()),
               "priors": n_priors, "device": str(device)}
    write_json(run_dir / "metrics.json", metrics)
    print(f"RelaxFlow: {len(voxels)} voxels, {metrics['visible_fraction']:.0%} visible; wrote "
          f"splats.ply, orbit.mp4, the single-branch results and visibility.png to {run_dir}")
    return metrics
