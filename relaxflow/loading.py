"""TRELLIS pipeline folders: ``pipeline.json`` plus ``ckpts/<model>.json`` + ``.safetensors``.

A folder is a local path or a Hugging Face repo id already in the local cache (nothing is ever
downloaded; :class:`guidance.loading.ModelWeightsNotFound` says how to provide the weights).
Each model is built on the meta device from its json's ``name`` and ``args`` and its weights
are assigned straight from the safetensors file, cast to the model's dtypes, so a model never
exists twice in memory. Keys must match exactly; a mismatch lists what is missing
and what is unexpected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from guidance.loading import ModelWeightsNotFound, hf_cache_dir, resolve_model_path

from .models import build
from .sampler import FlowEulerSampler

PIPELINE_FILE = "pipeline.json"


def resolve_pipeline_folder(path_or_repo: Union[str, os.PathLike],
                            option: str = "model") -> Path:
    """A local folder holding ``pipeline.json``, or a cached Hugging Face snapshot of a repo
    (``microsoft/TRELLIS-image-large``); :class:`ModelWeightsNotFound` otherwise."""
    return resolve_model_path(path_or_repo, index_file=PIPELINE_FILE, option=option)


def _checkpoint_stem(root: Path, ref: str) -> Path:
    """``root/ref`` without extension, or, for ``owner/repo/sub/path`` references to another
    repo (text pipelines borrow the image pipeline's decoders), that repo's cached snapshot."""
    local = root / ref
    if local.with_suffix(".json").is_file():
        return local
    parts = ref.split("/")
    if len(parts) > 2 and not (root / parts[0]).exists():
        repo = "/".join(parts[:2])
        return resolve_model_path(repo, index_file="/".join(parts[2:]) + ".json",
                                  option="model") / "/".join(parts[2:])
    raise ModelWeightsNotFound(str(root), hf_cache_dir(),
                               f"the pipeline's checkpoint {local}.json is missing", "model")


def key_report(model: nn.Module, keys) -> Optional[str]:
    """A readable mismatch between a model's state dict keys and a checkpoint's, or None."""
    expected, found = set(model.state_dict()), set(keys)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return None

    def listing(names):
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        return f"{len(names)}: {shown}" if names else "none"

    return f"missing keys {listing(missing)}; unexpected keys {listing(unexpected)}"


def load_model(root: Union[str, Path], ref: str, device: Union[str, torch.device] = "cpu",
               half_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build ``root/ref.json``'s model and load ``root/ref.safetensors`` into it, strictly."""
    from safetensors.torch import load_file

    stem = _checkpoint_stem(Path(root), ref)
    spec = json.loads(stem.with_suffix(".json").read_text())
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise ModelWeightsNotFound(str(root), hf_cache_dir(),
                                   f"the checkpoint weights {weights} are missing", "model")
    device = torch.device(device)
    model = build(spec["name"], spec["args"], device="meta", half_dtype=half_dtype)
    state = load_file(str(weights), device=str(device))
    mismatch = key_report(model, state)
    if mismatch:
        raise ValueError(f"{weights} does not fit {spec['name']}({spec['args']}): {mismatch}")
    like = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != like[key].shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, "
                             f"{spec['name']} expects {tuple(like[key].shape)}")
        state[key] = tensor.to(like[key].dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_model(model: nn.Module, name: str, args: Dict[str, Any], root: Union[str, Path],
               ref: str) -> None:
    """Write ``root/ref.json`` and ``root/ref.safetensors`` in the released layout."""
    from safetensors.torch import save_file

    stem = Path(root) / ref
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"name": name, "args": args}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(stem.with_suffix(".safetensors")))


SAMPLERS = ("FlowEulerSampler", "FlowEulerCfgSampler", "FlowEulerGuidanceIntervalSampler")
# what the released samplers use for a parameter that pipeline.json leaves out
SAMPLE_DEFAULTS = {"steps": 50, "rescale_t": 1.0, "cfg_strength": 3.0, "cfg_interval": (0.0, 1.0)}


def sampler_from_spec(spec: Dict[str, Any]) -> FlowEulerSampler:
    """A ``pipeline.json`` sampler entry ``{name, args, params}`` as a :class:`FlowEulerSampler`."""
    name, params = spec["name"], {**SAMPLE_DEFAULTS, **spec.get("params", {})}
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    if name == "FlowEulerSampler":
        params["cfg_strength"] = 0.0
    if name != "FlowEulerGuidanceIntervalSampler":  # guidance (if any) at every step
        params["cfg_interval"] = SAMPLE_DEFAULTS["cfg_interval"]
    params["cfg_interval"] = tuple(params["cfg_interval"])
    return FlowEulerSampler(sigma_min=spec.get("args", {}).get("sigma_min", 1e-5), **params)


def _a(condition: str) -> str:
    """``condition`` with its article: "an image", "a text"."""
    return ("an " if condition[0] in "aeiou" else "a ") + condition


CONDITION_INPUTS = {"image": "image=path.png", "text": 'prompt="..."'}
RELEASED_PIPELINES = {"image": "microsoft/TRELLIS-image-large",
                      "text": "microsoft/TRELLIS-text-xlarge"}
# the released pipeline classes and what they are conditioned on
PIPELINE_CONDITIONS = {"TrellisImageTo3DPipeline": "image", "TrellisTextTo3DPipeline": "text"}


@dataclass
class PipelineSpec:
    """What ``pipeline.json`` says: model references, samplers, latent normalisation, what the
    pipeline is conditioned on (``condition``: ``"image"`` or ``"text"``) and the conditioning
    model."""

    root: Path
    name: str
    models: Dict[str, str]
    condition: str
    samplers: Dict[str, FlowEulerSampler] = field(default_factory=dict)
    slat_normalization: Optional[Dict[str, Any]] = None
    cond_model: Optional[str] = None

    def require(self, condition: str, job: str) -> None:
        """A clear error unless the pipeline is conditioned on ``condition`` (``"image"`` or
        ``"text"``); it only reads ``pipeline.json``, so it runs before any model loads."""
        if condition == self.condition:
            return
        raise ValueError(
            f"the {job} job needs {_a(condition)}-to-3D pipeline for "
            f"{CONDITION_INPUTS[condition]}, but model={self.root} is "
            f"{_a(self.condition)}-to-3D pipeline ({self.name or PIPELINE_FILE}), which takes "
            f"{CONDITION_INPUTS[self.condition]}: use {_a(condition)} pipeline "
            f"(e.g. model={RELEASED_PIPELINES[condition]})")


def _condition(root: Path, name: str, args: Dict[str, Any]) -> str:
    """``"image"`` or ``"text"``: from the pipeline's class name, else from which conditioning
    model it names."""
    if name in PIPELINE_CONDITIONS:
        return PIPELINE_CONDITIONS[name]
    named = [kind for kind in ("image", "text") if f"{kind}_cond_model" in args]
    if len(named) != 1:
        raise ValueError(f"{root}/{PIPELINE_FILE} does not say whether the pipeline takes images "
                         f"or text: its name {name!r} is not one of "
                         f"{', '.join(PIPELINE_CONDITIONS)} and it names "
                         f"{'both' if named else 'neither'} of image_cond_model and "
                         "text_cond_model")
    return named[0]


def read_pipeline(path_or_repo: Union[str, os.PathLike]) -> PipelineSpec:
    root = resolve_pipeline_folder(path_or_repo)
    spec = json.loads((root / PIPELINE_FILE).read_text())
    args = spec.get("args", spec)
    name = spec.get("name", "")
    condition = _condition(root, name, args)
    samplers = {key: sampler_from_spec(args[key])
                for key in ("sparse_structure_sampler", "slat_sampler") if key in args}
    return PipelineSpec(root=root, name=name, models=dict(args["models"]), condition=condition,
                        samplers=samplers, slat_normalization=args.get("slat_normalization"),
                        cond_model=args.get(f"{condition}_cond_model"))
