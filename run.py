"""Command line.

    python run.py --config configs/<name>.yaml key=value ...   run the YAML's job (its job key)
    python run.py <job> --config configs/<name>.yaml ...       the same, checking that the YAML
                                                               holds <job>: distill, fit-splats,
                                                               generate, relaxflow, refine,
                                                               study or train-generator
    python run.py --resume <run folder>                        continue a stopped distill or
                                                               train-generator run exactly, as
                                                               configured (no overrides)
    python run.py prompts                                      prompts the embedded prior knows
    python run.py ship-generator <run> [<run> ...] [--to DIR]  a trained generator's pipeline in
                                                               float16 with its manifest
                                                               (default DIR: the embedded one)

Overrides are dotted ``key=value`` pairs. A text value is taken as written (``prompt=a mug #2``;
one pair of surrounding quotes is dropped, ``null`` unsets an optional one); other values are YAML
(``steps=300``, ``priors=[a.png,b.png]``). Either may use OmegaConf interpolations (``${name}``).
Ctrl-C stops a distill run and prints the command that continues it from its last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

import jobs
from cfd.config import ConfigError, load_config, read_yaml
from cfd.shapes import prompts
from core.errors import UserError
from core.runtime import RunInterrupted, TrainingStopped, tune_malloc
from relaxflow.loading import EMBEDDED_PIPELINES

COMMANDS = [*jobs.JOBS, "prompts", "ship-generator"]
USAGE = ("run.py [job] (--config CONFIG | --resume RUN_FOLDER) [key=value ...]\n"
         "       run.py prompts\n"
         "       run.py ship-generator RUN [RUN ...] [--to DIR]")
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prompts"]:
        print("\n".join(prompts()))
        return 0
    if argv[:1] == ["ship-generator"]:
        return _ship(argv[1:])
    if (argv[:1] and not argv[0].startswith("-") and "=" not in argv[0]
            and argv[0] not in jobs.JOBS):
        print(f"error: unknown command '{argv[0]}'; known: {', '.join(COMMANDS)} (or none: "
              "run.py --config <file> runs the file's job)", file=sys.stderr)
        return 2
    named_job = argv.pop(0) if argv[:1] and argv[0] in jobs.JOBS else None
    parser = argparse.ArgumentParser(description=__doc__, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="YAML file in configs/")
    source.add_argument("--resume", type=Path, help="run folder to continue from its checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tune_malloc()
    try:
        _run(args, named_job)
    except UserError as err:  # bad input: what and how to fix it (a bug keeps its traceback)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # the run stopped itself; the message says what to change
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RunInterrupted as stop:
        saved = ("no checkpoint yet: it starts again at step 0" if stop.checkpoint_step is None
                 else f"its checkpoint holds step {stop.checkpoint_step}")
        print(f"\ninterrupted at step {stop.step} ({saved}); continue with: "
              f"python run.py --resume {stop.run_dir}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


def _ship(argv) -> int:
    """``ship-generator``: training runs -> a float16 pipeline folder with its manifest."""
    from relaxflow.training.ship import ship, size_bytes

    parser = argparse.ArgumentParser(prog="run.py ship-generator",
                                     description="Ship a trained generator (float16, with a "
                                                 "manifest); the runs' pipelines are laid over one "
                                                 "another, a later run's files winning")
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (or a shipped "
                        "generator's folder), in the order they are laid over one another (e.g. "
                        "stage 2, then a stage-1 run continued since; or relaxflow/embedded, then "
                        "a new stage-1 flow)")
    parser.add_argument("--to", type=Path, default=EMBEDDED_PIPELINES["embedded"],
                        help="the folder to write (default: the embedded generator's)")
    args = parser.parse_args(argv)
    try:
        dest = ship(args.runs, args.to)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {len(args.runs)} run(s) to {dest} ({size_bytes(dest) / 2**20:.2f} MiB)")
    return 0


def _job_of(config_path: Path, named_job) -> str:
    """The job a config file holds (its ``job`` key; ``distill`` without one), checked against
    the one named on the command line."""
    # unresolved: an interpolation here is not a job name, and says so
    job = OmegaConf.to_container(read_yaml(config_path)).get("job", "distill")
    if not isinstance(job, str) or job not in jobs.JOBS:
        raise ConfigError(f"unknown job '{job}' in {config_path}; known jobs: "
                          f"{sorted(jobs.JOBS)}")
    if named_job is not None and job != named_job:
        raise ConfigError(f"{config_path} is a '{job}' config, not '{named_job}'")
    return job


def _run(args, named_job) -> None:
    """Load the config and run its job, or resume a run folder."""
    if args.resume is None:
        job = jobs.load(_job_of(args.config, named_job))
        job.run(load_config(job.Config, args.config, args.overrides))
        return
    if args.overrides:
        raise ConfigError(f"--resume takes no overrides (got {' '.join(args.overrides)}): a "
                          "resumed run continues as configured, to give the same result as "
                          "one that was never stopped; start a new run to change settings")
    config_path = args.resume / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{args.resume} holds no config.yaml: is it a run folder? (give the "
                          "folder a run printed, e.g. outputs/<name>/<prompt>@<time>)")
    name = _job_of(config_path, named_job)
    job = jobs.load(name)
    if not jobs.resumable(job):
        raise ConfigError(f"job '{name}' cannot be resumed; resumable jobs: "
                          f"{sorted(n for n in jobs.JOBS if jobs.resumable(jobs.load(n)))}")
    job.resume(args.resume)


if __name__ == "__main__":
    sys.exit(main())
