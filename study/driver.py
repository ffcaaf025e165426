"""The study driver: plan the runs, skip the finished ones, execute the rest with progress and a
durable state file, score the finished runs, then write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cfd.config import save_config

from .config import ExecutorKind, StudyConfig
from .executors import FINISHED, STARTED, LocalExecutor, RayExecutor
from .launch import LOG_NAME, RunSpec, RunStatus, finished_run, read_metrics
from .plan import plan_runs
from .report import write_report
from .scoring import across_runs, check_scoring, score_runs
from .state import StudyState


def make_executor(cfg: StudyConfig) -> Union[LocalExecutor, RayExecutor]:
    if cfg.executor is ExecutorKind.ray:
        return RayExecutor(cfg.ray, cfg.threads_per_run)
    return LocalExecutor(cfg.max_parallel, cfg.threads_per_run)


def runs_to_execute(cfg: StudyConfig, specs: List[RunSpec], state: StudyState) -> List[RunSpec]:
    """The runs still to do. Finished runs (a metrics.json in their folder) are recorded done;
    runs that failed before are left as they are unless ``retry_failed``."""
    todo = []
    for spec in specs:
        done = finished_run(Path(spec.output_dir))
        record = state.record(spec)
        if done is not None:
            record.status, record.run_dir = RunStatus.done.value, str(done)
            record.exit_code = record.error = None
        elif record.status != RunStatus.failed.value or cfg.retry_failed:
            record.status = RunStatus.pending.value  # also a run a killed driver left "running"
            todo.append(spec)
    state.save()
    return todo


def status_counts(state: StudyState, specs: List[RunSpec]) -> Dict[str, int]:
    """How many of the study's runs are done, running and failed."""
    statuses = [state.record(spec).status for spec in specs]
    return {status: statuses.count(status)
            for status in (RunStatus.done.value, RunStatus.running.value, RunStatus.failed.value)}


def execute(cfg: StudyConfig, specs: List[RunSpec], state: StudyState) -> None:
    """Execute the runs still to do, recording each start and end in the state file."""
    todo = runs_to_execute(cfg, specs, state)
    finished_before = len(specs) - len(todo)
    with tqdm(total=len(specs), initial=finished_before, desc=cfg.name, unit="run",
              dynamic_ncols=True) as bar:
        bar.set_postfix(status_counts(state, specs))
        if not todo:
            return
        for event, spec, outcome in make_executor(cfg).events(todo):
            if event == STARTED:
                state.mark_running(spec)
            else:
                state.mark_outcome(spec, outcome)
                if outcome.status is RunStatus.failed:
                    bar.write(f"run {spec.key} failed: {outcome.error.splitlines()[0]} "
                              f"(log: {Path(spec.output_dir) / LOG_NAME})")
            bar.set_postfix(status_counts(state, specs), refresh=event == STARTED)
            if event == FINISHED:
                bar.update(1)


def as_study_config(config: Union[StudyConfig, DictConfig]) -> StudyConfig:
    """A loaded config (``cfd.config.load_config(StudyConfig, ...)``) or a ``StudyConfig``, as a
    ``StudyConfig``."""
    return OmegaConf.to_object(config) if isinstance(config, DictConfig) else config


def run_study(config: Union[StudyConfig, DictConfig]) -> dict:
    """Run a study (or continue one: finished runs are skipped, stopped runs resume), score its
    finished runs (``study.scoring``; runs scored before are not scored again) and write its
    report. Returns the study folder, the report's files and how many runs finished and
    failed."""
    cfg = as_study_config(config)
    specs = plan_runs(cfg)
    prompts = list(dict.fromkeys(spec.prompt for spec in specs))
    check_scoring(cfg, prompts)  # a missing metric model stops the study before any run
    study_dir = cfg.study_dir()
    study_dir.mkdir(parents=True, exist_ok=True)
    save_config(OmegaConf.structured(cfg), study_dir / "study.yaml")
    state = StudyState.load(study_dir)
    execute(cfg, specs, state)
    score_runs(cfg, specs, state, prompts)
    metrics = {spec.key: {**read_metrics(Path(state.record(spec).run_dir)),
                          **(state.record(spec).scores or {})}
               for spec in specs if state.record(spec).status == RunStatus.done.value}
    files = write_report(cfg, specs, state, metrics, across_runs(cfg, specs, state, prompts),
                         study_dir)
    counts = status_counts(state, specs)
    return {"study_dir": str(study_dir), "runs": len(specs), "done": counts["done"],
            "failed": counts["failed"], **{name: str(path) for name, path in files.items()}}
