"""TRELLIS pipeline folders: tiny models saved in the released layout, loaded strictly, offline,
and run through stage 1 on CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from guidance.loading import ModelWeightsNotFound
from relaxflow.loading import load_model, read_pipeline, save_model
from relaxflow.models import build
from relaxflow.stages import (decode_splats, group_by_item, guided, sample_latent,
                              sample_structure)

FLOW = dict(resolution=4, in_channels=2, model_channels=32, cond_channels=32, out_channels=2,
            num_blocks=2, num_heads=2, patch_size=1, qk_rms_norm=True, use_fp16=True)
DECODER = dict(out_channels=1, latent_channels=2, num_res_blocks=1, channels=[16, 8],
               num_res_blocks_middle=1, use_fp16=True)
SLAT_FLOW = dict(resolution=8, in_channels=4, model_channels=32, cond_channels=32,
                 out_channels=4, num_blocks=2, num_heads=2, patch_size=2, num_io_res_blocks=2,
                 io_block_channels=[8], qk_rms_norm=True, use_fp16=True)
GS_DECODER = dict(resolution=8, model_channels=24, latent_channels=4, num_blocks=2, num_heads=2,
                  window_size=4, use_fp16=True, representation_config={
                      "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0,
                             "_scaling": 1.0, "_rotation": 0.1},
                      "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 4,
                      "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1,
                      "scaling_activation": "softplus"})
SAMPLER = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
           "params": {"steps": 3, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0],
                      "rescale_t": 3.0}}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trellis-tiny")
    torch.manual_seed(0)
    save_model(build("SparseStructureFlowModel", FLOW), "SparseStructureFlowModel", FLOW, root,
               "ckpts/ss_flow_tiny")
    save_model(build("SparseStructureDecoder", DECODER), "SparseStructureDecoder", DECODER, root,
               "ckpts/ss_dec_tiny")
    save_model(build("SLatFlowModel", SLAT_FLOW), "ElasticSLatFlowModel", SLAT_FLOW, root,
               "ckpts/slat_flow_tiny")
    save_model(build("SLatGaussianDecoder", GS_DECODER), "SLatGaussianDecoder", GS_DECODER, root,
               "ckpts/slat_dec_gs_tiny")
    (root / "pipeline.json").write_text(json.dumps({
        "name": "TrellisImageTo3DPipeline",
        "args": {"models": {"sparse_structure_flow_model": "ckpts/ss_flow_tiny",
                            "sparse_structure_decoder": "ckpts/ss_dec_tiny",
                            "slat_flow_model": "ckpts/slat_flow_tiny",
                            "slat_decoder_gs": "ckpts/slat_dec_gs_tiny"},
                 "slat_normalization": {"mean": [0.5, 0.0, -0.5, 1.0],
                                        "std": [2.0, 1.0, 1.0, 0.5]},
                 "sparse_structure_sampler": SAMPLER, "slat_sampler": SAMPLER,
                 "image_cond_model": "dinov2_vitl14_reg"}}))
    return root


@pytest.fixture(scope="module")
def text_pipeline_dir(pipeline_dir, tmp_path_factory):
    """The same tiny models as a text pipeline (the tiny CLIP's 32 channels fit them)."""
    root = tmp_path_factory.mktemp("trellis-tiny-text")
    shutil.copytree(pipeline_dir, root, dirs_exist_ok=True)
    spec = json.loads((root / "pipeline.json").read_text())
    spec["name"] = "TrellisTextTo3DPipeline"
    del spec["args"]["image_cond_model"]
    spec["args"]["text_cond_model"] = "openai/clip-vit-large-patch14"
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root


def test_pipeline_json_gives_models_and_samplers(pipeline_dir):
    spec = read_pipeline(pipeline_dir)
    assert spec.name == "TrellisImageTo3DPipeline" and spec.cond_model == "dinov2_vitl14_reg"
    assert spec.condition == "image"
    sampler = spec.samplers["sparse_structure_sampler"]
    assert (sampler.steps, sampler.cfg_strength, sampler.cfg_interval, sampler.rescale_t) == (
        3, 5.0, (0.5, 1.0), 3.0)


def test_samplers_take_pipeline_json_settings_and_the_released_defaults_for_the_rest():
    from relaxflow.loading import sampler_from_spec

    full = sampler_from_spec({**SAMPLER, "args": {"sigma_min": 1e-4}})
    assert (full.sigma_min, full.steps, full.cfg_strength, full.cfg_interval, full.rescale_t) == (
        1e-4, 3, 5.0, (0.5, 1.0), 3.0)
    bare = sampler_from_spec({"name": "FlowEulerGuidanceIntervalSampler", "params": {}})
    assert (bare.steps, bare.cfg_strength, bare.cfg_interval, bare.rescale_t) == (
        50, 3.0, (0.0, 1.0), 1.0)
    cfg_only = sampler_from_spec({"name": "FlowEulerCfgSampler",
                                  "params": {"steps": 4, "cfg_interval": [0.5, 1.0]}})
    assert cfg_only.cfg_interval == (0.0, 1.0)  # no interval: guidance at every step
    assert sampler_from_spec({"name": "FlowEulerSampler", "params": {}}).cfg_strength == 0


def test_loaded_model_equals_the_saved_one(pipeline_dir):
    torch.manual_seed(0)
    saved = build("SparseStructureFlowModel", FLOW)  # same seed, same weights as the fixture
    loaded = load_model(pipeline_dir, "ckpts/ss_flow_tiny")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())
    x, t, cond = torch.randn(1, 2, 4, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 32)
    assert torch.allclose(loaded(x, t, cond), saved(x, t, cond), atol=1e-6)


def test_key_mismatch_is_reported_by_name(pipeline_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    weights = broken / "ckpts" / "ss_flow_tiny.safetensors"
    state = load_file(str(weights))
    state["blocks.0.extra.weight"] = state.pop("blocks.1.mlp.mlp.0.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing keys 1: blocks\.1\.mlp\.mlp\.0\.weight; "
                                         r"unexpected keys 1: blocks\.0\.extra\.weight"):
        load_model(broken, "ckpts/ss_flow_tiny")


def test_absent_weights_say_how_to_provide_them(pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelWeightsNotFound, match="huggingface-cli download"):
        read_pipeline("microsoft/TRELLIS-image-large")
    partial = tmp_path / "partial"
    shutil.copytree(pipeline_dir, partial)
    (partial / "ckpts" / "ss_dec_tiny.safetensors").unlink()
    with pytest.raises(ModelWeightsNotFound, match="ss_dec_tiny.safetensors are missing"):
        load_model(partial, "ckpts/ss_dec_tiny")


def test_stage1_samples_a_seeded_structure(pipeline_dir):
    spec = read_pipeline(pipeline_dir)
    flow = load_model(spec.root, spec.models["sparse_structure_flow_model"])
    decoder = load_model(spec.root, spec.models["sparse_structure_decoder"])
    cond = torch.randn(2, 5, 32)
    sampler = guided(spec.samplers["sparse_structure_sampler"], cond, torch.zeros_like(cond))
    runs = [sample_structure(flow, decoder, sampler, 2, torch.Generator().manual_seed(7))
            for _ in range(2)]
    (latent, coords), (latent2, coords2) = runs
    assert latent.shape == (2, 2, 4, 4, 4) and torch.equal(latent, latent2)
    assert coords.dtype == torch.int32 and coords.shape[1] == 4 and torch.equal(coords, coords2)
    assert coords[:, 1:].min() >= 0 and coords[:, 1:].max() < 8


@pytest.mark.gpu
def test_cuda_loading_runs_the_torso_in_float16(pipeline_dir):
    cpu = load_model(pipeline_dir, "ckpts/ss_flow_tiny")
    cuda = load_model(pipeline_dir, "ckpts/ss_flow_tiny", device="cuda")
    assert cuda.blocks[0].mlp.mlp[0].weight.dtype == torch.float16
    assert cuda.blocks[0].norm2.weight.dtype == torch.float32
    x, t, cond = torch.randn(1, 2, 4, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 32)
    expected = cpu(x, t, cond)
    got = cuda(x.cuda(), t.cuda(), cond.cuda()).cpu()
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


def test_two_stages_turn_conditions_into_splats(pipeline_dir):
    """The whole generator on tiny random models: structure, latent, splats, seeded."""
    spec = read_pipeline(pipeline_dir)
    models = {key: load_model(spec.root, ref) for key, ref in spec.models.items()}
    cond = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))

    def generate(seed):
        g = torch.Generator().manual_seed(seed)
        neg = torch.zeros_like(cond)
        _, coords = sample_structure(models["sparse_structure_flow_model"],
                                     models["sparse_structure_decoder"],
                                     guided(spec.samplers["sparse_structure_sampler"], cond, neg),
                                     2, g)
        latent = sample_latent(models["slat_flow_model"],
                               guided(spec.samplers["slat_sampler"], cond, neg),
                               group_by_item(coords, 2), 2, spec.slat_normalization, g)
        return coords, decode_splats(models["slat_decoder_gs"], latent)

    coords, splats = generate(0)
    assert len(splats) == 2
    for b, item in enumerate(splats):
        assert len(item) == 4 * int((coords[:, 0] == b).sum())
        assert item.params["means"].abs().max() <= 0.5 + 0.75 / 8
    again = generate(0)[1]
    assert all(torch.equal(a.params["means"], b.params["means"]) for a, b in zip(splats, again))


def test_empty_structure_is_a_clear_error():
    coords = torch.tensor([[0, 1, 1, 1]], dtype=torch.int32)  # item 1 has no voxel
    with pytest.raises(ValueError, match=r"without occupied voxels \(voxels per item: \[1, 0\]"):
        group_by_item(coords, 2)


@pytest.mark.parametrize("variant, precision", [("image", "auto"), ("text", "bfloat16")])
def test_generate_job_writes_splats_video_and_occupancy(request, tmp_path, variant, precision):
    import numpy as np
    from PIL import Image

    import run
    from tests.tiny_models import build_tiny_clip_text, build_tiny_dinov2

    if variant == "image":
        rgba = np.zeros((64, 64, 4), dtype=np.uint8)
        rgba[16:48, 20:44] = (200, 50, 50, 255)
        Image.fromarray(rgba).save(tmp_path / "object.png")
        inputs = [f"image={tmp_path / 'object.png'}",
                  f"image_cond_model={build_tiny_dinov2(tmp_path / 'dinov2')}"]
    else:
        inputs = ["prompt=a red chair",
                  f"text_cond_model={build_tiny_clip_text(tmp_path / 'clip')}"]
    pipeline_dir = request.getfixturevalue(f"{'text_' if variant == 'text' else ''}pipeline_dir")
    code = run.main(["generate", "--config", f"configs/trellis-{variant}.yaml",
                     f"model={pipeline_dir}", f"output_dir={tmp_path / 'out'}", "video_frames=2",
                     "video_size=32", "sparse_structure_sampler.steps=2", "slat_sampler.steps=2",
                     f"precision={precision}", *inputs])
    assert code == 0
    (run_dir,) = (tmp_path / "out" / f"trellis-{variant}").iterdir()
    for name in ("config.yaml", "splats.ply", "occupancy.npz", "occupancy.png", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert any(run_dir.glob("orbit.*"))
    occupancy = np.load(run_dir / "occupancy.npz")
    assert occupancy["resolution"] == 8 and occupancy["coords"].shape[1] == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["splats"] == 4 * metrics["voxels"] > 0


def test_generate_rejects_bad_inputs_with_clear_errors(pipeline_dir, tmp_path, capsys):
    """Each bad input is named with its fix, and before anything is written: no run folder."""
    import numpy as np
    from PIL import Image

    import run

    out = tmp_path / "out"
    args = ["generate", "--config", "configs/trellis-image.yaml", f"model={pipeline_dir}",
            f"output_dir={out}", f"image_cond_model={tmp_path / 'no-model'}"]
    assert run.main(args) == 2
    assert "give exactly one of image=path.png" in capsys.readouterr().err
    assert run.main([*args, f"image={tmp_path / 'nothing.png'}"]) == 2
    assert "nothing.png does not exist" in capsys.readouterr().err
    opaque = tmp_path / "opaque.png"
    Image.fromarray(np.zeros((8, 8, 4), dtype=np.uint8) + 255).save(opaque)
    assert run.main([*args, f"image={opaque}"]) == 2
    err = capsys.readouterr().err
    assert f"image {opaque} has no transparency" in err and "mask=path.png" in err
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    assert run.main([*args, f"image={opaque}", f"mask={tmp_path / 'white.png'}"]) == 2
    assert f"mask {tmp_path / 'white.png'} is white everywhere" in capsys.readouterr().err
    assert run.main([*args, "prompt=a chair", f"mask={tmp_path / 'white.png'}"]) == 2
    assert "a prompt takes no mask" in capsys.readouterr().err
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 2:6] = 255
    Image.fromarray(rgba).save(tmp_path / "object.png")
    assert run.main([*args, "image=" + str(tmp_path / "object.png")]) == 2
    assert "image_cond_model=<folder>" in capsys.readouterr().err
    assert not out.exists()
    assert run.main(["generate", "--config", "configs/cfd-splats-embedded.yaml"]) == 2
    assert "is a 'distill' config, not 'generate'" in capsys.readouterr().err


def test_pipeline_kind_is_checked_before_anything_runs(pipeline_dir, text_pipeline_dir,
                                                       tmp_path, capsys):
    """An image for a text pipeline, a prompt for an image pipeline that the 2D model cannot
    draw, RelaxFlow on a text pipeline: each a clear error naming the problem and its fix,
    nothing written."""
    import run

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    out = tmp_path / "out"
    generate = ["generate", "--config", "configs/trellis-image.yaml", f"output_dir={out}"]
    assert run.main([*generate, f"model={text_pipeline_dir}", f"image={image}"]) == 2
    err = capsys.readouterr().err
    assert "the generate job needs an image-to-3D pipeline for image=path.png" in err
    assert "is a text-to-3D pipeline (TrellisTextTo3DPipeline), which takes prompt=" in err
    assert run.main([*generate, f"model={pipeline_dir}", "prompt=a spaceship"]) == 2
    err = capsys.readouterr().err
    assert "the embedded prior cannot draw 'a spaceship'" in err
    assert "give image=path.png (an image of your own), or an image model: draw.model.kind=" in err
    assert run.main([*generate, f"model={pipeline_dir}", "prompt=a red mug",
                     "draw.n_images=2"]) == 2
    assert "draw.n_images is 2: generate lifts one image" in capsys.readouterr().err
    assert run.main(["relaxflow", "--config", "configs/relaxflow-trellis.yaml",
                     f"model={text_pipeline_dir}", f"image={image}", f"priors=[{image}]",
                     f"output_dir={out}"]) == 2
    assert "the relaxflow job needs an image-to-3D pipeline" in capsys.readouterr().err
    assert not out.exists()
    unnamed = tmp_path / "unnamed"
    shutil.copytree(pipeline_dir, unnamed)
    spec = json.loads((unnamed / "pipeline.json").read_text())
    del spec["name"]
    (unnamed / "pipeline.json").write_text(json.dumps(spec))
    assert read_pipeline(unnamed).condition == "image"  # from its image_cond_model
    del spec["args"]["image_cond_model"]
    (unnamed / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not say whether the pipeline takes images or text"):
        read_pipeline(unnamed)


def _rgba_file(path, box, colour):
    import numpy as np
    from PIL import Image

    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (*colour, 255)
    Image.fromarray(rgba).save(path)
    return path


def test_relaxflow_job_writes_the_completion_and_both_single_branches(pipeline_dir, tmp_path,
                                                                       monkeypatch):
    """... and holds one stage's models at a time: when a stage starts, no model of an earlier
    stage is alive (offload=reload)."""
    import gc
    import weakref
    from contextlib import contextmanager

    import run
    from relaxflow.pipeline import TrellisPipeline
    from tests.tiny_models import build_tiny_dinov2

    loaded, alive_at_start = [], {}
    stage = TrellisPipeline.stage

    @contextmanager
    def watched_stage(self, name):
        gc.collect()
        alive_at_start[name] = [key for key, ref in loaded if ref() is not None]
        with stage(self, name) as models:
            loaded.extend((key, weakref.ref(model)) for key, model in models.items())
            yield models

    monkeypatch.setattr(TrellisPipeline, "stage", watched_stage)

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    priors = [_rgba_file(tmp_path / f"prior{i}.png", (10 + i, 12, 50, 52), (50, 50, 200))
              for i in range(2)]
    code = run.main(["relaxflow", "--config", "configs/relaxflow-trellis.yaml",
                     f"model={pipeline_dir}", f"image={image}", "prompt=a chair",
                     f"priors=[{priors[0]},{priors[1]}]", f"output_dir={tmp_path / 'out'}",
                     f"image_cond_model={build_tiny_dinov2(tmp_path / 'dinov2')}",
                     "stage1.sampler.steps=3", "stage2.sampler.steps=3", "video_frames=2",
                     "video_size=32", "camera.resolution=64"])
    assert code == 0
    (run_dir,) = (tmp_path / "out" / "relaxflow-trellis").iterdir()
    for name in ("splats.ply", "observation_only.ply", "prior_only.ply", "visibility.png",
                 "occupancy.npz", "metrics.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["priors"] == 2 and 0.0 <= metrics["visible_fraction"] <= 1.0
    assert alive_at_start == {"structure": [], "latent": [], "decode": []}


def test_refine_job_keeps_what_the_observation_showed(pipeline_dir, tmp_path):
    """RelaxFlow's completion (splats with a visibility property) initialises CFD in the same
    process; CFD moves the hidden splats and leaves the fully visible ones bit for bit."""
    import run
    from cfd.scene import Splats
    from cfd.scene.ply import read_ply_property
    from tests.tiny_models import build_tiny_dinov2

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    prior = _rgba_file(tmp_path / "prior.png", (10, 12, 50, 52), (50, 50, 200))
    code = run.main([
        "refine", "--config", "configs/relaxflow-cfd.yaml", f"image={image}", "prompt=a chair",
        f"priors=[{prior}]", f"output_dir={tmp_path / 'out'}", "device=cpu",
        f"relaxflow.model={pipeline_dir}",
        f"relaxflow.image_cond_model={build_tiny_dinov2(tmp_path / 'dinov2')}",
        "relaxflow.stage1.sampler.steps=2", "relaxflow.stage2.sampler.steps=2",
        "relaxflow.video_frames=2", "relaxflow.video_size=16", "relaxflow.camera.resolution=64",
        # the embedded prior on CPU, tiny
        "distill.guidance.kind=embedded", "distill.guidance.guidance_scale=5",
        "distill.guidance.half_precision=false", "distill.guidance.dataset.views_per_object=8",
        "distill.guidance.dataset.resolution=32",
        f"distill.guidance.dataset.cache_dir={tmp_path / 'cache'}",
        "distill.prompt_processor.negative_prompt=''", "distill.noise.texture_resolution=32",
        "distill.noise.n_maps=3", "distill.noise.n_shells=2", "distill.resolution=32",
        "distill.batch_size=2", "distill.steps=3", "distill.background=0.5",
        "distill.video_frames=2", "distill.video_size=16", "distill.eval_views=2"])
    assert code == 0
    (run_dir,) = (tmp_path / "out" / "relaxflow-cfd").iterdir()
    (completion,) = run_dir.glob("relaxflow-trellis/*/splats.ply")
    (refined,) = run_dir.glob("cfd-refine/*/splats.ply")
    assert (run_dir / "metrics.json").is_file()
    visibility = read_ply_property(completion, "visibility")
    seen, hidden = visibility == 1, visibility < 0.01
    assert seen.any() and hidden.any()
    start = Splats.load_ply(completion)
    extent = torch.quantile(start.means.norm(dim=-1), 0.99).item()
    start = start.scaled(0.6 / extent).turned(-90.0)  # the observation (azimuth 90) to front
    end = Splats.load_ply(refined)
    for key in ("means", "scales", "opacities", "sh0"):
        assert torch.equal(start.params[key][seen], end.params[key][seen]), key
    assert not torch.equal(start.params["means"][hidden], end.params["means"][hidden])


def test_jobs_cut_images_as_the_pipeline_json_says(pipeline_dir, tmp_path):
    """``image_framing`` (absent: TRELLIS's crop to the object) reaches every job's
    preprocessing: generate's image, relaxflow's observation; a value it does not know is a
    clear error naming the file."""
    from cfd.config import load_config
    from jobs import generate
    from jobs import relaxflow as relaxflow_job
    from relaxflow.conditioning import load_rgba, preprocess_image
    from relaxflow.loading import PipelineFileError
    from tests.tiny_models import build_tiny_dinov2

    assert read_pipeline(pipeline_dir).image_framing == "object"
    framed = tmp_path / "framed"
    shutil.copytree(pipeline_dir, framed)
    spec = json.loads((framed / "pipeline.json").read_text())
    spec["args"]["image_framing"] = "frame"
    (framed / "pipeline.json").write_text(json.dumps(spec))
    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    rgba = load_rgba(image)
    for model, framing in ((pipeline_dir, "object"), (framed, "frame")):
        expected = preprocess_image(rgba, framing=framing)
        c = generate.typed(load_config(generate.Config, Path("configs/trellis-image.yaml"), [
            f"model={model}", f"image={image}", f"output_dir={tmp_path / 'out'}"]))
        assert torch.equal(generate.check(c)[0], expected)
        c = relaxflow_job.typed(load_config(relaxflow_job.Config, Path(
            "configs/relaxflow-trellis.yaml"), [
            f"model={model}", f"image={image}", f"priors=[{image}]",
            f"image_cond_model={build_tiny_dinov2(tmp_path / 'dinov2')}",
            f"output_dir={tmp_path / 'out'}"]))
        assert torch.equal(relaxflow_job.check(c), expected)
    spec["args"]["image_framing"] = "zoom"
    (framed / "pipeline.json").write_text(json.dumps(spec))
    with pytest.raises(PipelineFileError, match="image_framing is 'zoom', not one of object"):
        read_pipeline(framed)
    assert not (tmp_path / "out").exists()


def test_relaxflow_job_rejects_bad_inputs(pipeline_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import run

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    args = ["relaxflow", "--config", "configs/relaxflow-trellis.yaml", f"model={pipeline_dir}",
            f"output_dir={tmp_path / 'out'}", "prompt=a chair"]
    assert run.main([*args[:-1], f"image={image}"]) == 2  # no priors and no prompt
    assert "no prior images: give priors=" in capsys.readouterr().err
    assert run.main([*args[:-1], f"image={image}", "prompt=a unicorn"]) == 2
    assert "the embedded prior cannot draw 'a unicorn'" in capsys.readouterr().err
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "mask.png")
    assert run.main([*args, f"image={image}", f"mask={tmp_path / 'mask.png'}",
                     f"priors=[{image}]"]) == 2
    assert "must match" in capsys.readouterr().err
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "mask.png")
    assert run.main([*args, f"image={image}", f"mask={tmp_path / 'mask.png'}",
                     f"priors=[{image}]"]) == 2
    assert "no object found" in capsys.readouterr().err
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    assert run.main([*args, f"image={image}", f"mask={tmp_path / 'white.png'}",
                     f"priors=[{image}]"]) == 2
    err = capsys.readouterr().err
    assert f"mask {tmp_path / 'white.png'} is white everywhere" in err
    assert "give an RGBA image or a mask" not in err  # a mask was given
    rgb = tmp_path / "rgb_prior.png"
    Image.fromarray(np.asarray(Image.open(image))[..., :3]).save(rgb)
    assert run.main([*args, f"image={image}", f"priors=[{image},{rgb}]"]) == 2
    err = capsys.readouterr().err
    assert f"image {rgb} has no transparency" in err and "priors take no masks" in err
    assert "mask=" not in err
    assert run.main([*args, f"image={image}", "generate_priors.n_images=0"]) == 2
    assert "generate_priors.n_images is 0" in capsys.readouterr().err
    # a distillation setting, not one of the prior model's: the sampling's own is meant
    assert run.main([*args, f"image={image}", "generate_priors.model.guidance_scale=9"]) == 2
    assert "did you mean generate_priors.guidance_scale" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for rejected inputs


def test_refine_hands_each_input_to_relaxflow_once(pipeline_dir, tmp_path, capsys):
    """An input set only as relaxflow.<name> reaches RelaxFlow; set at both levels, an error."""
    import run

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    args = ["refine", "--config", "configs/relaxflow-cfd.yaml", f"image={image}",
            "prompt=a chair", f"output_dir={tmp_path / 'out'}", f"relaxflow.model={pipeline_dir}"]
    # both paths' settings are refused before a run folder exists or RelaxFlow runs
    assert run.main([*args, "relaxflow.stage2.schedule=steep"]) == 2
    err = capsys.readouterr().err
    assert "relaxflow.stage2.schedule" in err and "expected one of [linear_cutoff" in err
    assert run.main([*args, "distill.eval_views=0"]) == 2
    assert "eval_views must be >= 1" in capsys.readouterr().err
    # with no prior images given, the request to draw them (here, from a prior that does not
    # know the prompt) and the precision too
    assert run.main([*args, "prompt=a wooden chair"]) == 2
    assert "the embedded prior cannot draw 'a wooden chair'" in capsys.readouterr().err
    assert run.main([*args, "relaxflow.precision=fp8"]) == 2
    err = capsys.readouterr().err
    assert "relaxflow.precision" in err and "expected one of [auto, float16" in err
    assert not (tmp_path / "out").exists()
    assert run.main([*args, f"relaxflow.priors=[{tmp_path / 'absent.png'}]"]) == 2
    assert f"{tmp_path / 'absent.png'} does not exist" in capsys.readouterr().err
    # so are its inputs' files and model
    assert run.main([*args, f"image={tmp_path / 'absent.png'}"]) == 2
    assert f"image {tmp_path / 'absent.png'} does not exist" in capsys.readouterr().err
    assert run.main([*args, f"relaxflow.model={tmp_path / 'no-model'}"]) == 2
    err = capsys.readouterr().err
    assert f"model weights for '{tmp_path / 'no-model'}' are not available" in err
    assert not (tmp_path / "out").exists()
    assert run.main([*args, f"priors=[{image}]", f"relaxflow.priors=[{image}]"]) == 2
    assert ("priors is set twice, as priors= and relaxflow.priors=: set it once"
            in capsys.readouterr().err)
    # the prompt given only as relaxflow.prompt is the prompt of both paths
    nested = [a if a != "prompt=a chair" else "relaxflow.prompt=a chair" for a in args]
    assert run.main([*nested, f"relaxflow.priors=[{tmp_path / 'absent.png'}]"]) == 2
    assert f"{tmp_path / 'absent.png'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("offload, held", [("reload", 0), ("cpu", 2), ("none", 2)])
def test_pipeline_holds_models_between_stages_as_asked(pipeline_dir, offload, held):
    from relaxflow.pipeline import TrellisPipeline

    pipe = TrellisPipeline.from_pretrained(pipeline_dir, offload=offload)
    with pipe.stage("structure") as models:
        first = models["sparse_structure_flow_model"]
        assert set(models) == {"sparse_structure_flow_model", "sparse_structure_decoder"}
    assert len(pipe._held) == held
    with pipe.stage("structure") as models:
        assert (models["sparse_structure_flow_model"] is first) == (offload != "reload")
    with pytest.raises(ValueError, match="offload is one of"):
        TrellisPipeline.from_pretrained(pipeline_dir, offload="disk")


def test_pipeline_without_a_stage_1_model_is_a_clear_error(pipeline_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    spec = json.loads((broken / "pipeline.json").read_text())
    del spec["args"]["models"]["sparse_structure_decoder"]
    (broken / "pipeline.json").write_text(json.dumps(spec))
    from relaxflow.pipeline import TrellisPipeline

    with pytest.raises(ValueError, match="names no 'sparse_structure_decoder' model"):
        TrellisPipeline.from_pretrained(broken)


@pytest.fixture(scope="module")
def stage1_pipeline_dir(pipeline_dir, tmp_path_factory):
    """The tiny pipeline with stage 1 only, as a generator in training has it: pipeline.json
    names the structure models alone and stage 2's files are not there."""
    root = tmp_path_factory.mktemp("trellis-tiny-stage1")
    shutil.copytree(pipeline_dir, root, dirs_exist_ok=True)
    spec = json.loads((root / "pipeline.json").read_text())
    for key in ("slat_flow_model", "slat_decoder_gs"):
        ref = spec["args"]["models"].pop(key)
        for suffix in (".json", ".safetensors"):
            (root / (ref + suffix)).unlink()
    for key in ("slat_sampler", "slat_normalization"):
        del spec["args"][key]
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root


def test_a_stage_1_pipeline_loads_and_names_the_stages_it_lacks(stage1_pipeline_dir,
                                                                pipeline_dir):
    from core.errors import UserError
    from relaxflow.loading import check_pipeline_files
    from relaxflow.pipeline import TrellisPipeline

    assert check_pipeline_files(stage1_pipeline_dir).stages == ("structure",)
    pipe = TrellisPipeline.from_pretrained(stage1_pipeline_dir)
    assert pipe.stages == ("structure",)
    assert TrellisPipeline.from_pretrained(pipeline_dir).stages == ("structure", "latent",
                                                                    "decode")
    with pipe.stage("structure") as models:
        assert set(models) == {"sparse_structure_flow_model", "sparse_structure_decoder"}
    with pytest.raises(UserError, match=rf"the pipeline {stage1_pipeline_dir} has no stage 2 "
                                        r"\(the structured latent\), the 'latent' stage"):
        with pipe.stage("latent"):
            pass
    with pytest.raises(UserError, match="no Gaussian decoder, the 'decode' stage"):
        with pipe.stage("decode"):
            pass


def test_generate_with_a_stage_1_pipeline_writes_the_occupancy(stage1_pipeline_dir, tmp_path,
                                                               capsys):
    import numpy as np

    import run
    from tests.tiny_models import build_tiny_dinov2

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    code = run.main(["generate", "--config", "configs/trellis-image.yaml",
                     f"model={stage1_pipeline_dir}", f"output_dir={tmp_path / 'out'}",
                     f"image={image}", "sparse_structure_sampler.steps=2",
                     f"image_cond_model={build_tiny_dinov2(tmp_path / 'dinov2')}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote occupancy.npz only" in out and "has no stage 2 (the structured latent)" in out
    assert "so no splats" in out
    (run_dir,) = (tmp_path / "out" / "trellis-image").iterdir()
    assert np.load(run_dir / "occupancy.npz")["coords"].shape[1] == 3
    assert (run_dir / "occupancy.png").is_file() and not (run_dir / "splats.ply").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"] == ["structure"] and "splats" not in metrics


def test_relaxflow_refuses_a_stage_1_pipeline_before_anything_runs(stage1_pipeline_dir,
                                                                   tmp_path, capsys):
    import run

    image = _rgba_file(tmp_path / "obs.png", (16, 16, 40, 48), (200, 50, 50))
    assert run.main(["relaxflow", "--config", "configs/relaxflow-trellis.yaml",
                     f"model={stage1_pipeline_dir}", f"output_dir={tmp_path / 'out'}",
                     f"image={image}", f"priors=[{image}]"]) == 2
    err = capsys.readouterr().err
    assert "the relaxflow job needs every stage of the pipeline" in err
    assert "has no stage 2 (the structured latent)" in err
    assert not (tmp_path / "out").exists()
