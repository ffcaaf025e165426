"""Config loading and overrides, run folders, the command line (the demo job, shortened)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfd.config import ConfigError, load_config
from jobs.fit_splats import FitSplatsConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo-fit-splats.yaml"


def test_overrides_and_types():
    cfg = load_config(FitSplatsConfig, CONFIG, ["steps=7", "lr.means=0.5", "densify.enabled=false"])
    assert cfg.steps == 7 and cfg.lr.means == 0.5 and cfg.densify.enabled is False
    assert cfg.densify.refine_every == 50  # from the YAML
    with pytest.raises(ConfigError, match="invalid config value"):
        load_config(FitSplatsConfig, CONFIG, ["steps=many"])


def test_unknown_keys_name_the_closest_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lr.mean'.*lr.means"):
        load_config(FitSplatsConfig, CONFIG, ["lr.mean=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: fit-splats\nresolutoin: 32\n")
    with pytest.raises(ConfigError, match=r"'resolutoin'.*resolution"):
        load_config(FitSplatsConfig, bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(FitSplatsConfig, CONFIG, ["steps"])


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_demo_job_end_to_end(tmp_path):
    proc = _run("--config", str(CONFIG), f"output_dir={tmp_path}", "steps=60", "resolution=32",
                "init_splats=500", "video_frames=4", "video_size=32", "log_every=30",
                "densify.refine_start_iter=10", "densify.refine_every=20",
                "densify.refine_stop_iter=50", "densify.reset_every=1000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = list((tmp_path / "demo-fit-splats").iterdir())
    assert run_dir.name.startswith("snowman@")
    for name in ("config.yaml", "splats.ply", "metrics.json", "progress_00030.png",
                 "progress_00060.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "orbit.mp4").is_file() or (run_dir / "orbit.gif").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["psnr"] > 18.0  # a blob start scores about 12 dB
    # files written atomically are as readable as any other the run wrote (not mkstemp's 0600)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {name: (run_dir / name).stat().st_mode & 0o777
             for name in ("config.yaml", "metrics.json", "splats.ply")}
    assert set(modes.values()) == {plain.stat().st_mode & 0o777}, modes


def test_cli_rejects_bad_keys_with_a_clear_message(tmp_path):
    proc = _run("--config", str(CONFIG), "stpes=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'stpes'" in proc.stderr and "steps" in proc.stderr
    proc = _run("--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from omegaconf import OmegaConf

    import jobs

    job = jobs.load(OmegaConf.load(path).get("job", "distill"))
    cfg = load_config(job.Config, path)
    assert cfg.name == path.stem


def test_resume_takes_no_overrides(tmp_path, capsys):
    """A resumed run continues as configured: an override would change it unrecorded."""
    import run

    (tmp_path / "config.yaml").write_text("job: distill\nsteps: 10\n")
    assert run.main(["--resume", str(tmp_path), "steps=20"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume takes no overrides (got steps=20)" in err
    assert "start a new run to change settings" in err


def test_fit_splats_refuses_bad_counts_and_devices_before_making_a_run_folder(tmp_path, capsys):
    import run

    for override, message in (("eval_views=0", "eval_views must be >= 1"),
                              ("backend=gsplat", "backend=gsplat needs device=cuda"),
                              ("camera.fov_range=[0.0,0.0]", "camera.fov_range")):
        assert run.main(["--config", str(CONFIG), f"output_dir={tmp_path}", override]) == 2
        assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "demo-fit-splats").exists()


DISTILL_CONFIG = ROOT / "configs" / "cfd-splats-embedded.yaml"


@pytest.mark.parametrize("value, text", [
    ("a mug #2", "a mug #2"),  # YAML: a comment
    ("a mug: blue", "a mug: blue"),  # YAML: a mapping
    ("yes", "yes"), ("on", "on"),  # YAML: True
    ("1e3", "1e3"),  # YAML: 1000.0
    ("*star", "*star"),  # YAML: an alias
    ("'a mug'", "a mug"), ('"a # b"', "a # b"), ("'yes'", "yes"),  # one pair of quotes dropped
    ("it's", "it's"), ("", ""),
])
def test_text_overrides_are_taken_as_written(value, text):
    from jobs.distill import DistillConfig

    cfg = load_config(DistillConfig, DISTILL_CONFIG, [f"prompt_processor.prompt={value}"])
    assert cfg.prompt_processor.prompt == text


def test_other_overrides_are_yaml_and_null_unsets_optional_text():
    from jobs.distill import DistillConfig

    cfg = load_config(DistillConfig, DISTILL_CONFIG, [
        "steps=7", "camera.elevation_range=[1,2]", "loss.lambda_sds=[0, 1.0, 2.0, 10]",
        "splats.densify.enabled=no", "splats.init.path=a.ply", "splats.init.path=null",
        "name=${job}-x"])
    assert cfg.steps == 7 and list(cfg.camera.elevation_range) == [1.0, 2.0]
    assert list(cfg.loss.lambda_sds) == [0, 1.0, 2.0, 10] and cfg.splats.densify.enabled is False
    assert cfg.splats.init.path is None and cfg.name == "distill-x"
    assert load_config(DistillConfig, DISTILL_CONFIG,
                       ["splats.init.path='null'"]).splats.init.path == "null"


@pytest.mark.parametrize("override, message", [
    ("camera.elevation_range=[1,2,3", r"the value of override 'camera.elevation_range=\[1,2,3' "
                                      r"is not valid YAML .*close its brackets, and quote"),
    ("steps=*star", "override 'steps=\\*star' is not valid YAML .*undefined alias"),
    ("steps=${oops}", r"invalid config value of steps in the override 'steps=\$\{oops\}': "
                      "Interpolation key 'oops' not found"),
    ("steps=${name}", "invalid config value of steps.*could not be converted to Integer"),
    ("prompt_processor.prompt=a ${oops}", "prompt_processor.prompt in the override"),
    ("prompt_processor.prompt=a ${", r"override 'prompt_processor.prompt=a \$\{': .*"
                                     r"a literal \$\{ is written \\\$\{"),
])
def test_bad_override_values_are_config_errors_naming_the_override(override, message):
    from jobs.distill import DistillConfig

    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, DISTILL_CONFIG, [override])


@pytest.mark.parametrize("text, message", [
    ("job: distill\nsteps: [1\n", r"bad.yaml is not valid YAML: while parsing a flow sequence: "
                                  r"did not find expected ',' or '\]' \(line 3, column 1\)"),
    ("job: distill\nsteps: 3\nsteps: 4\n", "bad.yaml is not valid YAML: .*duplicate key steps"),
    ("- a\n- b\n", "bad.yaml must hold a YAML mapping at the top level"),
    ("job: distill\nsteps: ${oops}\n", "invalid config value of steps in .*bad.yaml: "
                                        "Interpolation key 'oops' not found"),
    ("job: ${oops}\n", r"unknown job '\$\{oops\}' in .*bad.yaml"),
])
def test_bad_config_files_are_errors_naming_the_file(tmp_path, capsys, text, message):
    import run

    (tmp_path / "bad.yaml").write_text(text)
    assert run.main(["--config", str(tmp_path / "bad.yaml"), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_bad_override_on_the_command_line_is_exit_code_2(tmp_path, capsys):
    import run

    assert run.main(["--config", str(DISTILL_CONFIG), f"output_dir={tmp_path}",
                     "steps=${oops}"]) == 2
    assert "error: invalid config value of steps" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_help_lists_every_command_and_a_mistyped_one_is_named(tmp_path, capsys):
    import run

    with pytest.raises(SystemExit) as done:
        run.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("generate", "relaxflow", "refine", "fit-splats", "study", "prompts",
                    "ship-generator", "--resume"):
        assert command in out, command
    assert run.main(["relax", "--config", "configs/relaxflow-trellis.yaml"]) == 2
    assert ("error: unknown command 'relax'; known: distill, fit-splats, generate, relaxflow, "
            "refine, study, train-generator, prompts, ship-generator") in capsys.readouterr().err


def test_runs_started_at_the_same_moment_get_their_own_folders(tmp_path):
    """Checking for a folder and then making it races with another run doing the same."""
    import threading

    from core.runtime import make_run_dir

    for trial in range(30):
        root, made, errors = tmp_path / str(trial), [], []
        barrier = threading.Barrier(8)

        def start():
            barrier.wait()
            try:
                made.append(make_run_dir(str(root), "cfg", "a mug"))
            except OSError as err:
                errors.append(err)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(made)) == 8 and all(p.is_dir() for p in made), errors


def test_atomic_writes_have_the_mode_a_plain_write_would(tmp_path):
    """Results written through a private temporary file still follow the umask, so other users
    can read them (a checkpoint, metrics.json)."""
    import os
    import stat

    from core.runtime import atomic_write

    umask = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "metrics.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"{}" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_run_folder_names_keep_letters_of_any_script():
    from core.runtime import slugify

    assert slugify("チェア") == "チェア" and slugify("un café") == "un_café"
    assert slugify("cafe\u0301") == "café"  # a combining accent, composed
    assert slugify("a/b\\c\x00d\ne 🍵") == "a_b_c_d_e" and slugify("../..") == ".._.."
    assert slugify(" 🍵 ") == "run"
    long = slugify("\U00020000" * 100)  # 4 bytes each in UTF-8
    assert len(long) <= 60 and len(long.encode()) <= 180
