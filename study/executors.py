"""Executors: where a study's runs execute. Each yields ``(event, spec, outcome)`` tuples while
the runs progress: ``("started", spec, None)`` when a run is handed to a worker and
``("finished", spec, outcome)`` when it ends, one of each per run.

- :class:`LocalExecutor`: up to ``max_parallel`` runs at once, each a subprocess of a thread of
  this process.
- :class:`RayExecutor`: one Ray task per run; the task launches the run's subprocess on whichever
  node Ray places it, and Ray reruns the task (``max_retries``) when its worker dies. A rerun
  resumes the run from its checkpoint, as :func:`~study.launch.execute_run` decides by the run's
  folder. Ray's own queue holds the tasks its cluster cannot place yet, so there "started" means
  submitted.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

from .config import RayConfig
from .launch import RunOutcome, RunSpec, RunStatus, execute_run

RunEvent = Tuple[str, RunSpec, Optional[RunOutcome]]
STARTED, FINISHED = "started", "finished"


def crashed(err: BaseException) -> RunOutcome:
    """The outcome of a run whose executor failed around it (not the job itself)."""
    return RunOutcome(RunStatus.failed, "start", error=f"{type(err).__name__}: {err}")


def available_cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class LocalExecutor:
    """Runs in parallel subprocesses on this machine."""

    def __init__(self, max_parallel: Optional[int], threads_per_run: int):
        self.max_parallel = max_parallel or max(1, available_cores() // threads_per_run)

    def events(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        happened: "queue.Queue[RunEvent]" = queue.Queue()

        def work(spec: RunSpec) -> None:
            happened.put((STARTED, spec, None))
            try:
                outcome = execute_run(spec)
            except Exception as err:  # an unreadable folder, a missing program: the run fails
                outcome = crashed(err)
            happened.put((FINISHED, spec, outcome))

        pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="study-run")
        try:
            for spec in specs:
                pool.submit(work, spec)
            for _ in range(2 * len(specs)):
                yield happened.get()
        finally:  # also when the driver stops early: queued runs never start
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Runs as Ray tasks on a Ray cluster (started here when ``address`` is null)."""

    def __init__(self, cfg: RayConfig, threads_per_run: int):
        self.cfg, self.threads_per_run = cfg, threads_per_run

    def events(self, specs: Sequence[RunSpec]) -> Iterator[RunEvent]:
        # Ray is an optional dependency (the "study" extra): imported only when a study uses it
        import ray

        connected_here = not ray.is_initialized()
        if connected_here:
            ray.init(address=self.cfg.address, log_to_driver=False)
        # workers import study.launch from the folder holding the study package (a shared file
        # system on a cluster, as the runs' workdir must be)
        package_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                      if p)
        task = ray.remote(execute_run).options(
            num_cpus=self.cfg.num_cpus if self.cfg.num_cpus is not None else self.threads_per_run,
            num_gpus=self.cfg.num_gpus, max_retries=self.cfg.max_retries,
            runtime_env={"env_vars": {"PYTHONPATH": python_path}})
        try:
            submitted = {task.remote(spec): spec for spec in specs}
            for spec in specs:
                yield STARTED, spec, None
            waiting = list(submitted)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as err:  # retries spent, or the task raised
                        outcome = crashed(err)
                    yield FINISHED, submitted[ref], outcome
        finally:
            if connected_here:
                ray.shutdown()
