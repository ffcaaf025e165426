"""The ``refine`` job: both paths in one process on one device.

    python run.py refine --config configs/relaxflow-cfd.yaml image=obs.png mask=mask.png \
        prompt="a chair" [priors=[a.png,b.png,c.png]]
    python run.py refine --config configs/refine-embedded.yaml prompt="a chair"

With an observation, RelaxFlow completes the occluded object (the fast path); its splats,
rescaled to the distillation's scene size and turned so that the observation faces CFD's front
(azimuth 0, where the prompts say "front view"; ``face_observation: false`` keeps the generator's
frame), initialise CFD (the slow path), and each splat's visibility from the observation camera
limits how far CFD may move it (``splats.init.lock_visible``): what the image showed stays, what
it hid is refined by the 2D prior.

With a prompt only, the feed-forward generator's output is refined: the ``generate`` job (the
``generate:`` section) lifts an image of the prompt drawn by its 2D model, and CFD refines all of
it (nothing was observed, so nothing is locked and nothing turned).

Writes ``<run>/relaxflow-*/...`` or ``<run>/generate-*/...`` (the start, as that job),
``<run>/<distill name>/...`` (the refined scene, as the ``distill`` job; resumable on its own
with ``--resume``), and at the top, where a user and the study tool look first, the refined
``splats.ply`` and ``orbit.mp4`` and ``metrics.json``: the refined scene's metrics, the whole
run's ``wall_s``, and each path's own metrics under ``start`` and ``cfd``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from cfd.systems.prior import check_guidance_model
from cfd.systems.scenes import InitConfig, InitKind, SplatSceneConfig
from core.devices import resolve_device
from core.errors import UserError
from jobs import distill, generate, relaxflow
from jobs.distill import DistillConfig
from jobs.generate import GenerateConfig
from jobs.relaxflow import RelaxFlowConfig
from jobs.skeleton import RunFolder, check_output, nested, typed


def _refine_defaults() -> DistillConfig:
    # the completion is the start: splats from its file, no densification (the visibility
    # belongs to those splats)
    splats = SplatSceneConfig(init=InitConfig(kind=InitKind.ply, fit_radius=0.6,
                                              lock_visible=True))
    splats.densify.enabled = False
    return DistillConfig(name="cfd-refine", splats=splats)


@dataclass
class RefineConfig:
    job: str = "refine"
    name: str = "relaxflow-cfd"
    output_dir: str = "outputs"
    device: str = "auto"  # both paths run here: CUDA when present, else the CPU
    # The inputs, handed to both paths (the prompt names the hidden part for RelaxFlow's
    # prior images and is CFD's text prompt). Each may be set here or as relaxflow.<name>, not
    # both. Without an image, the prompt is generated (``generate``) and then refined.
    image: Optional[str] = None
    mask: Optional[str] = None
    prompt: Optional[str] = None
    priors: List[str] = field(default_factory=list)
    # null: each path's own seed; set: both paths' (the start's and CFD's)
    seed: Optional[int] = None
    relaxflow: RelaxFlowConfig = field(default_factory=RelaxFlowConfig)
    # the start of a prompt-only run (its prompt and seed come from the top level)
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(name="generate"))
    distill: DistillConfig = field(default_factory=_refine_defaults)
    # Turn the completion about z so that the observed side faces CFD's front (azimuth 0, where
    # the prompts say "front view"). false keeps the generator's own frame: the embedded
    # generator's is the shape world's, whose front is already the prompts' front.
    face_observation: bool = True


Config = RefineConfig

SHARED_INPUTS = ("image", "mask", "prompt", "priors")


def _relaxflow_inputs(c: RefineConfig) -> Dict[str, Any]:
    """RelaxFlow's inputs: each from the top level or, when only there, from ``relaxflow``."""
    inputs = {}
    for key in SHARED_INPUTS:
        top, nested = getattr(c, key), getattr(c.relaxflow, key)
        if top not in (None, []) and nested not in (None, []):
            raise UserError(f"{key} is set twice, as {key}= and relaxflow.{key}=: set it once "
                            f"({key}= hands it to both paths)")
        inputs[key] = nested if top in (None, []) else top
    return inputs


def run(cfg) -> Dict[str, Any]:
    c: RefineConfig = typed(cfg)
    start_clock = time.perf_counter()
    # 1. both paths' settings and inputs, before anything loads or is written
    inputs = _relaxflow_inputs(c)
    if inputs["prompt"] is None:
        raise UserError('give the prompt: prompt="a chair" (what the hidden part should be; '
                        "CFD distils the same text)")
    observed = inputs["image"] is not None
    if not observed and (inputs["mask"] is not None or inputs["priors"]):
        raise UserError("mask= and priors= belong to an observation (image=); a prompt alone "
                        "is generated, then refined: drop them or give image=")
    if observed and not c.distill.splats.init.lock_visible:
        raise UserError("the refine job keeps what the observation showed: leave "
                        "distill.splats.init.lock_visible=true (run the distill job on the "
                        "completion's splats.ply to refine everything)")
    device = str(resolve_device(c.device))
    check_output(c.output_dir, c.name)
    seeds = {} if c.seed is None else {"seed": c.seed}
    turn = c.relaxflow.camera.azimuth if observed and c.face_observation else 0.0
    init = replace(c.distill.splats.init, kind=InitKind.ply, lock_visible=observed,
                   turn_deg=c.distill.splats.init.turn_deg - turn)
    distill_cfg = replace(
        c.distill, device=device, **seeds,
        prompt_processor=replace(c.distill.prompt_processor, prompt=inputs["prompt"]),
        splats=replace(c.distill.splats, init=init))
    with nested("distill."):
        # the start's file does not exist yet: the settings are checked with a stand-in
        distill.check(replace(distill_cfg, splats=replace(distill_cfg.splats,
                                                          init=replace(init, path="<start>"))))
    if observed:
        start_cfg, start_job, section = (replace(c.relaxflow, device=device, **inputs, **seeds),
                                         relaxflow, "relaxflow.")
    else:
        start_cfg, start_job, section = (replace(c.generate, device=device,
                                                 prompt=inputs["prompt"], **seeds),
                                         generate, "generate.")
    with nested(section):
        start_job.check(start_cfg)
    with nested("distill."):
        check_guidance_model(distill_cfg.guidance)
    # 2. the run folder; 3. the start in it (RelaxFlow's completion or the generator's output);
    # 4. CFD from the start; 5. the refined scene at the top
    tag = Path(inputs["image"]).stem if observed else inputs["prompt"]
    folder = RunFolder.create(c.output_dir, c.name, tag, cfg)
    start = start_job.run(replace(start_cfg, output_dir=str(folder.path)))
    refined = distill.run(replace(
        distill_cfg, output_dir=str(folder.path),
        splats=replace(distill_cfg.splats, init=replace(
            init, path=str(Path(start["run_dir"]) / "splats.ply")))))
    for name in ("splats.ply", "orbit.mp4"):
        shutil.copy2(Path(refined["run_dir"]) / name, folder.path / name)
    scene_metrics = {k: v for k, v in refined.items() if k not in ("run_dir", "wall_s")}
    what = f"the completion of {inputs['image']}" if observed else \
        f"the generated {inputs['prompt']!r}"
    return folder.finish({**scene_metrics, "wall_s": time.perf_counter() - start_clock,
                          "start": start, "cfd": refined}, f"refined {what}")
