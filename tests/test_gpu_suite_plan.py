"""The GPU suite's dry run (``benchmarks/gpu_suite.sh --dry-run``) on fake wheel folders: it
passes a complete folder of Python 3.12 wheels and fails wrong tags, duplicates, missing wheels,
an oversized carry and budgets over the limit. Runs on the CPU; nothing is installed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite_plan as plan  # noqa: E402

GOOD = ["diffusers-0.42.1-py3-none-any.whl", "importlib_metadata-10.2.0-py3-none-any.whl",
        "gsplat-1.5.3-py3-none-any.whl", "nerfacc-0.5.3-py3-none-any.whl",
        "omegaconf-2.4.0-py3-none-any.whl", "antlr4_python3_runtime-4.13.2-py3-none-any.whl",
        "plyfile-1.1.5-py3-none-any.whl",
        "PyMCubes-0.1.6-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]


def _folder(tmp_path, names, big=None):
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"PK\x05\x06" + b"\0" * 18)
    if big:
        with open(folder / big, "wb") as f:
            f.truncate(65 * 2**20)  # sparse: 65 MiB long, nothing written
    return folder


def _dry_run(folder):
    env = {**os.environ, "WHEELS": str(folder)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_dry_run_passes_a_complete_folder(tmp_path):
    rc, out = _dry_run(_folder(tmp_path, GOOD))
    assert rc == 0, out
    assert "dry run: ok" in out and "budgets: " in out and "(limit 600 s)" in out
    assert sum(b for _, b in plan.PARTS) <= plan.TOTAL_BUDGET_S


@pytest.mark.parametrize("bad, why", [
    ("PyMCubes-0.1.6-cp311-cp311-manylinux_2_17_x86_64.whl", "not for Python 3.12"),
    ("PyMCubes-0.1.6-cp312-cp312-win_amd64.whl", "not x86-64 Linux"),
    ("PyMCubes-0.1.6-cp312-cp312-manylinux_2_17_aarch64.whl", "not x86-64 Linux"),
    ("PyMCubes-0.1.6-cp312-cp312-macosx_11_0_arm64.whl", "not x86-64 Linux"),
    ("PyMCubes-0.1.6.tar.gz", "not a wheel"),
])
def test_dry_run_fails_a_wrong_wheel(tmp_path, bad, why):
    rc, out = _dry_run(_folder(tmp_path, GOOD[:-1] + [bad]))
    assert rc == 1 and why in out and "no wheel for pymcubes" in out, out


def test_dry_run_fails_missing_duplicate_and_oversized(tmp_path):
    rc, out = _dry_run(_folder(tmp_path, GOOD[1:] + ["plyfile-1.1.4-py3-none-any.whl"]))
    assert rc == 1 and "no wheel for diffusers" in out and "several wheels of plyfile" in out
    rc, out = _dry_run(_folder(tmp_path / "big", GOOD, big="torch_big-1.0-py3-none-any.whl"))
    assert rc == 1 and "over the 64 MiB limit" in out, out


def test_wheel_tags():
    assert plan.wheel_problem("tokenizers-0.22.1-cp39-abi3-manylinux_2_17_x86_64.whl") is None
    assert plan.wheel_problem("x-1.0-cp313-abi3-manylinux_2_17_x86_64.whl") is not None
    assert plan.wheel_problem("x-1.0-py2.py3-none-any.whl") is None
    assert plan.wheel_problem("x-1.0-1-cp312-cp312-linux_x86_64.whl") is None  # build tag


def test_budgets_and_script_parts_are_checked(tmp_path):
    folder = _folder(tmp_path, GOOD)
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    assert [n for n, _ in plan.PARTS] == [p for p in plan.script_parts(script)]
    _, problems = plan.check(folder, script, ROOT, parts=plan.PARTS + (("extra", 100),))
    assert any("add up to 680 s" in p for p in problems)
    assert any("no case for the part(s) ['extra']" in p for p in problems)
    order = [n for n, _ in plan.PARTS]
    assert order[:4] == ["install", "build", "tests", "step"]  # value first
