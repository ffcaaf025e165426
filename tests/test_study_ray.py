"""The Ray executor on a real local Ray cluster (four worker processes). A study driver in its
own process joins the cluster through ``ray.address``; one of its runs' workers is killed with
SIGKILL mid-run, Ray reruns the task, and the rerun resumes the run from its checkpoint."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from .study_helpers import (DRIVER, REPO, invocations, process_alive, run_folder, saved_state,
                            study_dir, write_fake_study)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[study]')")


@pytest.fixture
def ray_address():
    """A local Ray cluster with 4 CPUs, started here; its address. Its temporary folder is short
    (Ray's socket paths must fit in 107 bytes) and removed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    context = ray.init(num_cpus=4, _temp_dir=temp_dir, include_dashboard=False,
                       log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_study_survives_a_killed_worker(tmp_path, ray_address):
    path = write_fake_study(tmp_path, job={"steps": 6, "step_s": 0.4},
                            study={"executor": "ray", "ray": {"max_retries": 2}})
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path),
                               f"ray.address={ray_address}"], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim_folder = run_folder(tmp_path, "alpha", "a_mug", 0)
    deadline = time.time() + 60
    while not list(victim_folder.glob("fake/*@*/ckpt/step.json")) and time.time() < deadline:
        time.sleep(0.1)  # until the victim's run has a checkpoint
    worker = int((victim_folder / "parent.pid").read_text())  # the Ray worker running the task
    assert worker not in (os.getpid(), driver.pid)
    os.kill(worker, signal.SIGKILL)
    _, errors = driver.communicate(timeout=120)

    assert driver.returncode == 0, errors[-2000:]
    assert (study_dir(tmp_path) / "report.html").is_file()
    assert all(r["status"] == "done" for r in saved_state(tmp_path).values())
    calls = invocations(victim_folder)
    assert [a for a, _, _ in calls] == ["start", "resume"] and calls[1][1] > 0
    assert not process_alive(calls[0][2])  # the killed worker's job died with it
    folders = [run_folder(tmp_path, m, p, s) for m in ("alpha", "beta")
               for p in ("a_mug", "a_chair") for s in (0, 1)]
    assert sum(len(invocations(f)) for f in folders) == 9  # one run started twice
