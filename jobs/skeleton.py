"""What every job does around its own work, in one place.

A job runs in numbered steps:

1. check every setting and open every input it will need (model folders included), raising
   :class:`core.errors.UserError` with the fix, so that bad input stops it before anything is
   written; ``check_output`` makes sure the run folder can be made;
2. load its models;
3. ``RunFolder.create``: ``<output_dir>/<name>/<tag>@<time>/`` with ``config.yaml``;
4. its work, writing into the folder;
5. ``RunFolder.finish``: ``metrics.json`` and one closing line that says where the results are.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from cfd.config import save_config, to_object
from core.errors import UserError
from core.runtime import make_run_dir, write_json
from guidance.loading import ModelWeightsNotFound


@contextmanager
def nested(prefix: str) -> Iterator[None]:
    """Inside a job that runs another (``refine`` runs ``relaxflow`` and ``distill``), name a
    missing model by the key the user sets: ``prefix`` + the inner job's key."""
    try:
        yield
    except ModelWeightsNotFound as err:
        raise err.for_option(prefix + err.option) from None


def typed(cfg: Any) -> Any:
    """A job's config as dataclass instances, from an OmegaConf config or as given."""
    return to_object(cfg) if isinstance(cfg, DictConfig) else cfg


def check_output(output_dir: str, name: str) -> None:
    """Refuse, before any model loads, an ``output_dir`` that cannot hold run folders (a file,
    a read-only place) and a ``name`` that would put them outside it."""
    if Path(name).is_absolute() or ".." in Path(name).parts or not name.strip():
        raise UserError(f"name={name!r} must be a relative folder name (it becomes "
                        f"<output_dir>/<name>/...), without '..'; to write elsewhere set "
                        f"output_dir=")
    existing = Path(output_dir).absolute()
    while not existing.exists():  # the nearest part that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output_dir={output_dir}: {existing} is a file, not a folder; set "
                        "output_dir= to a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir={output_dir}: {existing} cannot be written to (read-only "
                        "or not yours); set output_dir= to a folder you can write")


def finished_run(run_dir: Path) -> Optional[Dict[str, Any]]:
    """A resumable job's run folder that already has its ``metrics.json``: say so and return
    its metrics (with ``run_dir``); None when the run is not finished."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    print(f"{run_dir} finished all {metrics['steps']} steps already; nothing to resume (start a "
          "new run to train again)")
    return {**metrics, "run_dir": str(run_dir)}


@dataclass
class RunFolder:
    """A run's folder: made with the config it runs, closed with its metrics."""

    path: Path

    @classmethod
    def create(cls, output_dir: str, name: str, tag: str, cfg: Any) -> "RunFolder":
        """``<output_dir>/<name>/<tag>@<time>/`` holding ``config.yaml`` (``cfg``)."""
        path = make_run_dir(output_dir, name, tag)
        save_config(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg),
                    path / "config.yaml")
        return cls(path)

    def finish(self, metrics: Dict[str, Any], message: str) -> Dict[str, Any]:
        """Write ``metrics.json``, print ``message`` and where the results are; returns the
        metrics with ``run_dir``."""
        write_json(self.path / "metrics.json", metrics)
        print(f"{message}; results in {self.path}")
        return {**metrics, "run_dir": str(self.path)}
