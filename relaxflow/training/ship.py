"""A trained generator made ready to ship: its pipeline folder in float16, with a manifest.

    python run.py ship-generator <training run> [<training run> ...] [--to relaxflow/embedded]
    python run.py ship-generator relaxflow/embedded <training run>     (a shipped one, updated)

The runs' ``pipeline/`` folders are laid over one another in the order named, a later run's
file replacing an earlier one's and its ``pipeline.json`` entries (models, samplers) replacing
the earlier's: so a stage-2 run (whose folder holds both stages, stage 1 as it was when stage 2
trained) followed by a stage-1 run continued since ships the continued structure flow with stage
2. A shipped folder (one with ``MANIFEST.json``) may stand for the runs it was made of: its
files are a layer as a run's pipeline is, and its manifest's runs come first in the new one's
(so a session without the old run folders can ship a new flow over the shipped generator).
Every layer's conditioner must hold the same weights (compared in float16, as shipped): stage
2's flow was trained on its stage-1 folder's conditioner, and a continuation that trained it on
needs stage 2 trained again.
The result is written in the released layout: ``pipeline.json``, ``ckpts/<model>.json`` and
``.safetensors`` (floating-point weights cast to float16, as TRELLIS releases them; the loader
casts them to the model's dtypes), the conditioner as a transformers folder (its
``model.safetensors`` in float16 too; its ``config.json`` keeps float32, the dtype it loads in).
``MANIFEST.json`` then records what was shipped and how it was made:

* ``files``: the sha256 and size of every other file in the folder;
* ``runs``: per training run, its folder name, ``config.yaml`` (the settings, as a mapping), the
  commits its code came from (``source.json``: one entry per start or resume, with the step it
  started at and whether the working tree had changes), its final ``metrics.json``, the step
  its log reached, and the record of the run its weights started from (``init_from``).

:func:`verify` checks a shipped folder against its manifest (the tests run it on the
repository's own).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from omegaconf import OmegaConf

from core.errors import UserError
from core.runtime import file_sha256, log_records, replacing_folder, write_json

MANIFEST = "MANIFEST.json"
SOURCE = "source.json"  # in a training run's folder: the code of each start and resume


def code_version(root: Path) -> Dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout at ``root`` (``"unknown"`` outside one)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def record_source(run_dir: Path, step: int, root: Path) -> None:
    """Append the code version of ``root`` starting (or resuming) the run at ``step`` to the
    run's ``source.json``."""
    path = Path(run_dir) / SOURCE
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"step": step, **code_version(root)})
    write_json(path, entries)


def _half_tensors(source: Path) -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors as shipped: floating-point ones cast to float16."""
    from safetensors.torch import load_file

    return {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(source)).items()}


def _half_safetensors(source: Path, target: Path) -> None:
    """``source``'s tensors as shipped, written to ``target``."""
    from safetensors.torch import save_file

    save_file(_half_tensors(source), str(target), metadata={"format": "pt"})


def _run_record(run_dir: Path) -> Dict[str, Any]:
    """A run's folder name, settings, code versions, final metrics and ``last_step`` (the step
    its log reached: a run a later one started from may have been stopped; None without a
    log); for a run whose weights started from another run (``init_from``, a run folder still
    on disk), that run's record as ``started_from``."""
    def read(name: str, parse):
        path = run_dir / name
        return parse(path.read_text()) if path.is_file() else None
    record = {"run": run_dir.name,
              "config": read("config.yaml", lambda text: OmegaConf.to_container(
                  OmegaConf.create(text))),
              "source": read(SOURCE, json.loads), "metrics": read("metrics.json", json.loads)}
    log = log_records(run_dir / "metrics.jsonl")
    record["last_step"] = log[-1]["step"] if log else None
    start = Path(str((record["config"] or {}).get("init_from") or ""))
    if start.name and (start / "config.yaml").is_file():
        record["started_from"] = _run_record(start)
    return record


def _merged_pipeline_json(pipelines: Sequence[Path]) -> Dict[str, Any]:
    """The runs' ``pipeline.json`` laid over one another in order: a later run's entries under
    ``args`` (its models one by one) replace an earlier one's."""
    merged: Dict[str, Any] = {}
    for pipeline in pipelines:
        spec = json.loads((pipeline / "pipeline.json").read_text())
        args = merged.get("args", {})
        models = {**args.get("models", {}), **spec["args"].get("models", {})}
        merged = {**merged, **spec, "args": {**args, **spec["args"], "models": models}}
    return merged


def _half_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors as shipped (floating point in float16), by name:
    the same for a run's float32 file and the float16 file shipped from it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_half_tensors(path).items()):
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _conditioner_weights(pipeline: Path) -> Dict[str, str]:
    """:func:`_half_digest` of each conditioner weight file in a pipeline folder, by its path
    in the folder. (Its pipeline.json is read as JSON, not by ``read_pipeline``: a run laid
    over others may name only the models it trained.)"""
    name = json.loads((pipeline / "pipeline.json").read_text())["args"].get("image_cond_model")
    folder = pipeline / name if isinstance(name, str) else None
    if folder is None or not folder.is_dir():
        return {}
    return {str(p.relative_to(pipeline)): _half_digest(p)
            for p in sorted(folder.rglob("*.safetensors"))}


def _image_framing(pipeline: Path) -> str:
    """How the pipeline's conditioner cuts its images (``relaxflow.conditioning.FRAMINGS``)."""
    return json.loads((pipeline / "pipeline.json").read_text())["args"].get("image_framing",
                                                                           "object")


def _check_one_conditioner(pipelines: Sequence[Path]) -> None:
    shipped = [(p, _conditioner_weights(p)) for p in pipelines]
    shipped = [(p, w) for p, w in shipped if w]
    for pipeline, weights in shipped[1:]:
        framings = _image_framing(shipped[0][0]), _image_framing(pipeline)
        if framings[0] != framings[1]:
            raise UserError(
                f"{pipeline} cuts its conditioner's images by image_framing {framings[1]!r}, "
                f"{shipped[0][0]} by {framings[0]!r}: every flow reads the tokens of images cut "
                "one way, so the runs cannot ship together; train stage 2 again on the stage-1 "
                "run's pipeline (structure_pipeline=<run>/pipeline)")
        if weights != shipped[0][1]:
            raise UserError(
                f"the conditioner of {pipeline} differs from that of {shipped[0][0]}: the "
                "stage-2 flow was trained on one conditioner, so the runs cannot ship together; "
                "continue stage 1 with flow.train_conditioner=false, or train stage 2 again on "
                "the continued run's pipeline (structure_pipeline=<run>/pipeline)")


def _is_shipped(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and (folder / "pipeline.json").is_file()


def _layer(folder: Path) -> Path:
    """The pipeline folder a named folder contributes: a shipped folder itself, or a finished
    training run's ``pipeline/``."""
    if _is_shipped(folder):
        return folder
    if not (folder / "metrics.json").is_file():
        raise UserError(f"{folder} is neither a finished training run (no metrics.json) nor a "
                        f"shipped generator (no {MANIFEST}): finish the run first (python "
                        "run.py --resume <folder>)")
    if not (folder / "pipeline" / "pipeline.json").is_file():
        raise UserError(f"{folder / 'pipeline'} holds no pipeline.json: the run did not "
                        "export its pipeline (resume it to finish)")
    return folder / "pipeline"


def _run_records(folder: Path) -> List[Dict[str, Any]]:
    """The manifest's records of a named folder: a run's own, or a shipped folder's runs."""
    if _is_shipped(folder):
        return json.loads((folder / MANIFEST).read_text())["runs"]
    return [_run_record(folder)]


def ship(run_dirs: Sequence[Path], dest: Path) -> Path:
    """Write the runs' pipelines (or shipped folders), laid over one another in order, in
    float16 with their manifest to ``dest`` (replacing what is there, in one rename; ``dest``
    may be one of them); returns ``dest``."""
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise UserError("name at least one training run folder to ship")
    pipelines = [_layer(r) for r in run_dirs]
    _check_one_conditioner(pipelines)
    sources = {source.relative_to(pipeline): source for pipeline in pipelines
               for source in sorted(pipeline.rglob("*"))
               if source.is_file() and source != pipeline / MANIFEST}
    with replacing_folder(dest) as tmp:
        for name, source in sorted(sources.items()):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name == Path("pipeline.json"):
                write_json(target, _merged_pipeline_json(pipelines))
            elif source.suffix == ".safetensors":
                _half_safetensors(source, target)
            else:
                shutil.copyfile(source, target)
        files = {str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"files": files, "runs": [record for r in run_dirs
                                             for record in _run_records(r)],
                    "weights": "float16 (cast from the float32 training weights)"}
        write_json(tmp / MANIFEST, manifest)
    return Path(dest)


def verify(folder: Path) -> List[str]:
    """The problems of a shipped folder against its manifest (empty when it matches): files
    missing, changed, or not in the manifest."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    problems = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{name} differs from the manifest's sha256")
    listed = set(manifest["files"]) | {MANIFEST}
    problems += [f"{p.relative_to(folder)} is not in the manifest"
                 for p in sorted(folder.rglob("*"))
                 if p.is_file() and str(p.relative_to(folder)) not in listed]
    return problems


def size_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
