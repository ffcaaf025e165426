"""Command line.

    python run.py --config configs/<name>.yaml key=value ...   run a job (the YAML's ``job`` key)
    python run.py prompts                                      prompts the embedded prior knows

Dotted ``key=value`` overrides follow OmegaConf syntax.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

JOBS = {
    "fit-splats": ("cfd.systems.fit_splats", "FitSplatsConfig"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prompts"]:
        from cfd.shapes import prompts

        print("\n".join(prompts()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import importlib

    from omegaconf import OmegaConf

    from cfd.config import ConfigError, load_config
    from cfd.utils.runtime import tune_malloc

    tune_malloc()
    try:
        if not args.config.is_file():
            raise ConfigError(f"config file {args.config} does not exist (see configs/)")
        job = OmegaConf.load(args.config).get("job", "fit-splats")
        if job not in JOBS:
            raise ConfigError(f"unknown job '{job}' in {args.config}; known jobs: {sorted(JOBS)}")
        module_name, schema_name = JOBS[job]
        module = importlib.import_module(module_name)
        cfg = load_config(getattr(module, schema_name), args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    module.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
