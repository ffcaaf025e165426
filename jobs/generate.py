"""The ``generate`` job: a TRELLIS pipeline folder turns an image (or a prompt) into splats.

    python run.py generate --config configs/generate-embedded.yaml prompt="a chair"
    python run.py generate --config configs/generate-embedded.yaml image=obs.png [mask=m.png]
    python run.py generate --config configs/trellis-image.yaml image=chair.png [mask=mask.png]
    python run.py generate --config configs/trellis-text.yaml prompt="a red chair"

A prompt given to an image pipeline (the embedded generator, ``model: embedded``, is one) is
first drawn as an image by a 2D model (``draw``: the embedded prior by default, which knows the
prompts ``python run.py prompts`` lists), written as ``input.png``, and lifted.

Writes ``splats.ply``, ``orbit.mp4``, ``occupancy.npz`` (the stage-1 voxels, ``coords [N, 3]``
at ``resolution``) with a PNG of them, and ``metrics.json`` (stage timings, the whole run's
``wall_s``, counts; with
``truth=<category>/<seed>``, the shape-world instance the image shows, the structure's IoU and
the splats' PSNR and mask IoU from 8 views around it: ``cfd.evaluation.generation``; for a
prompt of the shape world lifted by the embedded generator, whose box is the world's, the
``psnr`` and ``mask_iou`` of held-out views best over the prompt's variants and turns, as the
distill job measures them, with ``vs_truth.png``). Stage
models are loaded when their stage starts and released after it (``offload=reload``), so only
one stage's weights are in memory at a time.

``structure=<occupancy.npz>`` (a generate run's own, or any voxels at the pipeline's grid
resolution) skips stage 1: stage 2 fills the given voxels, as TRELLIS's variant pipelines give
a known shape a new appearance (``psnr_*`` with ``truth=`` then measure stage 2 alone).

A pipeline with stage 1 only (a generator whose stage 2 is not trained yet) gives what it can:
the run writes the occupancy and ``metrics.json``, and ends normally with a message that no
splats were made and which stage is absent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from cfd.evaluation.generation import (cameras_around, instance, structure_f_score,
                                       structure_iou, to_world, view_scores)
from cfd.systems.ground_truth import evaluate_against_shape_world, has_ground_truth
from cfd.utils.media import save_image
from cfd.visualize import write_orbit_video
from core.devices import Precision, resolve_device
from core.errors import UserError
from jobs.skeleton import RunFolder, check_output, typed
from relaxflow.conditioning import ImageConditioner, TextConditioner, load_object, preprocess_image
from relaxflow.loading import (EMBEDDED_PIPELINES, STAGE_NAMES, PipelineSpec, conditioning_model,
                               grid_resolution, read_pipeline)
from relaxflow.pipeline import Offload, Stopwatch, TrellisPipeline
from relaxflow.priors import PriorImagesConfig, check_prior_request, prior_images
from relaxflow.runner import (decode, load_voxels, sample_latents, sample_structures,
                              save_voxels)
from relaxflow.sampler import StageOverrides, with_overrides
from relaxflow.stages import guided


@dataclass
class GenerateConfig:
    job: str = "generate"
    name: str = "trellis-image"
    # A TRELLIS pipeline folder (pipeline.json + ckpts/), a repo id in the Hugging Face cache,
    # or ``embedded`` (the generator shipped in the repository, trained on the shape world).
    model: str = "microsoft/TRELLIS-image-large"
    image: Optional[str] = None  # RGBA, or RGB with ``mask``
    mask: Optional[str] = None  # white = object
    # Text pipelines take it as their condition; image pipelines lift an image of it drawn by
    # ``draw``'s 2D model.
    prompt: Optional[str] = None
    draw: PriorImagesConfig = field(default_factory=lambda: PriorImagesConfig(n_images=1))
    # The shape-world instance the image shows (<category>/<seed>): metrics against it.
    truth: Optional[str] = None
    # An occupancy.npz (coords [N, 3] at the pipeline's resolution) whose voxels stage 2 fills
    # in place of stage 1's sample.
    structure: Optional[str] = None
    # null: the pipeline's own (a conditioner folder inside it; else DINOv2-L with registers,
    # and for text its pipeline.json's, openai/clip-vit-large-patch14)
    image_cond_model: Optional[str] = None
    text_cond_model: Optional[str] = None
    seed: int = 42
    device: str = "auto"  # core.devices: auto (CUDA when present, else the CPU), cpu, cuda:<i>
    # Torso precision of the models whose checkpoints are fp16 (core.devices: auto is float16
    # on CUDA, float32 on the CPU).
    precision: Precision = Precision.auto
    # Between stages: reload (read each stage's models from disk, then free them: least memory),
    # cpu (keep them in CPU memory, on the device only for their stage) or none (keep them all
    # on the device). See relaxflow.pipeline.
    offload: Offload = Offload.reload
    output_dir: str = "outputs"
    sparse_structure_sampler: StageOverrides = field(default_factory=StageOverrides)
    slat_sampler: StageOverrides = field(default_factory=StageOverrides)
    video_frames: int = 60
    video_size: int = 256


Config = GenerateConfig


def _observation(c: GenerateConfig, spec: PipelineSpec) -> Optional[Tensor]:
    """The preprocessed image ``[3, S, S]`` of an image run, None for a prompt: the inputs are
    checked before any model loads or any file is written."""
    if (c.image is None) == (c.prompt is None):
        raise UserError("give exactly one of image=path.png or prompt=\"...\"")
    if c.mask is not None and c.image is None:
        raise UserError("mask= marks the object in image=; a prompt takes no mask")
    if c.truth is not None:
        try:
            instance(c.truth)
        except ValueError as err:
            raise UserError(f"truth: {err}") from None
    if c.image is None:
        if spec.condition == "image":  # the prompt is drawn as an image first
            if c.draw.n_images != 1:
                raise UserError(f"draw.n_images is {c.draw.n_images}: generate lifts one image")
            check_prior_request(c.prompt, c.draw, "draw",
                                "image=path.png (an image of your own)")
        return None
    spec.require("image", "generate")
    return load_object(c.image, c.mask, framing=spec.image_framing)


def _drawn_image(c: GenerateConfig, framing: str, device: torch.device
                 ) -> Tuple[np.ndarray, Tensor]:
    """The prompt drawn by ``c.draw``'s 2D model: RGBA ``[R, R, 4]`` uint8, and preprocessed
    with the pipeline's ``framing``, ``[3, S, S]``."""
    rgba = prior_images(c.prompt, c.seed, c.draw, device)[0]
    return rgba, preprocess_image(rgba, source=f"the image drawn of {c.prompt!r}",
                                  opaque_fix="try another seed", framing=framing)


def _conditions(c: GenerateConfig, image: Optional[Tensor], spec: PipelineSpec,
                device: torch.device) -> Tuple[Tensor, Tensor]:
    """(condition, negative condition) of the image or, without one, of the prompt."""
    if image is not None:
        conditioner = ImageConditioner.from_pretrained(
            conditioning_model(spec, c.image_cond_model), device)
        cond = conditioner(image[None])
        return cond, conditioner.negative(cond)
    text = TextConditioner.from_pretrained(conditioning_model(spec, c.text_cond_model), device)
    cond = text([c.prompt])
    return cond, text.negative(cond)


def _given_structure(c: GenerateConfig, spec: PipelineSpec) -> Optional[Tensor]:
    """The voxels ``[N, 4]`` of ``structure=``, checked against the pipeline's stage 2; None
    without one."""
    if c.structure is None:
        return None
    for stage in ("latent", "decode"):
        if stage not in spec.stages:
            raise UserError(f"structure= gives stage 2 its voxels: {spec.absent_stage(stage)}")
    return load_voxels(Path(c.structure), grid_resolution(spec))


def check(c: GenerateConfig) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Every input, the pipeline folder's files and the output folder, before a model loads or
    a file is written: the preprocessed image ``[3, S, S]`` of an image run (None for a
    prompt) and the voxels ``[N, 4]`` of ``structure=`` (None without one)."""
    spec = read_pipeline(c.model)
    image, structure = _observation(c, spec), _given_structure(c, spec)
    check_output(c.output_dir, c.name)
    return image, structure


def run(cfg) -> Dict[str, Any]:
    c: GenerateConfig = typed(cfg)
    start = time.perf_counter()
    # 1. every input, the output folder and the pipeline folder, before a model loads
    device = resolve_device(c.device)
    image, structure = check(c)
    pipe = TrellisPipeline.from_pretrained(c.model, device=device, precision=c.precision,
                                           offload=c.offload)
    # 2. a prompt for an image pipeline drawn as an image, the condition (its model loads
    # here), 3. the run folder
    clock = Stopwatch(device)
    drawn = None
    if image is None and pipe.spec.condition == "image":
        with clock.time("draw"):
            drawn, image = _drawn_image(c, pipe.spec.image_framing, device)
    with clock.time("condition"):
        cond, neg_cond = _conditions(c, image, pipe.spec, device)
    folder = RunFolder.create(c.output_dir, c.name, Path(c.image).stem if c.image else c.prompt,
                              cfg)
    if drawn is not None:
        save_image(torch.from_numpy(drawn).float() / 255, folder.path / "input.png")
    # 4. stage 1 (or the given voxels), its voxels written; stage 2 and the decoding when the
    # pipeline has them, one stage's models at a time
    generators = {"plain": torch.Generator().manual_seed(c.seed)}
    if structure is None:
        coords, resolution = sample_structures(
            pipe, lambda flow: {"plain": guided(with_overrides(pipe.sampler("structure"),
                                                               c.sparse_structure_sampler),
                                                cond, neg_cond, True)},
            generators, device, clock)
    else:
        coords = {"plain": structure.to(device)}
        resolution = grid_resolution(pipe.spec)
    save_voxels(folder.path, coords["plain"], resolution)
    voxels = len(coords["plain"])
    truth = None if c.truth is None else instance(c.truth)
    scores = {} if truth is None else {
        "structure_iou": structure_iou(coords["plain"][:, 1:], resolution, truth),
        "structure_f_score": structure_f_score(coords["plain"][:, 1:], resolution, truth)}
    absent = [STAGE_NAMES[stage] for stage in ("latent", "decode") if stage not in pipe.stages]
    if absent:
        return folder.finish({**clock.seconds, "wall_s": time.perf_counter() - start,
                              "voxels": voxels, "stages": list(pipe.stages),
                              "device": str(device), **scores},
                             f"{voxels} voxels; wrote occupancy.npz only: the pipeline "
                             f"{pipe.spec.root} has no {' and no '.join(absent)}, so no splats")
    latents = sample_latents(
        pipe, {"plain": guided(with_overrides(pipe.sampler("latent"), c.slat_sampler), cond,
                               neg_cond, True)}, coords, generators, clock)
    with clock.time("decode"):
        splats = decode(pipe, latents)[0]["plain"]
    # 5. the files, and metrics.json
    splats.save_ply(folder.path / "splats.ply")
    write_orbit_video(splats, folder.path / "orbit.mp4", n_frames=c.video_frames,
                      size=c.video_size, distance=2.0, background=1.0)
    if truth is not None:
        around = view_scores(to_world(splats), truth, cameras_around().to(splats.device))
        scores.update({f"{key}_around": float(np.median(values))
                       for key, values in around.items()})
    elif c.prompt is not None and c.model in EMBEDDED_PIPELINES and has_ground_truth(c.prompt):
        scores.update(evaluate_against_shape_world(to_world(splats), c.prompt, background=1.0,
                                                   comparison_path=folder.path / "vs_truth.png"))
        print(f"held-out PSNR {scores['psnr']:.2f} dB, mask IoU {scores['mask_iou']:.3f} "
              f"(best: {scores['variant']} rotated {scores['rotation_deg']:.0f} deg)")
    return folder.finish({**clock.seconds, "wall_s": time.perf_counter() - start,
                          "voxels": voxels, "splats": len(splats),
                          "device": str(device), **scores},
                         f"{voxels} voxels, {len(splats)} splats; wrote splats.ply, orbit.mp4 "
                         "and occupancy.npz")
