"""TRELLIS pipeline folders: ``pipeline.json`` plus ``ckpts/<model>.json`` + ``.safetensors``.

A folder is a short id of a pipeline shipped in the repository (:data:`EMBEDDED_PIPELINES`:
``embedded``, the generator trained on the shape world), a local path or a Hugging Face repo id
already in the local cache (nothing is ever downloaded;
:class:`guidance.loading.ModelWeightsNotFound` says how to provide the weights).
Each model is built on the meta device from its json's ``name`` and ``args`` and its weights
are assigned straight from the safetensors file, cast to the model's dtypes, so a model never
exists twice in memory. Keys must match exactly; a mismatch lists what is missing
and what is unexpected.

A damaged file (``pipeline.json`` or a model's json that is no JSON object, a safetensors file
cut short) is a :class:`PipelineFileError` naming it; a file missing from a local folder is a
:class:`PipelineFileMissing` naming it (a folder of the user's is not downloaded again; a cached
snapshot's error names the hub repo to download). :func:`check_pipeline_files` checks every
file the folder's stages read, headers only, before a job writes anything.

A folder has the stages (:data:`STAGES`) whose models ``pipeline.json`` names: all three for a
released pipeline, stage 1 only for a generator whose later stages are not trained yet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from core.errors import UserError
from guidance.loading import ModelWeightsNotFound, hf_cache_dir, resolve_model_path

from .conditioning import FRAMINGS
from .models import build
from .sampler import FlowEulerSampler

PIPELINE_FILE = "pipeline.json"
# Pipelines shipped in the repository, by short id: ``model: embedded``. A short id wins over a
# folder of the same name in the working directory (give that one as ./embedded).
EMBEDDED_PIPELINES = {"embedded": Path(__file__).resolve().parent / "embedded"}
# The conditioning model of a pipeline whose pipeline.json names none that can be loaded here
# (the released image pipelines name "dinov2_vitl14_reg", a torch.hub name).
DEFAULT_COND_MODELS = {"image": "facebook/dinov2-with-registers-large",
                       "text": "openai/clip-vit-large-patch14"}
RECOPY = "re-download or re-copy it"

# The models each stage of a pipeline runs, by their pipeline.json keys, in running order.
STAGES = {
    "structure": ("sparse_structure_flow_model", "sparse_structure_decoder"),
    "latent": ("slat_flow_model",),
    "decode": ("slat_decoder_gs",),
}
# what each stage is, for messages ("the pipeline has no ...")
STAGE_NAMES = {"structure": "stage 1 (the sparse structure)",
               "latent": "stage 2 (the structured latent)", "decode": "Gaussian decoder"}


class PipelineFileError(UserError):
    """A file of a TRELLIS pipeline folder that is damaged, or does not hold what it must;
    the message names the file and the fix."""


class PipelineFileMissing(ModelWeightsNotFound):
    """A file that ``pipeline.json`` refers to is missing from a local pipeline folder. Unlike
    :class:`ModelWeightsNotFound`'s, the message suggests no download of the folder (a local
    path is nothing to download): it names the file to put back."""

    def __init__(self, root: Path, reason: str):
        self.model_id, self.searched = str(root), ""
        FileNotFoundError.__init__(
            self, f"the pipeline folder {root} is incomplete: {reason}; copy that file into it "
            "again from where the folder came from (the machine it was copied from, or a "
            "download of the same model)")


def _hub_repo(path: Path) -> Optional[str]:
    """``owner/name`` when ``path`` lies in a Hugging Face cache snapshot
    (``.../models--owner--name/snapshots/<revision>/...``), else None."""
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            return folder.parent.parent.name[len("models--"):].replace("--", "/")
    return None


def _missing(root: Path, reason: str) -> ModelWeightsNotFound:
    """The error for a file ``pipeline.json`` names that is not there: a cached snapshot's says
    how to download its repo, a local folder's names the file."""
    repo = _hub_repo(root)
    if repo is not None:
        return ModelWeightsNotFound(repo, hf_cache_dir(),
                                    f"{reason} (in the cached snapshot {root}: an incomplete "
                                    "download?)", "model")
    return PipelineFileMissing(root, reason)


_JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def _read_json_object(path: Path) -> Dict[str, Any]:
    """``path``'s JSON object; a :class:`PipelineFileError` naming it when it is not one."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise PipelineFileError(f"{path} is not a JSON text file (byte {err.start} is not UTF-8 "
                                f"text): the file is damaged; {RECOPY}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PipelineFileError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, "
                                f"column {err.colno}): the file is damaged or cut short; "
                                f"{RECOPY}") from None
    if not isinstance(data, dict):
        raise PipelineFileError(f"{path} must hold a JSON object ({{...}}), not "
                                f"{_JSON_TYPES.get(type(data), type(data).__name__)}: the file "
                                f"is damaged or not the one expected; {RECOPY}")
    return data


def _model_spec(path: Path) -> Dict[str, Any]:
    """A model's json, ``{"name": ..., "args": {...}}``, checked."""
    spec = _read_json_object(path)
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("args"), dict):
        raise PipelineFileError(f"{path} must hold the model's \"name\" (text) and \"args\" (an "
                                f"object), as TRELLIS's checkpoint files do: it is damaged or "
                                f"not a model file; {RECOPY}")
    return spec


def _damaged_weights(weights: Path, err: Exception) -> PipelineFileError:
    problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    return PipelineFileError(f"{weights} is damaged or cut short ({problem}): {RECOPY} (a "
                             "download or copy that stopped early leaves such a file)")


def resolve_pipeline_folder(path_or_repo: Union[str, os.PathLike],
                            option: str = "model") -> Path:
    """The shipped pipeline of a short id (``embedded``), a local folder holding
    ``pipeline.json``, or a cached Hugging Face snapshot of a repo
    (``microsoft/TRELLIS-image-large``); :class:`ModelWeightsNotFound` otherwise."""
    shipped = EMBEDDED_PIPELINES.get(os.fspath(path_or_repo))
    if shipped is None:
        return resolve_model_path(path_or_repo, index_file=PIPELINE_FILE, option=option)
    if not (shipped / PIPELINE_FILE).is_file():
        folder = shipped.relative_to(shipped.parents[1])
        raise UserError(f"{option}={path_or_repo} names the generator shipped in the repository, "
                        f"but {shipped / PIPELINE_FILE} is missing: this checkout has no trained "
                        f"generator yet (`python run.py ship-generator <training runs>` puts one "
                        f"in {folder}; if `git ls-files {folder}` lists it, restore it with "
                        f"`git checkout -- {folder}`), or give a pipeline folder as {option}=")
    return shipped


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
    raise _missing(root, f"the pipeline's checkpoint {local}.json is missing")


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


def _model_files(root: Path, ref: str):
    """``(stem, its json's spec, its weights file)`` of ``root/ref``; errors name the file that
    is missing or damaged."""
    stem = _checkpoint_stem(root, ref)
    spec = _model_spec(stem.with_suffix(".json"))
    weights = stem.with_suffix(".safetensors")
    if not weights.is_file():
        raise _missing(root, f"the checkpoint weights {weights} are missing")
    return stem, spec, weights


def model_args(spec: "PipelineSpec", key: str) -> Dict[str, Any]:
    """The constructor arguments of the pipeline's model ``key`` (its json file; no weights)."""
    return _model_files(spec.root, spec.models[key])[1]["args"]


def grid_resolution(spec: "PipelineSpec") -> int:
    """The side of the voxel grid stage 2 fills (its flow model's ``resolution``; no weights)."""
    return model_args(spec, "slat_flow_model")["resolution"]


def load_model(root: Union[str, Path], ref: str, device: Union[str, torch.device] = "cpu",
               half_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build ``root/ref.json``'s model and load ``root/ref.safetensors`` into it, strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, spec, weights = _model_files(Path(root), ref)
    device = torch.device(device)
    model = build(spec["name"], spec["args"], device="meta", half_dtype=half_dtype)
    try:
        state = load_file(str(weights), device=str(device))
    except SafetensorError as err:
        raise _damaged_weights(weights, err) from None
    mismatch = key_report(model, state)
    if mismatch:
        raise UserError(f"{weights} does not fit {spec['name']}({spec['args']}): {mismatch}")
    like = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != like[key].shape:
            raise UserError(f"{weights}: {key} has shape {tuple(tensor.shape)}, "
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
        raise UserError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
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
    stages: Tuple[str, ...] = tuple(STAGES)  # those whose models pipeline.json names
    # how an image is cut for the conditioner (relaxflow.conditioning.FRAMINGS): pipeline.json's
    # "image_framing", absent in a released pipeline ("object", TRELLIS's crop)
    image_framing: str = "object"

    def absent_stage(self, stage: str) -> UserError:
        """The error for a stage this pipeline has no models for, naming it and the folder."""
        return UserError(f"the pipeline {self.root} has no {STAGE_NAMES[stage]}, the '{stage}' "
                         f"stage: its {PIPELINE_FILE} names no "
                         f"{' or '.join(repr(key) for key in STAGES[stage])} model (its stages: "
                         f"{', '.join(self.stages)}); use a pipeline with every stage (e.g. "
                         f"model={RELEASED_PIPELINES[self.condition]})")

    def require_stages(self, job: str) -> None:
        """A clear error unless the pipeline has every stage; it only reads ``pipeline.json``,
        so it runs before any model loads."""
        for stage in STAGES:
            if stage not in self.stages:
                raise UserError(f"the {job} job needs every stage of the pipeline: "
                                f"{self.absent_stage(stage)}")

    def require(self, condition: str, job: str) -> None:
        """A clear error unless the pipeline is conditioned on ``condition`` (``"image"`` or
        ``"text"``); it only reads ``pipeline.json``, so it runs before any model loads."""
        if condition == self.condition:
            return
        raise UserError(
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
        raise UserError(f"{root}/{PIPELINE_FILE} does not say whether the pipeline takes images "
                        f"or text: its name {name!r} is not one of "
                        f"{', '.join(PIPELINE_CONDITIONS)} and it names "
                        f"{'both' if named else 'neither'} of image_cond_model and "
                        "text_cond_model")
    return named[0]


def named_stages(path: Path, models: Dict[str, str]) -> Tuple[str, ...]:
    """The stages whose models ``models`` (``pipeline.json``'s) names, in running order. Stage 1
    is needed (a pipeline without it generates nothing); a stage with some of its models named
    and others not is a damaged file; both are a :class:`PipelineFileError` naming the model."""
    stages = []
    for stage, keys in STAGES.items():
        missing = [key for key in keys if key not in models]
        if missing and (stage == "structure" or len(missing) < len(keys)):
            raise PipelineFileError(f"{path} names no '{missing[0]}' model (the {stage} stage "
                                    "needs it): the file is damaged or not a TRELLIS "
                                    f"pipeline's; {RECOPY}")
        if not missing:
            stages.append(stage)
    return tuple(stages)


def read_pipeline(path_or_repo: Union[str, os.PathLike]) -> PipelineSpec:
    root = resolve_pipeline_folder(path_or_repo)
    path = root / PIPELINE_FILE
    spec = _read_json_object(path)
    args = spec.get("args", spec)  # released files nest everything under "args"
    name = spec.get("name", "")
    models = args.get("models") if isinstance(args, dict) else None
    if not isinstance(models, dict) or not models or not all(
            isinstance(v, str) for v in models.values()):
        raise PipelineFileError(
            f"{path} names no models: a TRELLIS pipeline.json holds \"args\": {{\"models\": "
            "{...}} mapping each model to its checkpoint (\"sparse_structure_flow_model\": "
            f"\"ckpts/...\", ...); the file is damaged or not a TRELLIS pipeline's: {RECOPY}")
    if not isinstance(name, str):
        raise PipelineFileError(f"{path}: \"name\" must be text, the pipeline's class name")
    condition = _condition(root, name, args)
    samplers = {}
    for key in ("sparse_structure_sampler", "slat_sampler"):
        if key in args:
            try:
                samplers[key] = sampler_from_spec(args[key])
            except (KeyError, TypeError, AttributeError) as err:
                raise PipelineFileError(f"{path}: {key} is not a sampler entry "
                                        f"({{\"name\", \"args\", \"params\"}}; "
                                        f"{type(err).__name__}: {err})") from None
    framing = args.get("image_framing", "object")
    if framing not in FRAMINGS:
        raise PipelineFileError(f"{path}: image_framing is {framing!r}, not one of "
                                f"{', '.join(FRAMINGS)} (how the conditioner's images are cut; "
                                f"absent means 'object', TRELLIS's): {RECOPY}")
    return PipelineSpec(root=root, name=name, models=dict(models), condition=condition,
                        samplers=samplers, slat_normalization=args.get("slat_normalization"),
                        cond_model=args.get(f"{condition}_cond_model"),
                        stages=named_stages(path, models), image_framing=framing)


def conditioning_model(spec: PipelineSpec, override: Optional[str] = None) -> str:
    """The conditioning model a pipeline runs with: ``override`` when given; else the one its
    ``pipeline.json`` names, when that is a transformers folder inside the pipeline (the
    embedded generator's ``dinov2_tiny_reg``) or, for text, a hub id; else
    :data:`DEFAULT_COND_MODELS`."""
    if override is not None:
        return override
    if spec.cond_model:
        inside = spec.root / spec.cond_model
        if (inside / "config.json").is_file():
            return str(inside)
        if spec.condition == "text":
            return spec.cond_model
    return DEFAULT_COND_MODELS[spec.condition]


def check_pipeline_files(path_or_repo: Union[str, os.PathLike],
                         keys: Optional[Sequence[str]] = None) -> PipelineSpec:
    """Check, before anything runs or is written, every file the pipeline's stages read:
    ``pipeline.json``, and each model's json and safetensors *header* (cheap: no weights are
    read, but a file cut short anywhere is found, its size not fitting the header). ``keys``:
    the models to check, by default those of the stages the folder has. Returns the
    pipeline's spec; raises what loading the stages would, naming the file: a
    :class:`PipelineFileError` for a damaged file, a :class:`PipelineFileMissing` (a local
    folder) or :class:`ModelWeightsNotFound` (a cached snapshot) for a missing one."""
    from safetensors import SafetensorError, safe_open

    spec = read_pipeline(path_or_repo)
    if keys is None:
        keys = [key for stage in spec.stages for key in STAGES[stage]]
    for key in keys:
        if key not in spec.models:
            raise PipelineFileError(f"{spec.root / PIPELINE_FILE} names no '{key}' model (a "
                                    "stage needs it): the file is damaged or not a complete "
                                    f"TRELLIS pipeline's; {RECOPY}")
        _, _, weights = _model_files(spec.root, spec.models[key])
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise _damaged_weights(weights, err) from None
    return spec
