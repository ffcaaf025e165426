"""The GPU suite's plan: its parts in order of value, each part's time budget, the wheels it
installs, and the dry run that checks them against each other (``gpu_suite.sh --dry-run``).

    python benchmarks/gpu_suite_plan.py parts                 # "name budget_s" per line, in order
    python benchmarks/gpu_suite_plan.py check --wheels .whl   # the dry run; exit 1 on a problem

The budgets fit one lent GPU machine's command (10 minutes, and a 15-minute lease with its
start-up): they add up to at most ``TOTAL_BUDGET_S``. The wheels are what the machine's image
lacks (it has torch, transformers, huggingface_hub, safetensors, numpy, pillow, imageio, rich,
jaxtyping, ninja, PyYAML, regex, tqdm); they travel with the working tree, whose whole size is
limited to ``CARRY_LIMIT_BYTES``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# (part, budget in seconds), in the order the suite runs them: most valuable first, so a run
# cut short has done what matters most.
PARTS: Tuple[Tuple[str, int], ...] = (
    ("install", 20),     # pip install the carried wheels (no network) into /tmp/site
    ("build", 180),      # gsplat's and nerfacc's CUDA JIT builds, sm_90 only, side by side
    ("tests", 90),       # pytest -m gpu: torch renderer vs gsplat, tcnn vs torch grid, fp16
    ("step", 90),        # SD 2.1-base sized step against its floor (random weights)
    ("generate", 60),    # released-size generator timings, fp16
    ("relaxflow", 60),   # released-size RelaxFlow timings, fp16
    ("render", 20),      # splat renderer, torch vs gsplat
    ("guidance", 20),    # SD guidance call timings
    ("nerf", 20),        # NeRF renderer throughput
    ("jobs", 20),        # short runs of the jobs on the GPU (what fits)
)
TOTAL_BUDGET_S = 600
CARRY_LIMIT_BYTES = 64 * 1024 * 1024
PYTHON_TAG = "cp312"

# Distributions the suite installs from the wheel folder (normalised names).
REQUIRED_WHEELS = ("diffusers", "importlib-metadata", "gsplat", "nerfacc", "omegaconf",
                   "antlr4-python3-runtime", "plyfile", "pymcubes")

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?"
                    r"-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename: str) -> Optional[Dict[str, str]]:
    """The name, version and tags of a wheel file name, or None when it is not one."""
    m = _WHEEL.match(filename)
    if not m:
        return None
    out = m.groupdict()
    out["name"] = normalise(out["name"])
    return out


def wheel_problem(filename: str) -> Optional[str]:
    """Why the wheel cannot be installed by Python 3.12 on x86-64 Linux, or None when it can:
    ``py3-none-any`` (pure Python), ``cp312-cp312-<linux x86_64>``, or ``cp3N-abi3-<linux
    x86_64>`` with N <= 12."""
    w = parse_wheel(filename)
    if w is None:
        return "not a wheel file name"
    pys, abis, plats = (set(w[k].split(".")) for k in ("py", "abi", "plat"))
    plat_ok = "any" in plats or any(
        p.endswith("_x86_64") and (p.startswith("manylinux") or p.startswith("linux"))
        for p in plats)
    if not plat_ok:
        return f"platform {w['plat']} is not x86-64 Linux"
    if "none" in abis and ({"py3", PYTHON_TAG} & pys):
        return None
    if PYTHON_TAG in abis and PYTHON_TAG in pys:
        return None
    if "abi3" in abis and any(re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12 for p in pys):
        return None
    return f"tags {w['py']}-{w['abi']} are not for Python 3.12 (cp312, abi3 or py3-none)"


def script_parts(script: Path) -> List[str]:
    """The part names the shell script's ``case`` handles (lines like ``    name)``)."""
    return re.findall(r"^\s{4}([a-z][a-z0-9_-]*)\)", script.read_text(), flags=re.M)


def tree_bytes(root: Path) -> int:
    """Size of what travels of the working tree: tracked files and untracked files that git
    does not ignore (0 outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in out.decode(errors="replace").split("\0"):
        path = root / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def check(wheels: Optional[Path], script: Path, root: Path,
          parts: Sequence[Tuple[str, int]] = PARTS) -> Tuple[List[str], List[str]]:
    """The dry run: ``(report lines, problems)``; no problems means the suite is consistent."""
    report, problems = [], []
    total = sum(b for _, b in parts)
    report.append("parts (in order): " + ", ".join(f"{n} {b}s" for n, b in parts))
    report.append(f"budgets: {total} s in all (limit {TOTAL_BUDGET_S} s)")
    if total > TOTAL_BUDGET_S:
        problems.append(f"the budgets add up to {total} s, over {TOTAL_BUDGET_S} s")
    if any(b <= 0 for _, b in parts):
        problems.append("a part has no time budget")
    handled = set(script_parts(script))
    missing = [n for n, _ in parts if n not in handled]
    if missing:
        problems.append(f"{script.name} has no case for the part(s) {missing}")

    tree = tree_bytes(root)
    wheel_bytes = 0
    if wheels is None or not wheels.is_dir():
        problems.append(f"no wheel folder {wheels}")
    else:
        files = sorted(p for p in wheels.iterdir() if p.is_file())
        by_name: Dict[str, List[str]] = {}
        for f in files:
            wheel_bytes += f.stat().st_size
            why = wheel_problem(f.name)
            if why:
                problems.append(f"{f.name}: {why}")
                continue
            by_name.setdefault(parse_wheel(f.name)["name"], []).append(f.name)
            report.append(f"  {f.name}  {f.stat().st_size / 2**20:.2f} MiB")
        for name, found in by_name.items():
            if len(found) > 1:
                problems.append(f"several wheels of {name}: {found} (pip stops on two)")
        for name in REQUIRED_WHEELS:
            if name not in by_name:
                problems.append(f"no wheel for {name} in {wheels}")
    carried = tree + wheel_bytes
    report.append(f"carried: working tree {tree / 2**20:.2f} MiB + wheels "
                  f"{wheel_bytes / 2**20:.2f} MiB = {carried / 2**20:.2f} MiB "
                  f"(limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB)")
    if carried > CARRY_LIMIT_BYTES:
        problems.append(f"{carried / 2**20:.1f} MiB would travel, over the "
                        f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB limit")
    return report, problems


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("parts", help="print 'name budget_s' per part, in order")
    c = sub.add_parser("check", help="the dry run")
    c.add_argument("--wheels", type=Path, default=root / ".whl")
    c.add_argument("--script", type=Path, default=root / "benchmarks" / "gpu_suite.sh")
    c.add_argument("--root", type=Path, default=root, help="the working tree that travels")
    args = parser.parse_args(argv)
    if args.command == "parts":
        for name, budget in PARTS:
            print(name, budget)
        return 0
    report, problems = check(args.wheels, args.script, args.root)
    print("\n".join(report))
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
