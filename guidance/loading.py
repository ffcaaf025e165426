"""Offline resolution of diffusers model ids, and the dtype choice shared by the diffusers priors.

A model id is either a local folder (a diffusers pipeline saved with ``save_pretrained`` or
downloaded with ``huggingface-cli download <id> --local-dir <folder>``) or a Hugging Face hub id
that is already in the local Hugging Face cache. Nothing here touches the network: when the
weights are not on this machine, :class:`ModelWeightsNotFound` says where they were looked for
and how to provide them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from core.errors import InputFileError, UserError

PIPELINE_INDEX = "model_index.json"


class ModelWeightsNotFound(InputFileError):
    """The weights of a model are not on this machine (and will not be downloaded). ``option``:
    the setting that points at them; ``hint``: a last line, such as where the model is hosted."""

    def __init__(self, model_id: str, searched: str, reason: str = "",
                 option: str = "guidance.model_id", hint: str = ""):
        self.model_id, self.searched = model_id, searched
        self.reason, self.option, self.hint = reason, option, hint
        lines = [f"model weights for {model_id!r} are not available offline."]
        if reason:
            lines.append(f"  Reason: {reason}")
        lines += [
            f"  Looked for: a local folder {model_id!r} and the Hugging Face cache {searched}",
            "  To provide them, either:",
            "    1. on a machine with internet access (after `huggingface-cli login` for gated",
            "       models such as SD3) run",
            f"         huggingface-cli download {model_id} --local-dir <folder>",
            f"       copy <folder> here and pass  {option}=<folder>  on the command line; or",
            "    2. put the model into the Hugging Face cache here (set HF_HOME, or HF_HUB_CACHE, to",
            "       the cache that holds it).",
        ]
        if hint:
            lines.append(f"  {hint}")
        super().__init__("\n".join(lines))

    def for_option(self, option: str) -> "ModelWeightsNotFound":
        """The same error naming another setting (a job's nested key, e.g. ``distill.`` +
        ``guidance.model_id``)."""
        return ModelWeightsNotFound(self.model_id, self.searched, self.reason, option, self.hint)


class DamagedModelFile(UserError):
    """A weights file that is on this machine but damaged (cut short by a download or a copy
    that stopped early); the message names it and says to download or copy it again."""


def damaged_safetensors(folder: Path) -> Optional[DamagedModelFile]:
    """The error for the first ``.safetensors`` file under ``folder`` whose header does not
    read or whose size does not fit its header (``safe_open`` reads only the header), or
    None when all are whole."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            return DamagedModelFile(f"{path} is damaged or cut short ({problem}): re-download "
                                    "or re-copy it (a download or copy that stopped early "
                                    "leaves such a file)")
    return None


def hf_cache_dir() -> str:
    """The hub cache directory huggingface_hub reads, resolved from the environment now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _looks_like_path(model_id: str) -> bool:
    """True for strings that can only be file-system paths, never hub ids (``owner/name``)."""
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        return True
    return model_id.count("/") > 1 or model_id.endswith("/")


def resolve_model_path(model_id: Union[str, os.PathLike], cache_dir: Optional[str] = None,
                       index_file: str = PIPELINE_INDEX, option: str = "guidance.model_id",
                       hint: str = "") -> Path:
    """Folder holding the pipeline ``model_id``, without any network access.

    Args:
        model_id: a local folder, or a hub id (``owner/name``) present in the Hugging Face cache.
        cache_dir: hub cache to search (default: the one the environment selects).
        index_file: the file that marks a complete pipeline folder (diffusers'
            ``model_index.json``; TRELLIS's ``pipeline.json``).
        option: the setting named in the error, that points at local weights.
        hint: a last line for the error (see :class:`ModelWeightsNotFound`).

    Raises:
        ModelWeightsNotFound: neither a pipeline folder nor a cached snapshot exists.
    """
    model_id = os.fspath(model_id)
    cache_dir = os.path.expanduser(cache_dir) if cache_dir else hf_cache_dir()

    def not_found(reason: str) -> ModelWeightsNotFound:
        return ModelWeightsNotFound(model_id, cache_dir, reason, option, hint)

    local = Path(model_id).expanduser()
    if local.is_dir():
        if (local / index_file).is_file():
            return local.resolve()
        raise not_found(f"the folder {str(local)!r} exists but has no {index_file}")
    if local.exists() or _looks_like_path(model_id):
        raise not_found(f"no folder {str(local)!r}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(model_id, cache_dir=cache_dir, local_files_only=True)
    except HFValidationError as err:
        raise not_found(f"not a folder here, nor a valid hub id ({err})") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        raise not_found(f"no local folder and no cached snapshot ({type(err).__name__})") from None
    snapshot = Path(snapshot)
    if not (snapshot / index_file).is_file():
        raise not_found(f"the cached snapshot {str(snapshot)!r} has no {index_file} "
                        "(incomplete download?)")
    return snapshot


def dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``{"dtype": ...}`` for diffusers versions that take it, ``{"torch_dtype": ...}`` before."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils import deprecation_utils
        new_style = hasattr(deprecation_utils, "_resolve_dtype")
    except ImportError:
        new_style = False
    return {"dtype": dtype} if new_style else {"torch_dtype": dtype}


def pipeline_components(path: Path) -> dict:
    """``{name: [library, class]}`` of the components ``model_index.json`` in ``path`` lists;
    those saved without weights (``[null, null]``) map to ``None``."""
    try:
        index = json.loads((Path(path) / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return {name: (value if any(v is not None for v in value) else None)
            for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value}


def null_components(path: Path) -> dict:
    """``{name: None}`` for components saved as ``[null, null]`` in ``model_index.json``.

    diffusers drops such entries when loading and then refuses the pipeline if the component is
    not one of its optional ones (SD3 saved without T5: ``text_encoder_3``, ``tokenizer_3``), so
    they are passed back explicitly.
    """
    return {name: None for name, spec in pipeline_components(path).items() if spec is None}


def load_pipeline(pipeline_cls, model_id: Union[str, os.PathLike],
                  dtype: Optional[torch.dtype] = None, hint: str = "", **kwargs):
    """``pipeline_cls.from_pretrained`` on the resolved folder, offline, with one clear error.

    A folder that resolves but lacks a component folder ``model_index.json`` lists (one not
    replaced through ``kwargs``), or whose components fail to load (a partial download), also
    raises :class:`ModelWeightsNotFound`. ``hint``: a last line for that error.
    """
    model_id = os.fspath(model_id)
    path = resolve_model_path(model_id, hint=hint)
    # diffusers would build a missing tokenizer empty and fail only at the first prompt.
    missing = [str(path / name) for name, spec in pipeline_components(path).items()
               if spec is not None and name not in kwargs and not (path / name).is_dir()]
    if missing:
        raise ModelWeightsNotFound(
            model_id, hf_cache_dir(),
            f"the pipeline folder has no {', '.join(missing)} (listed in its {PIPELINE_INDEX}; "
            "an incomplete download?)", hint=hint)
    kwargs = {**null_components(path), **dtype_kwargs(dtype), **kwargs}
    from safetensors import SafetensorError

    try:
        return pipeline_cls.from_pretrained(str(path), local_files_only=True, **kwargs)
    except ModelWeightsNotFound:
        raise
    except (OSError, EnvironmentError, SafetensorError) as err:
        # a weights file cut short fails as diffusers' "Unable to load weights" (an OSError)
        # or transformers' SafetensorError: name the file, not the whole folder
        damaged = next(filter(None, (damaged_safetensors(path / name)
                                     for name, spec in pipeline_components(path).items()
                                     if spec is not None and name not in kwargs)), None)
        if damaged is not None:
            raise damaged from None
        raise ModelWeightsNotFound(model_id, hf_cache_dir(),
                                   f"loading {str(path)!r} failed: {err}", hint=hint) from err


