"""The study driver with the local executor, on the fake job: config, plan, failures, skipping,
resuming, a driver killed with SIGKILL, and the report's files and numbers."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats

from cfd.config import ConfigError
from study import ExecutorKind, run_study
from study.plan import plan_runs
from study.report import summarize

from .study_helpers import (DRIVER, REPO, invocations, load_study, process_alive, run_folder,
                            saved_state, study_dir, write_fake_study)


def test_config_is_typed_and_strict(tmp_path):
    path = write_fake_study(tmp_path, study={"executor": "ray", "threads_per_run": 2})
    cfg = load_study(path, ["ray.address=auto", "ray.num_gpus=1"])
    assert cfg.executor is ExecutorKind.ray and cfg.ray.address == "auto"
    assert cfg.methods[1].job_keys.prompt == "prompt_processor.prompt"  # the distill default
    with pytest.raises(ConfigError, match="executor"):
        load_study(path, ["executor=slurm"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_study(path, ["max_paralel=3"])
    bad_method = yaml.safe_load(path.read_text())
    bad_method["methods"][0]["overide"] = ["steps=2"]
    path.write_text(yaml.safe_dump(bad_method))
    with pytest.raises(ConfigError, match="overide"):
        load_study(path)


def test_plan_gives_each_run_its_folder_and_keys(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# the study's prompts\na mug\n\na chair\n")
    path = write_fake_study(tmp_path, study={"prompts": [], "prompts_file": str(prompts),
                                             "seeds": [3]})
    specs = plan_runs(OmegaConf.to_object(load_study(path)))
    assert [(s.method, s.prompt, s.seed) for s in specs] == [
        ("alpha", "a mug", 3), ("alpha", "a chair", 3), ("beta", "a mug", 3),
        ("beta", "a chair", 3)]
    beta_chair = specs[3]
    assert beta_chair.output_dir == str(run_folder(tmp_path, "beta", "a_chair", 3))
    assert beta_chair.overrides == ("quality=-2", "prompt_processor.prompt=a chair", "seed=3",
                                    f"output_dir={beta_chair.output_dir}")
    assert beta_chair.command[0] == sys.executable


def test_plan_refuses_colliding_folders(tmp_path):
    path = write_fake_study(tmp_path, study={"prompts": ["a mug", "a  mug"]})
    with pytest.raises(ConfigError, match="a_mug"):
        plan_runs(OmegaConf.to_object(load_study(path)))


def test_study_runs_records_failures_and_reports(tmp_path):
    fake = str(tmp_path / "fake.yaml")
    methods = [{"name": "alpha", "config": fake},
               {"name": "beta", "config": fake, "overrides": ["quality=-2",
                                                               "fail_prompt=a chair"]}]
    path = write_fake_study(tmp_path, study={"threads_per_run": 2, "methods": methods})
    summary = run_study(load_study(path))
    assert (summary["runs"], summary["done"], summary["failed"]) == (8, 6, 2)

    state = saved_state(tmp_path)
    failed = state["beta/a_chair/seed1"]
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert "error: this prompt was told to fail" in failed["error"]
    log = run_folder(tmp_path, "beta", "a_chair", 1) / "run.log"
    assert "this prompt was told to fail" in log.read_text()

    with open(study_dir(tmp_path) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    done = [r for r in rows if r["status"] == "done"]
    assert {(r["method"], r["prompt"]) for r in done} == {
        ("alpha", "a mug"), ("alpha", "a chair"), ("beta", "a mug")}
    alpha_mug_0 = next(r for r in done if r["method"] == "alpha" and r["prompt"] == "a mug"
                       and r["seed"] == "0")
    metrics = json.loads((Path(alpha_mug_0["run_dir"]) / "metrics.json").read_text())
    assert float(alpha_mug_0["psnr"]) == metrics["psnr"] == 22.0
    assert metrics["omp_threads"] == 2  # threads_per_run reached the job
    assert float(alpha_mug_0["elapsed_s"]) > 0

    report = (study_dir(tmp_path) / "report.md").read_text()
    # alpha on "a mug": psnr 22 and 23 over seeds 0 and 1
    low, high = stats.t.interval(0.95, 1, loc=22.5, scale=0.5)
    assert f"| alpha | a mug | 2 | 0 | 22.5 [{low:.4g}, {high:.4g}] (n=2) |" in report
    assert "| beta | a chair | 0 | 2 | – |" in report
    assert "beta/a_chair/seed0 | 1 | exit code 1: error: this prompt was told to fail" in report
    plots = sorted(p.name for p in (study_dir(tmp_path) / "plots").iterdir())
    assert plots == ["mask_iou_by_method.png", "mask_iou_vs_wall_time.png",
                     "psnr_by_method.png", "psnr_vs_wall_time.png", "wall_s_by_method.png"]


def test_rerun_skips_finished_retries_failed_and_resumes_stopped(tmp_path):
    path = write_fake_study(tmp_path, job={"fail_prompt": "a chair"},
                            study={"methods": [{"name": "alpha", "config": str(tmp_path /
                                                                                 "fake.yaml")}]})
    run_study(load_study(path))
    # a run stopped after its checkpoint at step 2: no metrics.json yet
    stopped = run_folder(tmp_path, "alpha", "a_mug", 1)
    run_dir = next(stopped.glob("fake/*@*"))
    (run_dir / "metrics.json").unlink()
    (run_dir / "ckpt" / "step.json").write_text(json.dumps({"step": 2}))

    summary = run_study(load_study(path, ["retry_failed=false"]))
    assert (summary["done"], summary["failed"]) == (2, 2)
    assert [a for a, _, _ in invocations(run_folder(tmp_path, "alpha", "a_mug", 0))] == ["start"]
    assert [(a, s) for a, s, _ in invocations(stopped)] == [("start", 0), ("resume", 2)]
    assert len(invocations(run_folder(tmp_path, "alpha", "a_chair", 0))) == 1  # not retried

    run_study(load_study(path, ["prompts=[a mug, a chair]"]))  # retry_failed: true
    assert len(invocations(run_folder(tmp_path, "alpha", "a_chair", 0))) == 2
    assert saved_state(tmp_path)["alpha/a_chair/seed0"]["attempts"] == 2


def test_driver_killed_with_sigkill_continues(tmp_path):
    path = write_fake_study(tmp_path, job={"steps": 6, "step_s": 0.3})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(path)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = study_dir(tmp_path) / "state.json"
    deadline = time.time() + 60
    while time.time() < deadline:  # until some runs finished and others are half-way
        time.sleep(0.1)
        if not state_path.is_file():
            continue
        statuses = [r["status"] for r in json.loads(state_path.read_text())["runs"].values()]
        if statuses.count("done") >= 2 and statuses.count("running") >= 1:
            break
    running = [k for k, r in json.loads(state_path.read_text())["runs"].items()
               if r["status"] == "running"]
    while time.time() < deadline:  # the running ones pass a checkpoint (however loaded the CPU)
        if all(any((study_dir(tmp_path) / "runs" / k).rglob("step.json")) for k in running):
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    state = saved_state(tmp_path)  # whole JSON after kill -9
    interrupted = [k for k, r in state.items() if r["status"] == "running"]
    finished = [k for k, r in state.items() if r["status"] == "done"]
    assert interrupted and len(finished) >= 2
    folders = {k: study_dir(tmp_path) / "runs" / k for k in state}
    orphans = [pid for k in interrupted for _, _, pid in invocations(folders[k])]
    time.sleep(1.0)
    assert not any(map(process_alive, orphans))  # the driver's runs died with it

    summary = run_study(load_study(path))
    assert (summary["done"], summary["failed"]) == (8, 0)
    for key in finished:
        assert len(invocations(folders[key])) == 1  # not run again
    for key in interrupted:
        calls = invocations(folders[key])
        assert calls[0][0] == "start" and calls[-1][0] == "resume" and calls[-1][1] > 0
    assert all(r["status"] == "done" for r in saved_state(tmp_path).values())


def test_summary_interval_is_students_t():
    values = [21.0, 23.5, 22.0, 24.0]
    summary = summarize(values)
    low, high = stats.t.interval(0.95, 3, loc=summary.mean, scale=stats.sem(values))
    assert summary.n == 4 and summary.mean == pytest.approx(22.625)
    assert (summary.low, summary.high) == (pytest.approx(low), pytest.approx(high))
    assert summarize([5.0]).text() == "5 (n=1)" and summarize([]).text() == "–"


@pytest.mark.parametrize("name", ["study-embedded", "study-embedded-quick", "study-cfd-vs-sds"])
def test_the_shipped_studies_plan_every_method_with_its_own_keys(name):
    cfg = OmegaConf.to_object(load_study(REPO / "configs" / f"{name}.yaml"))
    specs = plan_runs(cfg)
    assert len(specs) == len(cfg.methods) * len(cfg.prompts) * len(cfg.seeds)
    for spec in specs:
        prompt_key = "prompt" if spec.method in ("generate", "refine") else \
            "prompt_processor.prompt"
        assert f"{prompt_key}={spec.prompt}" in spec.overrides
        assert spec.scene_scale == (1.6 if spec.method == "generate" else 1.0)
