"""Stage 2 of the train-generator job on a micro configuration: the SLat encoder's layout, the
stage's data, its losses fall, a stopped run resumes bit for bit, the exported folder is a
complete pipeline the generator's loaders and stage runner take, bad settings stop it before a
run folder exists."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cfd.config import load_config
from cfd.renderers import rasterization
from cfd.scene import Splats
from cfd.shapes import category, occupancy_grid
from cfd.shapes.categories import GENERATOR_SCALE
from cfd.shapes.world import object_splats
from core.errors import UserError
from core.runtime import RunInterrupted
from jobs import train_generator
from relaxflow.conditioning import ImageConditioner
from relaxflow.loading import load_model, read_pipeline
from relaxflow.models import build
from relaxflow.models.sparse import SparseTensor
from relaxflow.pipeline import Stopwatch, TrellisPipeline
from relaxflow.runner import decode, sample_latents, sample_structures
from relaxflow.stages import guided
from relaxflow.training.slat import SlatTrainer, ssim
from relaxflow.training.slat_data import VOXEL_FEATURES, build_slat_data, load_voxel_set
from relaxflow.training.structure import StructureTrainer

from .test_train_generator import micro as structure_micro

SLAT_MODELS = ("slat_encoder", "slat_decoder_gs", "slat_flow_model")


def config(*overrides):
    return train_generator.typed(load_config(train_generator.Config, None, list(overrides)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def structure_pipeline(tmp_path_factory, cache_dir):
    """A micro stage-1 pipeline folder (2 steps of each phase: what stage 2 reads of it is its
    layout and conditioner, not its quality)."""
    out = tmp_path_factory.mktemp("stage1")
    c = config(*structure_micro(out, cache_dir, **{"vae.steps": 1, "flow.steps": 1}))
    trainer = StructureTrainer(c, train_generator.build_structure_data(c.data),
                               torch.device("cpu"))
    return trainer.export_pipeline(out / "pipeline")


def micro(output_dir: Path, cache_dir: Path, structure: Path, **extra) -> list:
    """Overrides of a micro stage-2 configuration: 3 categories x 2 seeds, 3 renders of 32 px,
    a one-block 16-wide VAE with 2 Gaussians a voxel, a one-block 32-wide flow."""
    items = {
        "stage": "slat", "name": "train-generator-slat", "output_dir": str(output_dir),
        "device": "cpu", "structure_pipeline": str(structure),
        "slat.data.train_seeds": 2, "slat.data.held_out_seeds": 1,
        "slat.data.categories": "[mug,house,tree]", "slat.data.views": 3,
        "slat.data.render_resolution": 32, "slat.data.cache_dir": str(cache_dir),
        "slat.vae_size.model_channels": 16, "slat.vae_size.num_blocks": 1,
        "slat.vae_size.num_head_channels": 8, "slat.vae_size.num_gaussians": 2,
        "slat.flow_size.model_channels": 32, "slat.flow_size.num_blocks": 1,
        "slat.flow_size.num_head_channels": 16, "slat.flow_size.io_block_channels": "[8]",
        "slat.vae.steps": 4, "slat.flow.steps": 5, "slat.vae.batch_size": 2,
        "slat.vae.views": 2, "slat.flow.batch_size": 3, "slat.eval.views": 2,
        "slat.eval.flow_samples": 2, "slat.eval.sampler.steps": 2,
        "checkpoint_every": 3, "log_every": 3, "slat.flow.ema_decay": 0.9,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir, structure_pipeline):
    """A micro stage-2 run trained without a stop: its result."""
    torch.set_num_threads(1)
    return train_generator.run(config(*micro(tmp_path_factory.mktemp("straight"), cache_dir,
                                             structure_pipeline)))


def test_slat_encoder_has_the_released_args_and_layout():
    args = {"resolution": 32, "in_channels": 10, "model_channels": 32, "latent_channels": 8,
            "num_blocks": 2, "num_heads": None, "num_head_channels": 16, "mlp_ratio": 4,
            "attn_mode": "swin", "window_size": 8, "pe_mode": "ape", "use_fp16": False,
            "use_checkpoint": False, "qk_rms_norm": False}
    encoder = build("SLatEncoder", args)
    keys = set(encoder.state_dict())
    assert {"input_layer.weight", "blocks.1.attn.to_qkv.weight", "blocks.1.mlp.mlp.2.bias",
            "out_layer.weight"} <= keys
    assert encoder.out_layer.weight.shape == (16, 32)  # mean and log-variance
    coords = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4], [1, 30, 0, 0]], dtype=torch.int32)
    feats = torch.randn(3, 10)
    mean, logvar = encoder(SparseTensor(feats, coords))
    assert mean.shape == logvar.shape == (3, 8)
    # the released output: a layer norm without affine, then out_layer, halves in that order
    with torch.no_grad():
        h = encoder.torso(SparseTensor(feats, coords)).feats
        out = h @ encoder.out_layer.weight.T + encoder.out_layer.bias
    assert torch.allclose(h.mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(mean, out[:, :8]) and torch.allclose(logvar, out[:, 8:])
    # voxels of another item do not change an item's output (attention stays in each item)
    alone, _ = encoder(SparseTensor(feats[:2], coords[:2]))
    assert torch.allclose(alone, mean[:2], atol=1e-6)


def test_the_data_holds_voxels_features_and_renders_in_the_generators_box(cache_dir,
                                                                         structure_pipeline,
                                                                         tmp_path):
    c = config(*micro(tmp_path, cache_dir, structure_pipeline))
    voxels = load_voxel_set(build_slat_data(c.slat.data), "train")
    assert len(voxels) == 6 and voxels.feats.shape == (int(voxels.count.sum()),
                                                       len(VOXEL_FEATURES))
    i = 1
    obj = category(voxels.categories[int(voxels.category[i])]).sample(int(voxels.seed[i]))
    grid = occupancy_grid(obj, 32)
    assert torch.equal(voxels.coords[voxels.rows(torch.tensor([i]))], torch.argwhere(grid))
    colour = voxels.feats[:, :3]
    assert (colour >= 0).all() and (colour <= 1).all()
    surface = voxels.feats[:, -1] > 0
    assert 0.1 < surface.float().mean() < 1  # surface voxels have splats, solid insides none
    assert voxels.feats[surface, 6:9].abs().max() <= 0.5  # offsets inside the voxel
    # the ground-truth splats, in the generator's box, render as the stored views from the
    # stored cameras
    splats = object_splats(obj)
    with torch.no_grad():
        out = rasterization(splats.means * GENERATOR_SCALE, splats.quats,
                            splats.scales * GENERATOR_SCALE, splats.opacities,
                            splats.sh_coeffs, voxels.viewmats[i], voxels.Ks[i], 32, 32,
                            sh_degree=0, backgrounds=torch.full((3,), 0.5))
    truth = voxels.rgba[i].float() / 255
    assert (out.rgb.clamp(0, 1) - truth[..., :3]).abs().max() < 3 / 255
    assert (out.alpha - truth[..., 3:]).abs().max() < 3 / 255


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    image = torch.rand(2, 32, 32, 3)
    assert float(ssim(image, image)) == pytest.approx(1.0, abs=1e-5)
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    assert float(ssim(image, noisy)) < 0.9


def test_losses_fall(cache_dir, structure_pipeline, tmp_path):
    torch.set_num_threads(1)
    c = config(*micro(tmp_path, cache_dir, structure_pipeline,
                      **{"slat.vae.steps": 30, "slat.flow.steps": 30, "slat.vae.lr": 3e-3,
                         "slat.flow.lr": 3e-3}))
    trainer = SlatTrainer(c.slat, c.seed, c.grad_clip, structure_pipeline,
                          build_slat_data(c.slat.data), torch.device("cpu"))
    losses = {"vae": [], "flow": []}
    while trainer.step < trainer.total_steps:
        record = trainer.train_step()
        losses[record["phase"]].append(record["loss"])
    for phase, values in losses.items():
        first, last = np.mean(values[:5]), np.mean(values[-5:])
        assert last < 0.9 * first, f"{phase} loss went from {first:.3f} to {last:.3f}"


def _stop_at(monkeypatch, steps):
    """Make the trainer raise Ctrl-C's KeyboardInterrupt before each step count in ``steps``
    (once each), as a kill would stop it."""
    train_step, pending = SlatTrainer.train_step, set(steps)

    def stopping(self):
        if self.step in pending:
            pending.discard(self.step)
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(SlatTrainer, "train_step", stopping)


def test_a_stopped_run_resumes_bit_for_bit(straight_run, cache_dir, structure_pipeline,
                                           tmp_path, monkeypatch):
    # stopped in the VAE phase (resumes from step 3, crosses into the flow), then in the flow
    # phase (resumes from step 6: the flow's latents and tokens are computed again)
    _stop_at(monkeypatch, {5, 8})
    with pytest.raises(RunInterrupted) as stop:
        train_generator.run(config(*micro(tmp_path, cache_dir, structure_pipeline)))
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
    for model in ("encoder", "decoder", "flow"):
        assert a[model].keys() == b[model].keys()
        for key in a[model]:
            assert torch.equal(a[model][key], b[model][key]), f"{model}.{key}"
    for optimizer in ("vae_optimizer", "flow_optimizer"):
        for slot, state in a[optimizer]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b[optimizer]["state"][slot][key]), f"{optimizer} {key}"
    assert torch.equal(a["rng"], b["rng"])
    for key in ("mean", "std"):
        assert torch.equal(a["normalization"][key], b["normalization"][key])
    assert a["flow_average"]["updates"] == b["flow_average"]["updates"] == 5
    for x, y in zip(a["flow_average"]["average"], b["flow_average"]["average"]):
        assert torch.equal(x, y)
    assert (straight_dir / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    assert resumed["flow_psnr"] == straight_run["flow_psnr"]


def test_metrics_and_curve_are_written(straight_run):
    run_dir = Path(straight_run["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("held_out")] == list(range(1, 10))
    held_out = [r for r in records if r.get("held_out")]
    assert [r["step"] for r in held_out] == [3, 4, 6, 9]  # log steps and the VAE's last step
    assert {"vae_psnr", "vae_mask_iou"} <= held_out[0].keys()
    assert {"flow_psnr", "flow_mask_iou", "flow_other_render_psnr"} <= held_out[-1].keys()
    assert 0 <= held_out[-1]["flow_mask_iou"] <= 1 and held_out[0]["vae_psnr"] > 5
    assert (run_dir / "loss_curve.png").stat().st_size > 0


def test_the_exported_folder_is_a_complete_pipeline(straight_run, structure_pipeline, cache_dir,
                                                    tmp_path):
    pipeline = Path(straight_run["pipeline"])
    spec = read_pipeline(pipeline)
    stage1 = read_pipeline(structure_pipeline)
    assert spec.stages == ("structure", "latent", "decode")
    assert {k: spec.models[k] for k in stage1.models} == stage1.models  # stage 1 kept
    for ref in stage1.models.values():
        assert (pipeline / f"{ref}.safetensors").read_bytes() == \
            (structure_pipeline / f"{ref}.safetensors").read_bytes()
    trained = torch.load(Path(straight_run["run_dir"]) / "ckpt" / "last.pt", weights_only=False)
    for key, state in zip(SLAT_MODELS, ("encoder", "decoder", "flow")):
        model = load_model(pipeline, spec.models[key])
        expected = dict(trained[state])
        if state == "flow":  # the flow ships as its average (slat.flow.ema_decay)
            expected.update(zip((n for n, _ in model.named_parameters()),
                                trained["flow_average"]["average"]))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[name]), f"{key}.{name}"
    assert spec.slat_normalization == {k: v.tolist() for k, v in trained["normalization"].items()}
    assert spec.samplers["slat_sampler"].steps == 2

    # the generate job's path (relaxflow.runner): an image's tokens -> stage 1 -> stage 2 on
    # voxels (a held-out instance's: the micro stage 1 samples noise) -> splats
    pipe = TrellisPipeline.from_pretrained(pipeline)
    conditioner = ImageConditioner.from_pretrained(str(pipeline / spec.cond_model))
    image = torch.zeros(3, 518, 518)
    image[:, 150:370, 200:320] = torch.tensor([0.8, 0.3, 0.2])[:, None, None]
    cond = conditioner(image[None])
    generators, clock = {"plain": torch.Generator().manual_seed(0)}, Stopwatch("cpu")

    def plain(stage):
        return guided(pipe.sampler(stage), cond, conditioner.negative(cond))

    _, resolution = sample_structures(pipe, lambda flow: {"plain": plain("structure")},
                                      generators, torch.device("cpu"), clock)
    assert resolution == 32
    c = config(*micro(tmp_path, cache_dir, structure_pipeline))
    held_out = load_voxel_set(build_slat_data(c.slat.data), "held_out")
    coords = held_out.batch_coords(torch.tensor([0]))
    latents = sample_latents(pipe, {"plain": plain("latent")}, {"plain": coords}, generators,
                             clock)
    splats, per_voxel = decode(pipe, latents)
    assert isinstance(splats["plain"], Splats) and per_voxel == 2
    assert len(splats["plain"].means) == 2 * len(coords)
    assert (splats["plain"].means.abs() <= 0.5 + 1 / 32).all()


@pytest.mark.parametrize("override, message", [
    ("structure_pipeline=/nonexistent/pipeline", "is not a pipeline folder"),
    ("structure_pipeline=", "needs structure_pipeline"),
    ("slat.data.resolution=16", "set slat.data.resolution: 32"),
    ("slat.vae.views=4", "slat.vae.views=4 must be in 1..slat.data.views=3"),
    ("slat.flow_size.io_block_channels=[8,8,8,8,8,8]", "io_block_channels"),
])
def test_bad_settings_stop_before_a_run_folder(tmp_path, cache_dir, structure_pipeline,
                                               override, message):
    with pytest.raises(UserError, match=message):
        train_generator.run(config(*micro(tmp_path / "out", cache_dir, structure_pipeline),
                                   override))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["pipeline", "run"])
def test_a_run_starts_from_a_stage_2_pipeline_or_run_and_trains_its_flow_on(
        straight_run, cache_dir, structure_pipeline, tmp_path, source):
    """init_from with slat.vae.steps=0: the VAE and its latent normalisation are kept as they
    were (a float16-free export, so exactly), only the flow trains on, from the source's flow."""
    init = straight_run["pipeline"] if source == "pipeline" else straight_run["run_dir"]
    c = config(*micro(tmp_path, cache_dir, structure_pipeline,
                      **{"init_from": init, "slat.vae.steps": 0, "slat.flow.steps": 2}))
    trainer = train_generator.make_trainer(c)
    train_generator.start_from(trainer, c)
    source_spec = read_pipeline(straight_run["pipeline"])
    source_flow = load_model(straight_run["pipeline"], source_spec.models["slat_flow_model"])
    if source == "pipeline":  # the exported flow is the average, the checkpoint's the last step
        for name, tensor in source_flow.state_dict().items():
            assert torch.equal(trainer.flow.state_dict()[name], tensor), name
    result = train_generator.run(c)
    spec = read_pipeline(result["pipeline"])
    assert spec.slat_normalization == source_spec.slat_normalization
    for key in ("slat_encoder", "slat_decoder_gs"):
        kept, was = (load_model(p, s.models[key]).state_dict()
                     for p, s in ((result["pipeline"], spec),
                                  (straight_run["pipeline"], source_spec)))
        assert all(torch.equal(kept[name], was[name]) for name in kept), key
    flow = load_model(result["pipeline"], spec.models["slat_flow_model"]).state_dict()
    assert any(not torch.equal(flow[name], tensor)
               for name, tensor in source_flow.state_dict().items())
    assert not (Path(result["pipeline"]) / "MANIFEST.json").exists()


def test_a_shipped_structure_folders_manifest_is_not_copied_into_an_export(
        straight_run, cache_dir, structure_pipeline, tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(structure_pipeline, shipped)
    (shipped / "MANIFEST.json").write_text("{}")
    c = config(*micro(tmp_path / "out", cache_dir, shipped,
                      **{"init_from": straight_run["run_dir"], "slat.vae.steps": 0,
                         "slat.flow.steps": 1}))
    result = train_generator.run(c)
    assert not (Path(result["pipeline"]) / "MANIFEST.json").exists()
    assert (Path(result["pipeline"]) / "pipeline.json").is_file()


@pytest.mark.parametrize("init, override, message", [
    ("structure", "slat.vae.steps=0", "names no slat_encoder"),
    ("run", "slat.vae_size.num_gaussians=4", "slat.vae_size is .* here but"),
    ("pipeline", "slat.flow_size.model_channels=64", "its slat_flow_model differs"),
    ("nowhere", "slat.vae.steps=0", "is not a train-generator run folder"),
])
def test_stage_2_init_from_is_checked_before_a_run_folder(straight_run, cache_dir,
                                                          structure_pipeline, tmp_path, init,
                                                          override, message):
    folder = {"structure": str(structure_pipeline), "run": straight_run["run_dir"],
              "pipeline": straight_run["pipeline"], "nowhere": str(tmp_path / "nowhere")}[init]
    with pytest.raises(UserError, match=message):
        train_generator.run(config(*micro(tmp_path / "out", cache_dir, structure_pipeline,
                                          **{"init_from": folder}), override))
    assert not (tmp_path / "out").exists()
