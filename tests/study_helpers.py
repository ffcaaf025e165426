"""Shared set-up of the study tests: a study of the fake job (tests/study_fake_job.py) in a
temporary folder, and readers of what it leaves."""

import json
import sys
from pathlib import Path
from typing import List, Tuple

import yaml

from cfd.config import load_config
from study import StudyConfig

REPO = Path(__file__).resolve().parent.parent
FAKE_JOB = Path(__file__).resolve().parent / "study_fake_job.py"


def write_fake_study(tmp: Path, job: dict = None, study: dict = None) -> Path:
    """A fake job config and a study config over it (two methods, two prompts, two seeds unless
    ``study`` says otherwise); the study config's path."""
    job_cfg = {"job": "distill", "name": "fake", "seed": 0, "output_dir": "outputs",
               "steps": 3, "prompt_processor": {"prompt": "a mug"}, **(job or {})}
    (tmp / "fake.yaml").write_text(yaml.safe_dump(job_cfg))
    study_cfg = {"name": "s", "output_dir": str(tmp / "studies"), "workdir": str(REPO),
                 "command": [sys.executable, str(FAKE_JOB)],
                 "methods": [{"name": "alpha", "config": str(tmp / "fake.yaml")},
                             {"name": "beta", "config": str(tmp / "fake.yaml"),
                              "overrides": ["quality=-2"]}],
                 "prompts": ["a mug", "a chair"], "seeds": [0, 1], "max_parallel": 2,
                 **(study or {})}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study_cfg))
    return path


def load_study(path: Path, overrides: List[str] = ()):
    return load_config(StudyConfig, path, overrides)


def study_dir(tmp: Path, name: str = "s") -> Path:
    return tmp / "studies" / name


def run_folder(tmp: Path, method: str, prompt_slug: str, seed: int) -> Path:
    return study_dir(tmp) / "runs" / method / prompt_slug / f"seed{seed}"


def invocations(output_dir: Path) -> List[Tuple[str, int, int]]:
    """What the fake job was asked to do in this run folder, in order: (start or resume, the
    step it started from, its pid)."""
    path = output_dir / "invocations.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(action, int(step), int(pid)) for action, step, pid in map(str.split, lines)]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# a study driver in its own process: python -c DRIVER <study config> [overrides]
DRIVER = ("import sys; from tests.study_helpers import load_study; from study import run_study; "
          "run_study(load_study(sys.argv[1], sys.argv[2:]))")


def saved_state(tmp: Path) -> dict:
    return json.loads((study_dir(tmp) / "state.json").read_text())["runs"]
