"""Damaged, cut-short and misplaced files: checkpoints, config files, input images and TRELLIS
model folders are refused with an error naming the file and the fix, never a traceback or a
silently different result."""

import errno
import os
import shutil
import signal
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from cfd.systems.checkpoint import load_checkpoint, save_checkpoint

LATEST, DIGEST = "last.pt", "last.pt.sha256"


# --- checkpoints ---------------------------------------------------------------------------------

def _state(step=3):
    g = torch.Generator().manual_seed(step)
    means = torch.randn(300, 3, generator=g)
    return {"step": step, "scene": {"splats": {"means": means}},
            "optimiser": {"state": {0: {"exp_avg": torch.randn(4000, generator=g)}}}}


def _member_data(path: Path, nbytes: int):
    """(offset, size) in the file of the zip member holding a tensor of ``nbytes`` bytes."""
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if i.file_size == nbytes]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _corrupt(path: Path, what: str):
    """Change tensor bytes inside the zip member in place (torch.load checks no CRC)."""
    data = bytearray(path.read_bytes())
    if what == "means + 1.0":
        offset, _ = _member_data(path, 300 * 3 * 4)
        values = torch.frombuffer(bytearray(data[offset:offset + 400]), dtype=torch.float32) + 1
        data[offset:offset + 400] = values.numpy().tobytes()
    else:  # 64 bytes of the optimiser state flipped
        offset, size = _member_data(path, 4000 * 4)
        start = offset + size // 2
        data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["means + 1.0", "optimiser bytes flipped"])
def test_a_checkpoint_with_changed_tensor_bytes_is_refused(tmp_path, what):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, _state())
    intact = load_checkpoint(ckpt)
    assert torch.equal(intact["scene"]["splats"]["means"], _state()["scene"]["splats"]["means"])
    _corrupt(ckpt / LATEST, what)
    # torch.load alone takes it, with other values
    changed = torch.load(ckpt / LATEST, weights_only=False)
    tensors = lambda s: (s["scene"]["splats"]["means"],  # noqa: E731
                         s["optimiser"]["state"][0]["exp_avg"])
    assert changed["step"] == 3
    assert not all(map(torch.equal, tensors(changed), tensors(intact)))
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt / LATEST} is damaged: its SHA-256 "
                                         rf"digest is not the one recorded in {ckpt / DIGEST}"):
        load_checkpoint(ckpt)


def test_the_digest_file_is_sha256sum_s_and_a_missing_one_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, _state())
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", DIGEST], cwd=ckpt,
                              capture_output=True).returncode == 0
    (ckpt / DIGEST).unlink()
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt / LATEST} has no digest file .*"
                                         rf"record its digest with `cd {ckpt} && sha256sum "
                                         rf"last.pt > last.pt.sha256`"):
        load_checkpoint(ckpt)
    (ckpt / DIGEST).write_text("not a digest\n")
    with pytest.raises(ValueError, match=rf"checkpoint digest file {ckpt / DIGEST} is damaged"):
        load_checkpoint(ckpt)


def test_every_state_a_kill_can_leave_loads_a_whole_checkpoint(tmp_path, monkeypatch):
    """The folder is recorded before and after each rename of the two saves (the first, and
    one over it): every state a kill can leave, temporaries included. Each loads the checkpoint
    before or after the save in progress, and no temporary file is left."""
    ckpt = tmp_path / "ckpt"
    states = []
    real_replace = os.replace

    def record():
        states.append({p.name: p.read_bytes() for p in ckpt.iterdir()})

    def replace(src, dst):
        record()
        real_replace(src, dst)
        record()

    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(ckpt, _state(step=3))
    first = len(states)
    save_checkpoint(ckpt, _state(step=6))
    monkeypatch.undo()
    assert any(name.endswith(".tmp") for s in states for name in s)
    for i, files in enumerate(states):
        folder = tmp_path / f"state{i}" / "ckpt"
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        state = load_checkpoint(folder)
        allowed = ({None, 3} if i < first else {3, 6})
        assert (None if state is None else state["step"]) in allowed, (i, sorted(files))
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], i
    assert load_checkpoint(ckpt)["step"] == 6


def test_resume_removes_only_the_temporaries_a_killed_write_left(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, _state())
    stale = [ckpt / ".last.pt.abc123.tmp", ckpt / ".last.pt.sha256.x_9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    others = [ckpt / "notes.tmp", ckpt / ".other.pt.abc.tmp", ckpt / "last.pt.tmp"]
    for p in others:
        p.write_bytes(b"not ours")
    assert load_checkpoint(ckpt)["step"] == 3
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def _disk_full_after(limit, monkeypatch):
    """Files opened through os.fdopen (the temporaries) fail with ENOSPC past ``limit`` bytes."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "ckpt"
    (run_dir / "ckpt").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("job: distill\n")
    save_checkpoint(ckpt, _state(step=3))
    _disk_full_after(4096, monkeypatch)
    with pytest.raises(ValueError) as err:
        save_checkpoint(ckpt, _state(step=6))
    monkeypatch.undo()
    assert str(err.value) == (
        f"cannot save the checkpoint of step 6 in {ckpt}: the disk is full (No space left on "
        f"device). Nothing was lost: the previous checkpoint {ckpt / LATEST}, of step 3, is "
        "intact; free some space on that disk (or move the run folder to one with room), then "
        f"continue with: python run.py --resume {run_dir}")
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, DIGEST]
    assert load_checkpoint(ckpt)["step"] == 3


@pytest.mark.parametrize("failing", [1, 2])
def test_a_full_disk_at_a_digest_write_leaves_a_verified_checkpoint(tmp_path, monkeypatch,
                                                                    failing):
    """The digest file's first rewrite (both digests) or its second (the new one only) fails:
    the previous checkpoint, or the new one already in place, is the one kept and named."""
    import cfd.systems.checkpoint as checkpoint

    save_checkpoint(tmp_path / "ckpt", _state(step=3))
    calls, real = [], checkpoint.atomic_write

    def atomic_write(path, write):
        calls.append(path)
        if len(calls) == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    with pytest.raises(ValueError) as err:
        save_checkpoint(tmp_path / "ckpt", _state(step=6))
    monkeypatch.undo()
    kept = {1: f"the previous checkpoint {tmp_path / 'ckpt' / LATEST}, of step 3, is intact",
            2: f"the checkpoint {tmp_path / 'ckpt' / LATEST} of step 6 was written whole"}
    assert "the disk is full" in str(err.value) and kept[failing] in str(err.value)
    assert str(err.value).endswith(f"then resume the run in {tmp_path}")
    assert load_checkpoint(tmp_path / "ckpt")["step"] == {1: 3, 2: 6}[failing]


def test_a_full_disk_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    _disk_full_after(4096, monkeypatch)
    with pytest.raises(ValueError, match="there is no earlier checkpoint, so a resumed run "
                                         "starts again at step 0"):
        save_checkpoint(tmp_path / "ckpt", _state(step=6))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "ckpt") is None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root")
def test_a_really_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save_checkpoint(disk / "ckpt", _state(step=3))
        big = {**_state(step=6), "extra": torch.zeros(200_000)}
        with pytest.raises(ValueError, match=rf"the disk is full .* the previous checkpoint "
                                             rf"{disk / 'ckpt' / LATEST}, of step 3, is intact"):
            save_checkpoint(disk / "ckpt", big)
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == [LATEST, DIGEST]
        assert load_checkpoint(disk / "ckpt")["step"] == 3
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- config files --------------------------------------------------------------------------------

def _png_bytes(size=16):
    import io

    import numpy as np
    from PIL import Image

    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40, 40, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("content", ["random bytes", "png"])
def test_a_binary_config_file_is_not_a_yaml_text_file(tmp_path, content):
    from cfd.config import ConfigError, read_yaml

    path = tmp_path / "config.yaml"
    path.write_bytes(_png_bytes() if content == "png"
                     else bytes(torch.randint(0, 256, (200,),
                                              generator=torch.Generator().manual_seed(1))
                                .to(torch.uint8).tolist()))
    with pytest.raises(ConfigError, match=rf"config file {path} is not a YAML text file "
                                          r"\(.*\): give a \.yaml config file"):
        read_yaml(path)
    path.write_bytes(b"job: distill\nsteps: 3\x00\x01\n")  # UTF-8, but controls no text holds
    with pytest.raises(ConfigError, match=rf"{path} is not a YAML text file \(it holds the "
                                          r"control character #x00"):
        read_yaml(path)


def test_a_directory_given_as_config_says_so(tmp_path):
    from cfd.config import ConfigError, read_yaml

    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is a directory, not a YAML "
                                          r"file: give the path of a \.yaml config file$"):
        read_yaml(tmp_path)
    (tmp_path / "config.yaml").write_text("job: distill\n")
    with pytest.raises(ConfigError, match=rf"holds config.yaml: --resume {tmp_path} continues "
                                          rf"that run, --config {tmp_path / 'config.yaml'}"):
        read_yaml(tmp_path)


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n# and another\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    from cfd.config import ConfigError, read_yaml

    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {path} is empty .* or {{}} to run the "
                                          r"job's defaults on purpose"):
        read_yaml(path)
    path.write_text("# all defaults, on purpose\n{}\n")
    assert len(read_yaml(path)) == 0


# --- input images --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["first 100 bytes", "first 20 bytes", "half", "folder"])
@pytest.mark.parametrize("setting", ["image", "mask", "priors"])
def test_a_damaged_or_folder_image_input_names_file_setting_and_fix(tmp_path, damage, setting):
    from relaxflow.conditioning import load_object

    good = tmp_path / "good.png"
    good.write_bytes(_png_bytes(64))
    bad = tmp_path / "bad.png"
    if damage == "folder":
        bad.mkdir()
    else:
        data = _png_bytes(64)
        bad.write_bytes({"first 100 bytes": data[:100], "first 20 bytes": data[:20],
                         "half": data[:len(data) // 2]}[damage])
    if setting == "mask":
        call = lambda: load_object(good, mask=bad)  # noqa: E731
    elif setting == "priors":
        call = lambda: load_object(bad, setting="priors")  # noqa: E731
    else:
        call = lambda: load_object(bad)  # noqa: E731
    fix = {"folder": rf"is a folder, not an image file: give the path of a PNG or JPEG file as "
                     rf"{setting}=$"}.get(damage, rf"is damaged or cut short \(.+\): save or copy "
                                                  rf"it again, or give another image as "
                                                  rf"{setting}=$")
    with pytest.raises(ValueError, match=rf"^image {bad} \(given as {setting}=\) {fix}"):
        call()
    assert load_object(good).shape == (3, 518, 518)


# --- TRELLIS model folders -----------------------------------------------------------------------

DECODER = dict(out_channels=1, latent_channels=2, num_res_blocks=1, channels=[16, 8],
               num_res_blocks_middle=1, use_fp16=True)
MODELS = {"sparse_structure_flow_model": "ckpts/ss_flow",
          "sparse_structure_decoder": "ckpts/ss_dec",
          "slat_flow_model": "ckpts/slat_flow", "slat_decoder_gs": "ckpts/slat_dec_gs"}


def _pipeline_folder(root: Path) -> Path:
    """A pipeline folder whose files have the released layout; only the structure decoder is a
    real (tiny) model, the others' files are stand-ins (only their headers are read here)."""
    from safetensors.torch import save_file

    from relaxflow.loading import save_model
    from relaxflow.models import build

    for key, ref in MODELS.items():
        if key == "sparse_structure_decoder":
            torch.manual_seed(0)
            save_model(build("SparseStructureDecoder", DECODER), "SparseStructureDecoder",
                       DECODER, root, ref)
        else:
            (root / ref).parent.mkdir(parents=True, exist_ok=True)
            (root / f"{ref}.json").write_text('{"name": "Stand-in", "args": {}}')
            save_file({"weight": torch.zeros(64)}, str(root / f"{ref}.safetensors"))
    (root / "pipeline.json").write_text(
        '{"name": "TrellisImageTo3DPipeline", "args": {"models": {%s}}}'
        % ", ".join(f'"{k}": "{v}"' for k, v in MODELS.items()))
    return root


@pytest.mark.parametrize("keep", ["4 bytes", "half the header", "all but the last byte"])
def test_a_truncated_safetensors_file_is_named_as_damaged(tmp_path, keep):
    from relaxflow.loading import load_model

    root = _pipeline_folder(tmp_path / "model")
    weights = root / "ckpts" / "ss_dec.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:{"4 bytes": 4, "half the header": header // 2,
                               "all but the last byte": len(data) - 1}[keep]])
    damaged = (rf"^{weights} is damaged or cut short \(.+\): re-download or re-copy it \(a "
               r"download or copy that stopped early leaves such a file\)$")
    with pytest.raises(ValueError, match=damaged):
        load_model(root, "ckpts/ss_dec")
    from relaxflow.loading import check_pipeline_files

    with pytest.raises(ValueError, match=damaged):
        check_pipeline_files(root)


@pytest.mark.parametrize("content,problem", [
    ('{"name": "TrellisImageTo3DPipeline", "args": {"mod', r"is not valid JSON \(.+ at line 1, "
                                                           r"column \d+\): the file is damaged "
                                                           r"or cut short; re-download"),
    ("\x89PNG\r\n\x1a\n\x00\x00", r"is not a JSON text file \(byte 0 is not UTF-8 text\)"),
    ('[1, 2]', r"must hold a JSON object \(\{\.\.\.\}\), not a list"),
    ('"pipeline"', r"must hold a JSON object \(\{\.\.\.\}\), not a string"),
    ('{"name": "TrellisImageTo3DPipeline", "args": {}}', r"names no models: a TRELLIS "
                                                          r"pipeline.json holds \"args\""),
    ('{"name": "TrellisImageTo3DPipeline"}', "names no models"),
    ('{"args": {"models": ["ckpts/ss_flow"]}}', "names no models"),
])
def test_an_invalid_pipeline_json_names_the_file(tmp_path, content, problem):
    from relaxflow.loading import check_pipeline_files, read_pipeline

    root = _pipeline_folder(tmp_path / "model")
    path = root / "pipeline.json"
    path.write_bytes(content.encode("latin-1"))
    for read in (read_pipeline, check_pipeline_files):
        with pytest.raises(ValueError, match=rf"^{path}:? {problem}"):
            read(root)


def test_an_invalid_model_json_names_the_file(tmp_path):
    from relaxflow.loading import check_pipeline_files, load_model

    root = _pipeline_folder(tmp_path / "model")
    spec = root / "ckpts" / "ss_dec.json"
    spec.write_text('{"name": "SparseStructureDecoder", "args": ')
    for load in (lambda: load_model(root, "ckpts/ss_dec"), lambda: check_pipeline_files(root)):
        with pytest.raises(ValueError, match=rf"^{spec} is not valid JSON"):
            load()
    spec.write_text('{"name": "SparseStructureDecoder"}')
    with pytest.raises(ValueError, match=rf"^{spec} must hold the model's \"name\" .* and "
                                         r"\"args\""):
        check_pipeline_files(root)


@pytest.mark.parametrize("key", sorted(MODELS))
@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_check_pipeline_files_names_any_stage_s_missing_file_in_a_local_folder(tmp_path, key,
                                                                              suffix):
    from guidance.loading import ModelWeightsNotFound
    from relaxflow.loading import check_pipeline_files

    root = _pipeline_folder(tmp_path / "model")
    assert check_pipeline_files(root).models == MODELS
    missing = root / f"{MODELS[key]}{suffix}"
    missing.unlink()
    with pytest.raises(ModelWeightsNotFound) as err:
        check_pipeline_files(root)
    said = str(err.value)
    assert said.startswith(f"the pipeline folder {root} is incomplete: ") and str(missing) in said
    assert "copy that file into it again" in said
    assert "huggingface-cli download" not in said and "download " + str(root) not in said


def test_a_cached_snapshot_s_missing_file_names_the_repo_to_download(tmp_path, monkeypatch):
    from guidance.loading import ModelWeightsNotFound
    from relaxflow.loading import check_pipeline_files, load_model

    hub = tmp_path / "hub"
    snapshot = _pipeline_folder(hub / "models--someone--trellis-copy" / "snapshots" / "abc123")
    (hub / "models--someone--trellis-copy" / "refs").mkdir()
    (hub / "models--someone--trellis-copy" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert check_pipeline_files("someone/trellis-copy").root == snapshot.resolve()
    (snapshot / "ckpts" / "ss_dec.safetensors").unlink()
    for check in (lambda: check_pipeline_files("someone/trellis-copy"),
                  lambda: load_model(snapshot, "ckpts/ss_dec")):
        with pytest.raises(ModelWeightsNotFound) as err:
            check()
        assert "huggingface-cli download someone/trellis-copy --local-dir" in str(err.value)
        assert "ss_dec.safetensors are missing" in str(err.value)


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_a_truncated_safetensors_in_a_diffusers_folder_is_named(tmp_path, monkeypatch,
                                                                component):
    from guidance.stable_diffusion import StableDiffusionGuidance

    from .tiny_models import build_tiny_sd

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_tiny_sd(tmp_path / "sd", "epsilon", seed=0)
    (weights,) = (path / component).glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{weights} is damaged or cut short \(.+\): "
                                         r"re-download or re-copy it"):
        StableDiffusionGuidance.from_pretrained(str(path))


def test_a_ctrl_c_held_off_during_a_block_is_delivered_after_it():
    from core.runtime import interrupts_held

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            finished.append(True)  # the block is not cut short
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_ctrl_c_goes_to_the_handler_that_was_there():
    from core.runtime import interrupts_held

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_held():  # an ignored SIGINT (a background job) stays ignored
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_in_a_held_block_goes_through_at_once():
    from core.runtime import interrupts_held

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            reached.append(1)
            signal.raise_signal(signal.SIGINT)  # a save that hangs can still be stopped
            reached.append(2)
    assert reached == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_a_held_block_wins_over_the_held_ctrl_c():
    from core.runtime import interrupts_held

    with pytest.raises(OSError, match="disk full"):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
