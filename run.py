"""Command line.

    python run.py --config configs/<name>.yaml key=value ...   run the YAML's job (its job key)
    python run.py <job> --config configs/<name>.yaml ...       the same, checking that the YAML
                                                               holds <job>: distill, fit-splats,
                                                               generate, relaxflow or refine
    python run.py --resume <run folder>                        continue a stopped distill run
                                                               exactly, as configured (no
                                                               overrides)
    python run.py prompts                                      prompts the embedded prior knows

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

JOBS = {
    "distill": ("cfd.systems.distill", "DistillConfig"),
    "fit-splats": ("cfd.systems.fit_splats", "FitSplatsConfig"),
    "generate": ("relaxflow.generate", "GenerateConfig"),
    "relaxflow": ("relaxflow.complete", "RelaxFlowConfig"),
    "refine": ("relaxflow.refine", "RefineConfig"),
}
RESUMABLE = {"distill"}
COMMANDS = [*JOBS, "prompts"]
USAGE = ("run.py [job] (--config CONFIG | --resume RUN_FOLDER) [key=value ...]\n"
         "       run.py prompts")
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prompts"]:
        from cfd.shapes import prompts

        print("\n".join(prompts()))
        return 0
    if argv[:1] and not argv[0].startswith("-") and "=" not in argv[0] and argv[0] not in JOBS:
        print(f"error: unknown command '{argv[0]}'; known: {', '.join(COMMANDS)} (or none: "
              "run.py --config <file> runs the file's job)", file=sys.stderr)
        return 2
    named_job = argv.pop(0) if argv[:1] and argv[0] in JOBS else None
    parser = argparse.ArgumentParser(description=__doc__, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="YAML file in configs/")
    source.add_argument("--resume", type=Path, help="run folder to continue from its checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, named_job)
    except KeyboardInterrupt as stop:
        from cfd.utils.runtime import RunInterrupted

        if isinstance(stop, RunInterrupted):
            saved = ("no checkpoint yet: it starts again at step 0" if stop.checkpoint_step is None
                     else f"its checkpoint holds step {stop.checkpoint_step}")
            print(f"\ninterrupted at step {stop.step} ({saved}); continue with: "
                  f"python run.py --resume {stop.run_dir}", file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED


def _run(args, named_job) -> int:
    """Load the config, run its job; the exit status (2: a bad config or input, named)."""
    import importlib

    from omegaconf import OmegaConf

    from cfd.config import ConfigError, load_config, read_yaml
    from cfd.utils.runtime import TrainingStopped, tune_malloc

    tune_malloc()
    config_path = args.config if args.resume is None else args.resume / "config.yaml"
    try:
        if args.resume is not None and args.overrides:
            raise ConfigError(f"--resume takes no overrides (got {' '.join(args.overrides)}): a "
                              "resumed run continues as configured, to give the same result as "
                              "one that was never stopped; start a new run to change settings")
        if not config_path.is_file():
            where = "see configs/" if args.resume is None else "is this a run folder?"
            raise ConfigError(f"config file {config_path} does not exist ({where})")
        # unresolved: an interpolation here is not a job name, and says so
        job = OmegaConf.to_container(read_yaml(config_path)).get("job", "distill")
        if not isinstance(job, str) or job not in JOBS:
            raise ConfigError(f"unknown job '{job}' in {config_path}; known jobs: {sorted(JOBS)}")
        if named_job is not None and job != named_job:
            raise ConfigError(f"{config_path} is a '{job}' config, not '{named_job}'")
        if args.resume is not None and job not in RESUMABLE:
            raise ConfigError(f"job '{job}' cannot be resumed; resumable jobs: {sorted(RESUMABLE)}")
        module_name, schema_name = JOBS[job]
        module = importlib.import_module(module_name)
        cfg = load_config(getattr(module, schema_name), config_path, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.resume is not None:
            module.run(cfg, resume_dir=args.resume)
        else:
            module.run(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what and how to fix it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # the run stopped itself; the message says what to change
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
