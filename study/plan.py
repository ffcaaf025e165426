"""A study's plan: one :class:`~study.launch.RunSpec` per (method, prompt, seed), each with its own
folder and the command line that starts it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

from cfd.config import ConfigError
from core.runtime import slugify

from .config import MethodConfig, StudyConfig
from .launch import RunSpec


def read_prompts(cfg: StudyConfig) -> List[str]:
    """The study's prompts from ``prompts`` or ``prompts_file`` (exactly one of them)."""
    if cfg.prompts and cfg.prompts_file:
        raise ConfigError("give the prompts as 'prompts' or as 'prompts_file', not both")
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts_file {path} does not exist")
        lines = [line.strip() for line in path.read_text().splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
    else:
        prompts = list(cfg.prompts)
    if not prompts:
        raise ConfigError("the study has no prompts: set 'prompts' or 'prompts_file'")
    return prompts


def _check_unique(names: List[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"two {what} share the folder name '{name}'; rename one")
        seen.add(name)


def job_command(command: List[str]) -> Tuple[str, ...]:
    """``command`` with a first item ``python`` replaced by this interpreter, so runs use the
    environment the study runs in."""
    if not command:
        raise ConfigError("'command' is empty; the default is [python, run.py]")
    head = sys.executable if command[0] == "python" else command[0]
    return (head, *command[1:])


def method_run(cfg: StudyConfig, method: MethodConfig, prompt: str, seed: int) -> RunSpec:
    """The run of ``method`` on ``prompt`` with ``seed``."""
    workdir = Path(cfg.workdir or ".").resolve()
    output_dir = cfg.study_dir() / "runs" / method.name / slugify(prompt) / f"seed{seed}"
    keys = method.job_keys
    overrides = (*method.overrides, f"{keys.prompt}={prompt}", f"{keys.seed}={seed}",
                 f"{keys.output_dir}={output_dir}")
    key = f"{method.name}/{slugify(prompt)}/seed{seed}"
    return RunSpec(key=key, method=method.name, prompt=prompt, seed=seed,
                   output_dir=str(output_dir),
                   command=job_command(cfg.command), config=method.config, overrides=overrides,
                   workdir=str(workdir), threads=cfg.threads_per_run,
                   scene_scale=method.scene_scale)


def plan_runs(cfg: StudyConfig) -> List[RunSpec]:
    """Every run of the study, methods outermost, then prompts, then seeds."""
    if not cfg.methods:
        raise ConfigError("the study has no methods")
    if not cfg.seeds:
        raise ConfigError("the study has no seeds")
    prompts = read_prompts(cfg)
    _check_unique([m.name for m in cfg.methods], "methods")
    _check_unique([slugify(p) for p in prompts], "prompts")
    _check_unique([str(s) for s in cfg.seeds], "seeds")
    workdir = Path(cfg.workdir or ".").resolve()
    for method in cfg.methods:
        if slugify(method.name) != method.name:
            raise ConfigError(f"method name '{method.name}' is not a folder name; use e.g. "
                              f"'{slugify(method.name)}'")
        if not method.scene_scale > 0:
            raise ConfigError(f"method '{method.name}': scene_scale must be > 0, got "
                              f"{method.scene_scale}")
        if not (workdir / method.config).is_file():
            raise ConfigError(f"method '{method.name}': config file {workdir / method.config} "
                              "does not exist")
    return [method_run(cfg, m, p, s) for m in cfg.methods for p in prompts for s in cfg.seeds]
