"""The study's state: ``state.json`` in the study folder, one record per run (status, run folder,
attempts, elapsed time, error), rewritten atomically after every change so that a driver killed
at any moment (kill -9 included) leaves the previous or the new state, whole, on disk.

The run folders stay the truth about a run (a metrics.json means finished); the state adds what
they cannot say: failures with their error, attempts, the time the study spent on each run and
its peak memory, and a copy of the scores the study computed (``study.scoring``; the run
folder's ``study_scores.json`` holds them with the settings that made them).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from core.runtime import atomic_write

from .launch import RunOutcome, RunSpec, RunStatus

STATE_NAME = "state.json"


@dataclass
class RunRecord:
    """What the study knows about one run."""

    method: str
    prompt: str
    seed: int
    status: str = RunStatus.pending.value
    run_dir: Optional[str] = None
    attempts: int = 0
    elapsed_s: float = 0.0  # summed over the study's attempts (skips add nothing)
    exit_code: Optional[int] = None
    error: Optional[str] = None
    updated: Optional[str] = None
    peak_rss_mb: Optional[float] = None  # the job process's, the largest over attempts
    scores: Optional[Dict[str, object]] = None  # the study's own scoring of the finished run


def write_json_durably(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON through a fsynced temporary file renamed over ``path``, then fsync
    the folder so that the rename itself survives a crash."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class StudyState:
    """The records of a study's runs, saved to ``<study_dir>/state.json`` on every change."""

    def __init__(self, path: Path, records: Dict[str, RunRecord]):
        self.path, self.records = Path(path), records

    @classmethod
    def load(cls, study_dir: Path) -> "StudyState":
        """The saved state, or an empty one for a new study."""
        path = Path(study_dir) / STATE_NAME
        if not path.is_file():
            return cls(path, {})
        saved = json.loads(path.read_text())["runs"]
        return cls(path, {key: RunRecord(**record) for key, record in saved.items()})

    def save(self) -> None:
        write_json_durably(self.path, {"runs": {k: asdict(r) for k, r in self.records.items()}})

    def record(self, spec: RunSpec) -> RunRecord:
        """The run's record, made pending if the study has none yet."""
        if spec.key not in self.records:
            self.records[spec.key] = RunRecord(spec.method, spec.prompt, spec.seed)
        return self.records[spec.key]

    def mark_running(self, spec: RunSpec) -> None:
        record = self.record(spec)
        record.status, record.attempts = RunStatus.running.value, record.attempts + 1
        record.updated = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()

    def mark_outcome(self, spec: RunSpec, outcome: RunOutcome) -> None:
        record = self.record(spec)
        record.status, record.run_dir = outcome.status.value, outcome.run_dir
        record.exit_code, record.error = outcome.exit_code, outcome.error
        record.elapsed_s += outcome.elapsed_s
        if outcome.peak_rss_mb is not None:
            record.peak_rss_mb = max(record.peak_rss_mb or 0.0, outcome.peak_rss_mb)
        record.updated = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()
