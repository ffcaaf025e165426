"""The ``refine`` job: both paths in one process on one device.

    python run.py refine --config configs/relaxflow-cfd.yaml image=obs.png mask=mask.png \
        prompt="a chair" [priors=[a.png,b.png,c.png]]

RelaxFlow completes the occluded object (the fast path); its splats, rescaled to the
distillation's scene size and turned so that the observation faces CFD's front (azimuth 0, where
the prompts say "front view"), initialise CFD (the slow path), and each splat's visibility from
the observation camera limits how far CFD may move it (``init.lock_visible``): what the image
showed stays, what it hid is refined by the 2D prior. Writes ``<run>/relaxflow-*/...`` (the
completion, as the ``relaxflow`` job), ``<run>/<distill name>/...`` (the refined scene, as the
``distill`` job; resumable on its own with ``--resume``) and ``<run>/metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from cfd.config import save_config, to_object
from cfd.systems.distill import DistillConfig, InitConfig
from cfd.utils.runtime import make_run_dir, write_json

from .complete import RelaxFlowConfig
from .generate import resolve_device


def _refine_defaults() -> DistillConfig:
    # the completion is the start: splats from its file, no densification (the visibility
    # belongs to those splats)
    cfg = DistillConfig(name="cfd-refine", init=InitConfig(kind="ply", fit_radius=0.6,
                                                           lock_visible=True))
    cfg.densify.enabled = False
    return cfg


@dataclass
class RefineConfig:
    job: str = "refine"
    name: str = "relaxflow-cfd"
    output_dir: str = "outputs"
    device: str = "auto"  # both paths run here: CUDA when present, else the CPU
    # The inputs, handed to both paths (the prompt names the hidden part for RelaxFlow's
    # prior images and is CFD's text prompt). Each may be set here or as relaxflow.<name>, not
    # both.
    image: Optional[str] = None
    mask: Optional[str] = None
    prompt: Optional[str] = None
    priors: List[str] = field(default_factory=list)
    relaxflow: RelaxFlowConfig = field(default_factory=RelaxFlowConfig)
    distill: DistillConfig = field(default_factory=_refine_defaults)


SHARED_INPUTS = ("image", "mask", "prompt", "priors")


def _relaxflow_inputs(c: RefineConfig) -> Dict[str, Any]:
    """RelaxFlow's inputs: each from the top level or, when only there, from ``relaxflow``."""
    inputs = {}
    for key in SHARED_INPUTS:
        top, nested = getattr(c, key), getattr(c.relaxflow, key)
        if top not in (None, []) and nested not in (None, []):
            raise ValueError(f"{key} is set twice, as {key}= and relaxflow.{key}=: set it once "
                             f"({key}= hands it to both paths)")
        inputs[key] = nested if top in (None, []) else top
    return inputs


def _check_inputs(c: RelaxFlowConfig) -> None:
    """Read what RelaxFlow reads first, the way it reads them (the observation, the pipeline's
    ``pipeline.json``, the prior images), so that a missing or unusable one is an error before
    the run folder exists."""
    from .complete import PRIOR_FIX
    from .conditioning import load_object
    from .loading import read_pipeline

    load_object(c.image, c.mask)
    read_pipeline(c.model).require("image", "relaxflow")
    for prior in c.priors:
        load_object(prior, opaque_fix=PRIOR_FIX)


def run(cfg) -> Dict[str, Any]:
    from cfd.systems import distill

    from . import complete

    c: RefineConfig = to_object(cfg)
    inputs = _relaxflow_inputs(c)
    if inputs["prompt"] is None:
        raise ValueError('give the prompt: prompt="a chair" (what the hidden part should be; '
                         "CFD distils the same text)")
    if not c.distill.init.lock_visible:
        raise ValueError("the refine job keeps what the observation showed: leave "
                         "distill.init.lock_visible=true (run the distill job on the "
                         "completion's splats.ply to refine everything)")
    device = resolve_device(c.device)
    relaxflow_cfg = OmegaConf.merge(cfg.relaxflow, {"device": str(device), **inputs})
    distill_cfg = OmegaConf.merge(cfg.distill, {
        "device": str(device), "prompt_processor": {"prompt": inputs["prompt"]},
        "init": {"kind": "ply", "turn_deg": c.distill.init.turn_deg - c.relaxflow.camera.azimuth}})
    # both paths' settings and RelaxFlow's inputs are checked before the run folder exists and
    # RelaxFlow runs
    complete.check_settings(to_object(relaxflow_cfg))
    distill.check_settings(to_object(distill_cfg))
    _check_inputs(to_object(relaxflow_cfg))
    image = inputs["image"]
    run_dir = make_run_dir(c.output_dir, c.name, Path(image).stem)
    save_config(cfg, run_dir / "config.yaml")
    completion = complete.run(OmegaConf.merge(relaxflow_cfg, {"output_dir": str(run_dir)}))
    refined = distill.run(OmegaConf.merge(distill_cfg, {
        "output_dir": str(run_dir),
        "init": {"path": str(Path(completion["run_dir"]) / "splats.ply")}}))
    result = {"relaxflow": completion, "cfd": refined}
    write_json(run_dir / "metrics.json", result)
    print(f"refined the completion of {image}; results in {run_dir}")
    return result
