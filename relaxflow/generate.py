"""The ``generate`` job: a TRELLIS pipeline folder turns an image (or a prompt) into splats.

    python run.py generate --config configs/trellis-image.yaml image=chair.png [mask=mask.png]
    python run.py generate --config configs/trellis-text.yaml prompt="a red chair"

Writes ``splats.ply``, ``orbit.mp4``, ``occupancy.npz`` (the stage-1 voxels, ``coords [N, 3]``
at ``resolution``) with a PNG of them, and ``metrics.json`` (stage timings, counts). Stage models
are loaded when their stage starts and released after it (``offload=reload``), so only one
stage's weights are in memory at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from cfd.config import save_config, to_object
from cfd.utils.runtime import make_run_dir, write_json

log = logging.getLogger(__name__)


@dataclass
class StageOverrides:
    """Sampler settings that replace ``pipeline.json``'s for one stage (null: keep)."""

    steps: Optional[int] = None
    cfg_strength: Optional[float] = None


@dataclass
class GenerateConfig:
    job: str = "generate"
    name: str = "trellis-image"
    # A TRELLIS pipeline folder (pipeline.json + ckpts/) or a repo id in the Hugging Face cache.
    model: str = "microsoft/TRELLIS-image-large"
    image: Optional[str] = None  # RGBA, or RGB with ``mask``
    mask: Optional[str] = None  # white = object
    prompt: Optional[str] = None  # text pipelines
    image_cond_model: str = "facebook/dinov2-with-registers-large"
    # null: the pipeline's own text encoder (openai/clip-vit-large-patch14)
    text_cond_model: Optional[str] = None
    seed: int = 42
    device: str = "auto"  # cuda when present, else cpu
    # Torso precision of the models whose checkpoints are fp16: auto (float16 on CUDA, float32 on
    # CPU), float16, bfloat16 or float32.
    precision: str = "auto"
    # Between stages: reload (read each stage's models from disk, then free them: least memory),
    # cpu (keep them in CPU memory, on the device only for their stage) or none (keep them all
    # on the device). See relaxflow.pipeline.
    offload: str = "reload"
    output_dir: str = "outputs"
    sparse_structure_sampler: StageOverrides = field(default_factory=StageOverrides)
    slat_sampler: StageOverrides = field(default_factory=StageOverrides)
    video_frames: int = 60
    video_size: int = 256


PRECISIONS = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float32": torch.float32}


def resolve_precision(name: str) -> Optional[torch.dtype]:
    if name not in PRECISIONS:
        raise ValueError(f"precision is one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def with_overrides(sampler, overrides: StageOverrides):
    """``pipeline.json``'s sampler with the config's non-null overrides."""
    from dataclasses import replace

    return replace(sampler, **{k: v for k, v in vars(overrides).items() if v is not None})


def _observation(c: GenerateConfig) -> Optional[torch.Tensor]:
    """The preprocessed image ``[3, S, S]`` of an image run, None for a prompt: the inputs are
    checked before any model loads or any file is written."""
    from .conditioning import load_object

    if (c.image is None) == (c.prompt is None):
        raise ValueError("give exactly one of image=path.png (image pipelines) or "
                         "prompt=\"...\" (text pipelines)")
    if c.mask is not None and c.image is None:
        raise ValueError("mask= marks the object in image=; a prompt takes no mask")
    return None if c.image is None else load_object(c.image, c.mask)


def _conditions(c: GenerateConfig, image: Optional[torch.Tensor], spec, device):
    """(condition, negative condition) of the image or, without one, of the prompt."""
    from .conditioning import ImageConditioner, TextConditioner

    if image is not None:
        conditioner = ImageConditioner.from_pretrained(c.image_cond_model, device)
        cond = conditioner(image[None])
        return cond, conditioner.negative(cond)
    text = TextConditioner.from_pretrained(c.text_cond_model or spec.cond_model
                                           or "openai/clip-vit-large-patch14", device)
    cond = text([c.prompt])
    return cond, text.negative(cond)


def run(cfg) -> Dict[str, Any]:
    from cfd.visualize import write_orbit_video

    from .pipeline import TrellisPipeline
    from .stages import decode_splats, group_by_item, guided, sample_latent, sample_structure

    c: GenerateConfig = to_object(cfg)
    device = resolve_device(c.device)
    image = _observation(c)
    pipe = TrellisPipeline.from_pretrained(c.model, device=device,
                                           half_dtype=resolve_precision(c.precision),
                                           offload=c.offload)
    pipe.spec.require("text" if image is None else "image", "generate")
    timings: Dict[str, float] = {}

    def stage(name, fn):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[f"{name}_s"] = time.perf_counter() - start
        log.info("%s: %.1f s", name, timings[f"{name}_s"])
        return result

    cond, neg_cond = stage("condition", lambda: _conditions(c, image, pipe.spec, device))
    run_dir = make_run_dir(c.output_dir, c.name, Path(c.image).stem if c.image else c.prompt)
    save_config(cfg, run_dir / "config.yaml")
    generator = torch.Generator().manual_seed(c.seed)

    def structure():
        with pipe.stage("structure") as m:
            flow, decoder = m["sparse_structure_flow_model"], m["sparse_structure_decoder"]
            sampler = with_overrides(pipe.sampler("structure"), c.sparse_structure_sampler)
            coords = sample_structure(flow, decoder, guided(sampler, cond, neg_cond, True), 1,
                                      generator, device)[1]
            return group_by_item(coords, 1), flow.resolution * decoder.upsample_factor

    coords, grid_resolution = stage("structure", structure)

    def latent():
        with pipe.stage("latent") as m:
            sampler = with_overrides(pipe.sampler("latent"), c.slat_sampler)
            return sample_latent(m["slat_flow_model"], guided(sampler, cond, neg_cond, True),
                                 coords, 1, pipe.spec.slat_normalization, generator)

    def decode():
        with pipe.stage("decode") as m:
            return decode_splats(m["slat_decoder_gs"], slat)

    slat = stage("latent", latent)
    (splats,) = stage("decode", decode)

    splats.save_ply(run_dir / "splats.ply")
    voxels = coords[:, 1:].cpu().numpy().astype(np.int16)
    np.savez_compressed(run_dir / "occupancy.npz", coords=voxels, resolution=grid_resolution)
    save_voxel_views(voxels, run_dir / "occupancy.png", grid_resolution)
    write_orbit_video(splats, run_dir / "orbit.mp4", n_frames=c.video_frames, size=c.video_size,
                      distance=2.0, background=1.0)
    metrics = {**timings, "voxels": len(voxels), "splats": len(splats), "device": str(device)}
    write_json(run_dir / "metrics.json", metrics)
    print(f"{len(voxels)} voxels, {len(splats)} splats; wrote splats.ply, orbit.mp4 and "
          f"occupancy.npz to {run_dir}")
    return metrics


def save_voxel_views(voxels: np.ndarray, path: Path, resolution: int,
                     values: Optional[np.ndarray] = None) -> None:
    """Three axis-aligned projections of voxels ``[N, 3]`` side by side: occupancy, or the
    maximum of per-voxel ``values`` in [0, 1] along each axis."""
    from cfd.utils.media import save_image

    grid = np.zeros((resolution,) * 3, dtype=np.float32)
    grid[tuple(voxels.T)] = 1.0 if values is None else values
    views = [grid.max(axis=a) for a in (0, 1, 2)]
    image = torch.from_numpy(np.concatenate(views, axis=1))[..., None].expand(-1, -1, 3)
    save_image(image, path)
