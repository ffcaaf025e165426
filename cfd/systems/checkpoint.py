"""Atomic checkpoints: everything a run needs to continue bit for bit.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed into place, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half a file.
One damaged some other way (a full disk, a copy cut short) is refused with what to do about it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from core.runtime import atomic_write

LATEST = "last.pt"


def save_checkpoint(ckpt_dir: Path, state: Dict[str, Any]) -> Path:
    return atomic_write(Path(ckpt_dir) / LATEST, lambda f: torch.save(state, f))


def load_checkpoint(ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    """The state saved in ``ckpt_dir``, None when there is none yet."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    # what torch.load raises for an empty file, a cut-short zip archive and bytes that are no
    # pickle; a file that cannot be opened at all keeps its own error
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} is damaged and cannot be read ({problem}): delete "
                         f"{path.parent} to restart that run folder from step 0, or start a "
                         "new run") from None
