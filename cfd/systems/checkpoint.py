"""Atomic checkpoints: everything a run needs to continue bit for bit.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed into place, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..utils.runtime import atomic_write

LATEST = "last.pt"


def save_checkpoint(ckpt_dir: Path, state: Dict[str, Any]) -> Path:
    return atomic_write(Path(ckpt_dir) / LATEST, lambda f: torch.save(state, f))


def load_checkpoint(ckpt_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
