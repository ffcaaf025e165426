"""The train-generator job on a micro configuration: its losses fall, a stopped run resumes bit
for bit, the exported folder loads through the generator's own loaders, bad settings stop it
before a run folder exists."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfd.config import load_config
from core.errors import UserError
from core.runtime import RunInterrupted
from jobs import train_generator
from relaxflow.conditioning import ImageConditioner, load_object
from relaxflow.loading import check_pipeline_files, load_model, read_pipeline
from relaxflow.stages import guided, sample_structure
from relaxflow.training.data import build_structure_data
from relaxflow.training.plots import running_mean
from relaxflow.training.structure import (CONDITIONER_FOLDER, StructureTrainer, fold_latent_scale,
                                          phase_learning_rate)

STRUCTURE_MODELS = ("sparse_structure_encoder", "sparse_structure_decoder",
                    "sparse_structure_flow_model")


def micro(output_dir: Path, cache_dir: Path, **extra) -> list:
    """Overrides of a micro configuration: 3 categories x 2 seeds, 4-8 channel VAE, a one-block
    32-wide flow, a one-layer 16-wide conditioner."""
    items = {
        "output_dir": str(output_dir), "device": "cpu",
        "data.train_seeds": 2, "data.held_out_seeds": 1, "data.categories": "[mug,house,tree]",
        "data.render_resolution": 48, "data.views": 2, "data.cache_dir": str(cache_dir),
        "vae_size.channels": "[4,8,8]", "flow_size.model_channels": 32,
        "flow_size.num_blocks": 1, "conditioner_size.hidden_size": 16,
        "conditioner_size.num_hidden_layers": 1, "conditioner_size.num_attention_heads": 2,
        "conditioner_size.intermediate_size": 32,
        "vae.steps": 4, "flow.steps": 5, "vae.batch_size": 2, "flow.batch_size": 3,
        "checkpoint_every": 3, "log_every": 3, "eval.flow_samples": 2, "eval.sampler.steps": 2,
        "flow.ema_decay": 0.9, "flow.lr_final": 3e-5, "image_framing": "frame",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def config(*overrides):
    return train_generator.typed(load_config(train_generator.Config, None, list(overrides)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    """A micro run trained without a stop: its result."""
    return train_generator.run(config(*micro(tmp_path_factory.mktemp("straight"), cache_dir)))


def test_losses_fall(cache_dir, tmp_path):
    torch.set_num_threads(1)
    c = config(*micro(tmp_path, cache_dir, **{"vae.steps": 40, "flow.steps": 30, "vae.lr": 1e-2,
                                              "flow.lr": 3e-3, "vae.batch_size": 3}))
    trainer = StructureTrainer(c, build_structure_data(c.data), torch.device("cpu"))
    losses = {"vae": [], "flow": []}
    while trainer.step < trainer.total_steps:
        record = trainer.train_step()
        losses[record["phase"]].append(record["loss"])
    for phase, values in losses.items():
        first, last = np.mean(values[:5]), np.mean(values[-5:])
        assert last < 0.9 * first, f"{phase} loss went from {first:.3f} to {last:.3f}"


def test_folding_the_latent_scale_keeps_the_autoencoder_and_gives_unit_latents(cache_dir,
                                                                               tmp_path):
    c = config(*micro(tmp_path, cache_dir))
    trainer = StructureTrainer(c, build_structure_data(c.data), torch.device("cpu"))
    with torch.no_grad():
        for p in trainer.encoder.out_layer[-1].parameters():
            p.mul_(5.0)  # latents far from unit scale
    grids = trainer.train_set.occupancy[:, None].float()
    with torch.no_grad():
        before = trainer.decoder(trainer.encoder(grids))
        latents = trainer.encode_training_set()
        fold_latent_scale(trainer.encoder, trainer.decoder,
                          latents.square().mean((0, 2, 3, 4)).sqrt())
        after = trainer.decoder(trainer.encoder(grids))
    rms = trainer.encode_training_set().square().mean((0, 2, 3, 4)).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max())


def _stop_at(monkeypatch, steps):
    """Make the trainer raise Ctrl-C's KeyboardInterrupt before each step count in ``steps``
    (once each), as a kill would stop it."""
    train_step, pending = StructureTrainer.train_step, set(steps)

    def stopping(self):
        if self.step in pending:
            pending.discard(self.step)
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(StructureTrainer, "train_step", stopping)


def test_a_stopped_run_resumes_bit_for_bit(straight_run, cache_dir, tmp_path, monkeypatch):
    # stopped in the VAE phase (resumes from step 3, crosses into the flow), then in the flow
    # phase (resumes from step 6: the flow's latents and tokens are computed again)
    _stop_at(monkeypatch, {5, 8})
    with pytest.raises(RunInterrupted) as stop:
        train_generator.run(config(*micro(tmp_path, cache_dir)))
    assert (stop.value.step, stop.value.checkpoint_step) == (5, 3)
    run_dir = stop.value.run_dir
    with pytest.raises(RunInterrupted) as stop:
        train_generator.resume(run_dir)
    assert (stop.value.step, stop.value.checkpoint_step) == (8, 6)
    resumed = train_generator.resume(run_dir)

    straight_dir = Path(straight_run["run_dir"])
    a = torch.load(straight_dir / "ckpt" / "last.pt", weights_only=False)
    b = torch.load(run_dir / "ckpt" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 9
    for model in ("encoder", "decoder", "flow", "conditioner"):
        assert a[model].keys() == b[model].keys()
        for key in a[model]:
            assert torch.equal(a[model][key], b[model][key]), f"{model}.{key}"
    for optimizer in ("vae_optimizer", "flow_optimizer"):
        for slot, state in a[optimizer]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b[optimizer]["state"][slot][key]), f"{optimizer} {key}"
    assert torch.equal(a["rng"], b["rng"])
    assert a["flow_average"]["updates"] == b["flow_average"]["updates"] == 5
    for x, y in zip(a["flow_average"]["average"], b["flow_average"]["average"]):
        assert torch.equal(x, y)
    # the same records, the redone steps' once
    assert (straight_dir / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    assert resumed["flow_iou"] == straight_run["flow_iou"]


def test_a_phase_decays_its_learning_rate_to_lr_final_only_when_asked(straight_run):
    assert phase_learning_rate(1e-3, None, 7, 10) == 1e-3
    rates = [phase_learning_rate(1e-3, 1e-4, done, 11) for done in range(11)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert rates[5] == pytest.approx(5.5e-4)  # the cosine's middle
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # the micro run: its VAE at vae.lr throughout, its flow from flow.lr down to flow.lr_final
    records = [json.loads(line) for line in
               (Path(straight_run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    lrs = {phase: [r["lr"] for r in records if r.get("phase") == phase and "lr" in r]
           for phase in ("vae", "flow")}
    assert lrs["vae"] == [1e-3] * 4
    assert lrs["flow"][0] == pytest.approx(3e-4) and lrs["flow"][-1] == pytest.approx(3e-5)


def test_the_flows_average_is_what_ships(straight_run):
    """With flow.ema_decay the exported flow (and conditioner, trained with it) is the
    average the checkpoint holds, not the last step's weights."""
    state = torch.load(Path(straight_run["run_dir"]) / "ckpt" / "last.pt", weights_only=False)
    spec = read_pipeline(Path(straight_run["pipeline"]))
    flow = load_model(spec.root, spec.models["sparse_structure_flow_model"])
    average = state["flow_average"]["average"]  # the flow's parameters first, in order
    names = [name for name, _ in flow.named_parameters()]
    for name, param, averaged in zip(names, flow.parameters(), average):
        assert torch.equal(param.detach(), averaged), name
    assert any(not torch.equal(state["flow"][name], averaged)
               for name, averaged in zip(names, average))


def test_a_parameter_average_warms_up_and_swaps_in_and_out():
    from relaxflow.training.structure import ParameterAverage

    p = torch.nn.Parameter(torch.zeros(3))
    average = ParameterAverage([p], decay=0.99)
    with torch.no_grad():
        p.fill_(1.0)
    average.update()  # warm-up decay min(0.99, 1/10): the average moves 0.9 of the way
    torch.testing.assert_close(average.average[0], torch.full((3,), 0.9))
    with average.applied():
        torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(p.detach(), torch.ones(3))
    copy = ParameterAverage([p], decay=0.99)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 1 and torch.equal(copy.average[0], average.average[0])


def test_the_exported_folder_loads_with_the_generators_loaders(straight_run, tmp_path):
    pipeline = Path(straight_run["pipeline"])
    spec = check_pipeline_files(pipeline, keys=STRUCTURE_MODELS)
    assert spec.condition == "image" and spec.cond_model == CONDITIONER_FOLDER
    trained = torch.load(Path(straight_run["run_dir"]) / "ckpt" / "last.pt", weights_only=False)
    models = {}
    for key, state in zip(STRUCTURE_MODELS, ("encoder", "decoder", "flow")):
        models[key] = load_model(pipeline, spec.models[key])
    conditioner = ImageConditioner.from_pretrained(str(pipeline / CONDITIONER_FOLDER))
    # what the flow phase trained ships as its average (flow.ema_decay): the flow's parameters,
    # then the conditioner's layers'
    averaged = [*(f"flow.{n}" for n, _ in models["sparse_structure_flow_model"].named_parameters()),
                *(f"conditioner.encoder.{n}"
                  for n, _ in conditioner.model.encoder.named_parameters())]
    expected = {f"{state}.{name}": value for state in ("encoder", "decoder", "flow", "conditioner")
                for name, value in trained[state].items()}
    expected.update(zip(averaged, trained["flow_average"]["average"]))
    for key, state in zip(STRUCTURE_MODELS, ("encoder", "decoder", "flow")):
        for name, tensor in models[key].state_dict().items():
            assert torch.equal(tensor, expected[f"{state}.{name}"]), f"{key}.{name}"
    for name, tensor in conditioner.model.state_dict().items():
        assert torch.equal(tensor, expected[f"conditioner.{name}"]), name

    # the generate job's stage-1 path: an RGBA file -> tokens -> the pipeline's sampler -> voxels
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[16:48, 24:40] = (200, 60, 40, 255)
    Image.fromarray(rgba).save(tmp_path / "object.png")
    cond = conditioner(load_object(tmp_path / "object.png")[None])
    assert cond.shape == (1, 1 + 4 + 14 * 14, 16)
    sampler = read_pipeline(pipeline).samplers["sparse_structure_sampler"]
    latent, coords = sample_structure(
        models["sparse_structure_flow_model"], models["sparse_structure_decoder"],
        guided(sampler, cond, conditioner.negative(cond)), 1, torch.Generator().manual_seed(0))
    assert latent.shape == (1, 8, 8, 8, 8) and coords.shape[1] == 4

    # the generate job's pipeline loads it as a stage-1-only folder
    from relaxflow.pipeline import TrellisPipeline

    assert TrellisPipeline.from_pretrained(pipeline).stages == ("structure",)


def test_metrics_and_curve_are_written(straight_run):
    run_dir = Path(straight_run["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("held_out")] == list(range(1, 10))
    held_out = [r for r in records if r.get("held_out")]
    assert [r["step"] for r in held_out] == [3, 4, 6, 9]  # log steps and the VAE's last step
    assert "vae_iou" in held_out[0] and "flow_iou_other_render" in held_out[-1]
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 9


@pytest.mark.parametrize("override, message", [
    ("data.occupancy_resolution=30", "must halve 2 times"),
    ("data.categories=[mug,spaceship]", "unknown spaceship"),
    ("flow.p_uncond=1.5", "flow.p_uncond"),
    ("vae.steps=0", "set vae.steps >= 1"),
    ("flow.lr_final=1e-2", "flow.lr_final is where a cosine decay"),
    ("image_framing=zoom", "image_framing is 'zoom': use one of object, frame"),
])
def test_bad_settings_stop_before_a_run_folder(tmp_path, cache_dir, override, message):
    with pytest.raises(UserError, match=message):
        train_generator.run(config(*micro(tmp_path / "out", cache_dir), override))
    assert not (tmp_path / "out").exists()


def test_a_run_records_its_code_and_ships_in_float16_with_a_manifest(straight_run, tmp_path):
    from relaxflow.training.ship import MANIFEST, ship, verify

    run_dir = Path(straight_run["run_dir"])
    (start,) = json.loads((run_dir / "source.json").read_text())
    assert start["step"] == 0 and len(start["commit"]) in (40, len("unknown"))
    dest = ship([run_dir], tmp_path / "embedded")
    assert verify(dest) == []
    manifest = json.loads((dest / MANIFEST).read_text())
    (record,) = manifest["runs"]
    assert record["config"]["vae"]["steps"] == 4 and record["source"] == [start]
    assert record["metrics"]["steps"] == 9
    from safetensors.torch import load_file
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            assert all(t.dtype == torch.float16 for t in load_file(str(dest / name)).values()
                       if t.is_floating_point()), name
    # the shipped models load and agree with the trained ones to float16 rounding
    spec = read_pipeline(dest)
    trained = read_pipeline(Path(straight_run["pipeline"]))
    for key in STRUCTURE_MODELS:
        shipped = load_model(dest, spec.models[key]).state_dict()
        full = load_model(trained.root, trained.models[key]).state_dict()
        for name, value in full.items():
            torch.testing.assert_close(shipped[name].float(), value.float(), rtol=1e-3,
                                       atol=1e-4)
    conditioner = ImageConditioner.from_pretrained(str(dest / CONDITIONER_FOLDER))
    assert next(conditioner.model.parameters()).dtype == torch.float32
    # a changed, a missing and an unlisted file are found
    first = next(n for n in manifest["files"] if n.endswith(".safetensors"))
    (dest / first).write_bytes((dest / first).read_bytes()[:-1] + b"\0")
    (dest / "pipeline.json").unlink()
    (dest / "notes.txt").write_text("x")
    assert verify(dest) == [f"{first} differs from the manifest's sha256",
                            "pipeline.json is missing", "notes.txt is not in the manifest"]


def _copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("ckpt"))
    return to


def test_runs_ship_laid_over_one_another_with_one_conditioner(straight_run, tmp_path):
    """A later run's files and pipeline.json entries replace an earlier one's (a stage-2 run,
    then a stage-1 run continued since); runs of different conditioners are refused."""
    from safetensors.torch import load_file, save_file

    from relaxflow.training.ship import ship, verify

    run_dir = Path(straight_run["run_dir"])
    first = _copy_run(run_dir, tmp_path / "first")
    later = _copy_run(run_dir, tmp_path / "later")
    spec = json.loads((later / "pipeline" / "pipeline.json").read_text())
    flow = spec["args"]["models"]["sparse_structure_flow_model"]
    weights = later / "pipeline" / f"{flow}.safetensors"
    save_file({k: v + 1.0 for k, v in load_file(str(weights)).items()}, str(weights))
    spec["args"]["models"] = {"sparse_structure_flow_model": flow}  # only what it trained
    spec["args"]["sparse_structure_sampler"]["params"]["steps"] = 7
    (later / "pipeline" / "pipeline.json").write_text(json.dumps(spec))
    dest = ship([first, later], tmp_path / "shipped")
    assert verify(dest) == []
    merged = read_pipeline(dest)
    assert set(merged.models) == set(STRUCTURE_MODELS)  # the first run's models stay
    merged_json = json.loads((dest / "pipeline.json").read_text())
    assert merged_json["args"]["sparse_structure_sampler"]["params"]["steps"] == 7
    shipped, trained = (load_file(str(p / f"{flow}.safetensors"))
                        for p in (dest, first / "pipeline"))
    for name, value in trained.items():  # the later run's flow replaced the first's
        torch.testing.assert_close(shipped[name].float(), value.float() + 1.0, rtol=1e-3,
                                   atol=1e-3)
    # the run's images were cut as its config said, and the export says so for every job
    assert merged.image_framing == "frame"
    spec["args"]["image_framing"] = "object"  # the same conditioner, its images cut otherwise
    (later / "pipeline" / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="image_framing 'object', .* by 'frame'.* train stage 2"):
        ship([first, later], tmp_path / "refused")
    spec["args"]["image_framing"] = "frame"
    (later / "pipeline" / "pipeline.json").write_text(json.dumps(spec))
    conditioner = later / "pipeline" / CONDITIONER_FOLDER / "model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(conditioner)).items()}, str(conditioner))
    with pytest.raises(UserError, match="the conditioner of .* differs .* train stage 2 again"):
        ship([first, later], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_shipped_folder_ships_again_with_a_later_run_over_it(straight_run, tmp_path):
    """A shipped folder stands for its runs: a new run laid over it ships in its place (the
    manifest keeps the old runs first), its float16 conditioner matching the run's float32
    one."""
    from safetensors.torch import load_file, save_file

    from relaxflow.training.ship import MANIFEST, ship, verify

    run_dir = Path(straight_run["run_dir"])
    shipped = ship([run_dir], tmp_path / "shipped")
    later = _copy_run(run_dir, tmp_path / "later")
    spec = json.loads((later / "pipeline" / "pipeline.json").read_text())
    flow = spec["args"]["models"]["sparse_structure_flow_model"]
    weights = later / "pipeline" / f"{flow}.safetensors"
    save_file({k: v + 1.0 for k, v in load_file(str(weights)).items()}, str(weights))
    settings = (later / "config.yaml").read_text()
    (later / "config.yaml").write_text(settings.replace("init_from: ''",
                                                        f"init_from: {run_dir}"))
    dest = ship([shipped, later], shipped)  # over itself
    assert verify(dest) == []
    runs = json.loads((dest / MANIFEST).read_text())["runs"]
    assert [r["run"] for r in runs] == [run_dir.name, "later"]
    # the run it started from is recorded with it, as far as its log went
    assert runs[1]["started_from"]["run"] == run_dir.name
    assert runs[1]["started_from"]["last_step"] == runs[0]["last_step"] == 9
    trained = load_file(str(run_dir / "pipeline" / f"{flow}.safetensors"))
    for name, value in load_file(str(dest / f"{flow}.safetensors")).items():
        torch.testing.assert_close(value.float(), trained[name] + 1.0, rtol=1e-3, atol=1e-3)


def test_shipping_an_unfinished_run_is_refused(straight_run, tmp_path):
    import run

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert run.main(["ship-generator", str(unfinished), "--to", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_a_run_starts_from_another_runs_weights_and_trains_the_flow_on(straight_run, cache_dir,
                                                                       tmp_path, capsys):
    source = Path(straight_run["run_dir"])
    c = config(*micro(tmp_path, cache_dir, **{"vae.steps": 0, "flow.steps": 3,
                                              "init_from": str(source)}))
    trainer = train_generator.make_trainer(c)
    train_generator.start_from(trainer, c)
    trained = torch.load(source / "ckpt" / "last.pt", weights_only=False)
    for name in ("encoder", "decoder", "flow"):
        for key, value in getattr(trainer, name).state_dict().items():
            assert torch.equal(value, trained[name][key]), (name, key)
    assert trainer.phase.value == "flow"
    result = train_generator.run(c)
    assert result["steps"] == 3 and 0 <= result["flow_iou"] <= 1
    continued = torch.load(Path(result["run_dir"]) / "ckpt" / "last.pt", weights_only=False)
    assert all(torch.equal(continued["encoder"][k], v)
               for k, v in trained["encoder"].items())  # the VAE is kept
    assert not all(torch.equal(continued["flow"][k], trained["flow"][k])
                   for k in trained["flow"])  # the flow trained on


@pytest.mark.parametrize("init_flow", [True, False])
def test_a_run_starts_from_a_pipeline_folder(straight_run, cache_dir, tmp_path, init_flow):
    """``init_from=<pipeline folder>``: the folder's VAE, conditioner and flow; with
    ``init_flow=false`` a new flow of another size instead, trained from its seeded start."""
    pipeline = Path(straight_run["run_dir"]) / "pipeline"
    sizes = {} if init_flow else {"flow_size.model_channels": 64, "flow_size.patch_size": 2}
    c = config(*micro(tmp_path, cache_dir, **{
        "vae.steps": 0, "flow.steps": 2, "init_from": str(pipeline),
        "init_flow": str(init_flow).lower(), **sizes}))
    trainer = train_generator.make_trainer(c)
    fresh = {k: v.clone() for k, v in trainer.flow.state_dict().items()}
    train_generator.start_from(trainer, c)
    spec = read_pipeline(pipeline)
    names = ("encoder", "decoder", "flow") if init_flow else ("encoder", "decoder")
    for key, name in zip(STRUCTURE_MODELS, names):
        for k, v in load_model(spec.root, spec.models[key]).state_dict().items():
            assert torch.equal(getattr(trainer, name).state_dict()[k], v), (name, k)
    conditioner = ImageConditioner.from_pretrained(str(pipeline / CONDITIONER_FOLDER))
    for k, v in conditioner.model.state_dict().items():
        assert torch.equal(trainer.conditioner.model.state_dict()[k], v), k
    kept = all(torch.equal(trainer.flow.state_dict()[k], v) for k, v in fresh.items())
    assert kept is not init_flow
    result = train_generator.run(c)
    assert result["steps"] == 2 and 0 <= result["flow_iou"] <= 1


@pytest.mark.parametrize("override, message", [
    ({"flow_size.model_channels": 64}, "flow_size is"),
    ({"init_from": "/nowhere"}, "is not a train-generator run folder with a checkpoint"),
    ({"init_from": "embedded"}, "the conditioner's hidden_size is 16 here but 64"),
    ({"init_from": "embedded", "conditioner_size.hidden_size": 64,
      "conditioner_size.num_hidden_layers": 2, "conditioner_size.num_attention_heads": 4,
      "conditioner_size.intermediate_size": 128, "conditioner_size.patch_size": 37},
     r"sparse_structure_encoder differs .* in channels \(here \[4, 8, 8\], there \[8, 32, 64\]\)"
     ".* set vae_size"),
    ({"init_from": "embedded", "init_flow": "false", "data.occupancy_resolution": 16},
     "data.occupancy_resolution is 16 here but init_from=embedded decodes 32"),
])
def test_init_from_is_checked_before_a_run_folder(straight_run, cache_dir, tmp_path, override,
                                                  message):
    extra = {"vae.steps": 0, "init_from": straight_run["run_dir"], **override}
    with pytest.raises(UserError, match=message):
        train_generator.run(config(*micro(tmp_path / "out", cache_dir, **extra)))
    assert not (tmp_path / "out").exists()


def test_the_loss_curve_draws_a_running_mean_of_the_losses():
    assert running_mean([1.0, 2.0, 3.0, 6.0], 2) == [1.5, 2.5, 4.5]
    assert running_mean([4.0, 2.0], 1) == [4.0, 2.0]
