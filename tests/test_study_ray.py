"""The Ray executor on a real local Ray cluster (four worker processes): a study of the fake job
completes although a worker running one of its tasks is killed with SIGKILL; Ray reruns the task,
which resumes the run from its checkpoint."""

import os
import shutil
import signal
import tempfile
import threading
import time

import pytest

from study import run_study

from .study_helpers import (invocations, load_study, process_alive, run_folder, saved_state,
                            write_fake_study)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[study]')")


@pytest.fixture
def ray_cluster():
    """A local Ray cluster with 4 CPUs; its temporary folder is short (Ray's socket paths must
    fit in 107 bytes) and removed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=4, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_study_survives_a_killed_worker(tmp_path, ray_cluster):
    path = write_fake_study(tmp_path, job={"steps": 6, "step_s": 0.4},
                            study={"executor": "ray", "ray": {"max_retries": 2}})
    summary = {}
    driver = threading.Thread(target=lambda: summary.update(run_study(load_study(path))))
    driver.start()
    victim_folder = run_folder(tmp_path, "alpha", "a_mug", 0)
    deadline = time.time() + 60
    while not list(victim_folder.glob("fake/*@*/ckpt/step.json")) and time.time() < deadline:
        time.sleep(0.1)  # until the victim's run has a checkpoint
    worker = int((victim_folder / "parent.pid").read_text())  # the Ray worker running the task
    assert worker != os.getpid()
    os.kill(worker, signal.SIGKILL)
    driver.join(timeout=120)

    assert not driver.is_alive()
    assert (summary["done"], summary["failed"]) == (8, 0)
    calls = invocations(victim_folder)
    assert [a for a, _, _ in calls] == ["start", "resume"] and calls[1][1] > 0
    assert not process_alive(calls[0][2])  # the killed worker's job died with it
    assert all(r["status"] == "done" for r in saved_state(tmp_path).values())
    others = [run_folder(tmp_path, m, p, s) for m in ("alpha", "beta")
              for p in ("a_mug", "a_chair") for s in (0, 1)]
    assert sum(len(invocations(f)) for f in others) == 9  # one run started twice
