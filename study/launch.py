"""Executing one run: find what its folder holds, start or resume the job in a subprocess with
its output in ``run.log``, and report how it ended. Executors call :func:`execute_run` in a
thread (local) or in a Ray task; it only reads and writes the run's own folder.

This module imports nothing outside the standard library: Ray workers import it (and only it, of
this package) to execute runs, so they start fast."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Dict, List, Optional, Tuple

LOG_NAME = "run.log"
LOG_TAIL_LINES = 30
MEMORY_POLL_S = 0.2  # how often a running job's peak memory is read
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# loaded here, not in the forked child: a child of a threaded process should run as little
# Python as possible before exec
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if os.uname().sysname == "Linux" else None


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to start, resume and find one run (plain data: it is pickled
    to Ray workers)."""

    key: str  # <method>/<prompt slug>/seed<k>: the run's name in the state file and logs
    method: str
    prompt: str
    seed: int
    output_dir: str  # absolute; the job makes its run folder inside it
    command: Tuple[str, ...]  # the job program, e.g. (python, run.py)
    config: str  # the job's config file
    overrides: Tuple[str, ...]  # the method's, then prompt, seed and output folder
    workdir: str
    threads: int
    scene_scale: float = 1.0  # the method's (study.config.MethodConfig)

    def start_command(self) -> List[str]:
        return [*self.command, "--config", self.config, *self.overrides]

    def resume_command(self, run_dir: Path) -> List[str]:
        return [*self.command, "--resume", str(run_dir)]


class RunStatus(Enum):
    """A run's state in the study."""

    pending = "pending"
    running = "running"
    done = "done"
    failed = "failed"


@dataclass
class RunOutcome:
    """How one execution of a run ended. ``action``: what was done (``skip`` when the run had
    finished before, ``start``, ``resume``); ``error``: the exit code and the tail of run.log
    when it failed."""

    status: RunStatus
    action: str
    run_dir: Optional[str] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    elapsed_s: float = 0.0
    peak_rss_mb: Optional[float] = None  # the job process's; None when nothing ran


def run_folders(output_dir: Path) -> List[Path]:
    """The run folders a job made in ``output_dir`` (``<name>/<tag>@<time>/`` holding a
    config.yaml), oldest first."""
    configs = sorted(Path(output_dir).glob("*/*@*/config.yaml"),
                     key=lambda p: (p.stat().st_mtime, p.parent.name))
    return [p.parent for p in configs]


def finished_run(output_dir: Path) -> Optional[Path]:
    """The newest run folder with a metrics.json, if any."""
    done = [p for p in run_folders(output_dir) if (p / "metrics.json").is_file()]
    return done[-1] if done else None


def resumable_run(output_dir: Path) -> Optional[Path]:
    """The newest run folder with a non-empty ckpt/ and no metrics.json, if any."""
    stopped = [p for p in run_folders(output_dir)
               if (p / "ckpt").is_dir() and any((p / "ckpt").iterdir())
               and not (p / "metrics.json").is_file()]
    return stopped[-1] if stopped else None


def read_metrics(run_dir: Path) -> Dict[str, object]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def child_environment(threads: int) -> Dict[str, str]:
    """This process's environment with the run's thread count."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the process that started it dies, so
    a killed driver or Ray worker leaves no orphan run writing into a folder that the next
    attempt resumes."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (tqdm's carriage-return updates count as lines)."""
    if not log_path.is_file():
        return ""
    text = log_path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def resident_peak_mb(pid: int) -> Optional[float]:
    """A live process's resident high-water mark (``VmHWM`` in ``/proc/<pid>/status``) in MB;
    None where there is no such file (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None  # also an exited process not yet waited for: it has no memory left


def run_subprocess(argv: List[str], spec: RunSpec, log_path: Path) -> Tuple[int, Optional[float]]:
    """Run ``argv`` in the study's workdir, stdout and stderr appended to ``log_path``; its exit
    code and the job process's peak resident memory in MB (None where it cannot be read).

    The peak is its ``VmHWM``, read every ``MEMORY_POLL_S`` while it runs: a high-water mark of
    the job's own image (reset by its exec), so the last reading misses at most a peak of its
    final instant. (``wait4``'s ``ru_maxrss`` would be cheaper but counts the pages of the
    process that forked it, here the driver or a Ray worker, as the child's.)"""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        preexec = _die_with_parent if _LIBC is not None else None
        process = subprocess.Popen(argv, cwd=spec.workdir, env=child_environment(spec.threads),
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=preexec)
        peak, interval = None, 0.005
        try:
            while True:  # Popen returned after the exec: the readings are the job's
                reading = resident_peak_mb(process.pid)
                if reading is not None:
                    peak = max(peak or 0.0, reading)
                try:
                    return process.wait(timeout=interval), peak
                except subprocess.TimeoutExpired:
                    # often at first, so a job of a fraction of a second is read too
                    interval = min(2 * interval, MEMORY_POLL_S)
        except BaseException:
            process.kill()
            process.wait()
            raise


def execute_run(spec: RunSpec) -> RunOutcome:
    """Bring one run to its end: nothing if it finished before, ``--resume`` if it stopped after
    a checkpoint, a fresh start otherwise."""
    output_dir = Path(spec.output_dir)
    done = finished_run(output_dir)
    if done is not None:
        return RunOutcome(RunStatus.done, "skip", str(done))
    stopped = resumable_run(output_dir)
    action = "start" if stopped is None else "resume"
    argv = spec.start_command() if stopped is None else spec.resume_command(stopped)
    log_path = output_dir / LOG_NAME
    start = time.perf_counter()
    exit_code, peak_rss_mb = run_subprocess(argv, spec, log_path)
    elapsed = time.perf_counter() - start
    done = finished_run(output_dir)
    if exit_code == 0 and done is not None:
        return RunOutcome(RunStatus.done, action, str(done), exit_code, None, elapsed,
                          peak_rss_mb)
    latest = run_folders(output_dir)
    reason = (f"exit code {exit_code}" if exit_code != 0
              else "exit code 0 but no run folder with a metrics.json")
    tail = log_tail(log_path)
    last_line = tail.splitlines()[-1] if tail else "(empty log)"
    error = f"{reason}: {last_line}\n--- last lines of {log_path} ---\n{tail}"
    return RunOutcome(RunStatus.failed, action, str(latest[-1]) if latest else None, exit_code,
                      error, elapsed, peak_rss_mb)
