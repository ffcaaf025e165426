"""TRELLIS-compatible stage-1 models and the flow sampler: released sizes and key names on the
meta device, tensor layouts against hand-built cases, and tiny models run on CPU."""

import math

import pytest
import torch

from relaxflow.models import build
from relaxflow.models.layers import absolute_position_embedding, timestep_embedding
from relaxflow.models.sparse_structure_flow import patchify, unpatchify
from relaxflow.models.sparse_structure_vae import pixel_shuffle_3d
from relaxflow.sampler import FlowEulerSampler, rescaled_timesteps

SS_FLOW_IMAGE_L = dict(resolution=16, in_channels=8, model_channels=1024, cond_channels=1024,
                       out_channels=8, num_blocks=24, num_heads=16, mlp_ratio=4, patch_size=1,
                       pe_mode="ape", qk_rms_norm=True, use_fp16=True)
SS_DECODER = dict(out_channels=1, latent_channels=8, num_res_blocks=2, channels=[512, 128, 32],
                  num_res_blocks_middle=2, norm_type="layer", use_fp16=True)
SS_ENCODER = dict(in_channels=1, latent_channels=8, num_res_blocks=2, channels=[32, 128, 512],
                  num_res_blocks_middle=2, norm_type="layer", use_fp16=True)
TINY_FLOW = dict(resolution=4, in_channels=2, model_channels=32, cond_channels=16,
                 out_channels=2, num_blocks=2, num_heads=2, patch_size=1, qk_rms_norm=True)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, args, millions", [
    ("SparseStructureFlowModel", SS_FLOW_IMAGE_L, 555.5),
    ("SparseStructureFlowModel", {**SS_FLOW_IMAGE_L, "model_channels": 768, "num_blocks": 12,
                                  "num_heads": 12, "cond_channels": 768}, 156.7),
    ("SparseStructureFlowModel", {**SS_FLOW_IMAGE_L, "cond_channels": 768}, 543.0),
    ("SparseStructureFlowModel", {**SS_FLOW_IMAGE_L, "model_channels": 1280, "num_blocks": 28,
                                  "cond_channels": 768, "qk_rms_norm_cross": True}, 975.4),
    ("SparseStructureDecoder", SS_DECODER, 73.67),
    ("SparseStructureEncoder", SS_ENCODER, 59.30),
])
def test_released_configurations_have_the_released_sizes(name, args, millions):
    model = build(name, args, device="meta")
    assert n_params(model) / 1e6 == pytest.approx(millions, abs=0.05)


def test_stage1_flow_state_dict_has_the_released_keys_and_shapes():
    state = build("SparseStructureFlowModel", SS_FLOW_IMAGE_L, device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["pos_emb"] == (4096, 1024)
    assert shapes["t_embedder.mlp.0.weight"] == (1024, 256)
    assert shapes["input_layer.weight"] == (1024, 8)
    assert shapes["blocks.23.self_attn.to_qkv.weight"] == (3072, 1024)
    assert shapes["blocks.0.self_attn.q_rms_norm.gamma"] == (16, 64)
    assert shapes["blocks.0.cross_attn.to_kv.weight"] == (2048, 1024)
    assert shapes["blocks.0.norm2.weight"] == (1024,)
    assert shapes["blocks.0.mlp.mlp.2.weight"] == (1024, 4096)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6144, 1024)
    assert "blocks.0.cross_attn.q_rms_norm.gamma" not in shapes  # only the text XL model has it
    decoder = build("SparseStructureDecoder", SS_DECODER, device="meta").state_dict()
    assert tuple(decoder["blocks.2.conv.weight"].shape) == (128 * 8, 512, 3, 3, 3)
    assert tuple(decoder["out_layer.2.weight"].shape) == (1, 32, 3, 3, 3)
    assert "middle_block.1.norm1.weight" in decoder


def test_patchify_orders_tokens_x_major_and_inverts():
    x = torch.arange(2 * 3 * 4 ** 3, dtype=torch.float32).reshape(2, 3, 4, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 8, 3 * 8)
    # token 1 is the patch at (0, 0, 1); feature 1 is channel 0 at offset (0, 0, 1)
    assert tokens[0, 1, 1] == x[0, 0, 0, 0, 3]
    assert tokens[1, 4, 8] == x[1, 1, 2, 0, 0]
    assert torch.equal(unpatchify(tokens, 2, 4), x)


def test_pixel_shuffle_3d_puts_each_channel_at_its_sub_voxel():
    x = torch.randn(1, 2 * 8, 3, 3, 3)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 6, 6, 6)
    for c, dx, dy, dz in ((0, 0, 0, 0), (1, 1, 0, 1), (0, 1, 1, 0), (1, 0, 1, 1)):
        channel = c * 8 + dx * 4 + dy * 2 + dz
        assert torch.equal(y[0, c, dx::2, dy::2, dz::2], x[0, channel])


def test_embeddings_follow_the_released_layouts():
    emb = timestep_embedding(torch.tensor([500.0]), 256)
    freq = math.exp(-math.log(10000) * 3 / 128)
    assert emb[0, 3].item() == pytest.approx(math.cos(500 * freq), abs=1e-5)
    assert emb[0, 128 + 3].item() == pytest.approx(math.sin(500 * freq), abs=1e-5)
    ape = absolute_position_embedding(torch.tensor([[1, 2, 3]]), 16)  # 2 frequencies per axis
    f = [1.0, 0.01]
    expected = [math.sin(1 * f[0]), math.sin(1 * f[1]), math.cos(1 * f[0]), math.cos(1 * f[1]),
                math.sin(2 * f[0]), math.sin(2 * f[1]), math.cos(2 * f[0]), math.cos(2 * f[1]),
                math.sin(3 * f[0]), math.sin(3 * f[1]), math.cos(3 * f[0]), math.cos(3 * f[1]),
                0.0, 0.0, 0.0, 0.0]
    assert ape[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_tiny_flow_model_runs_and_its_half_torso_agrees():
    torch.manual_seed(0)
    model = build("SparseStructureFlowModel", TINY_FLOW)
    x, t, cond = torch.randn(2, 2, 4, 4, 4), torch.tensor([900.0, 100.0]), torch.randn(2, 5, 16)
    v = model(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert not torch.allclose(v[0], v[1])
    model.set_torso_dtype(torch.bfloat16)
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == torch.bfloat16
    assert model.input_layer.weight.dtype == torch.float32
    v_half = model(x, t, cond)
    assert v_half.dtype == torch.float32
    assert (v_half - v).abs().max() < 0.05 * v.abs().max()
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 2, 4, 4, 4\]"):
        model(torch.randn(1, 2, 8, 8, 8), t[:1], cond[:1])


def test_tiny_decoder_and_encoder_map_between_latent_and_occupancy():
    args = dict(num_res_blocks=1, channels=[16, 8], num_res_blocks_middle=1)
    decoder = build("SparseStructureDecoder", dict(out_channels=1, latent_channels=4, **args))
    encoder = build("SparseStructureEncoder", dict(in_channels=1, latent_channels=4,
                                                   **{**args, "channels": [8, 16]}))
    z = torch.randn(2, 4, 4, 4, 4)
    logits = decoder(z)
    assert logits.shape == (2, 1, 8, 8, 8)
    decoder.set_torso_dtype(torch.bfloat16)
    assert decoder.middle_block[0].conv1.weight.dtype == torch.bfloat16
    assert (decoder(z) - logits).abs().max() < 0.05 * logits.abs().max()
    mean, logvar = encoder((logits > 0).float(), return_logvar=True)
    assert mean.shape == logvar.shape == (2, 4, 4, 4, 4)


def test_rescaled_timesteps_follow_the_formula():
    t = rescaled_timesteps(4, 3.0)
    uniform = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(t, 3 * uniform / (1 + 2 * uniform))
    assert torch.equal(rescaled_timesteps(4, 1.0), uniform)


def test_euler_sampler_reaches_the_data_point_of_an_exact_velocity():
    """For data at a single point x0 the exact velocity field is straight, so Euler is exact."""
    sampler = FlowEulerSampler(steps=7, cfg_strength=0.0, rescale_t=3.0)
    x0 = torch.tensor([[0.5, -2.0, 1.0]])
    s = sampler.sigma_min

    def velocity(x_t, t1000, cond):
        t = (t1000 / 1000)[:, None]
        eps = (x_t - (1 - t) * x0) / (s + (1 - s) * t)
        return (1 - s) * eps - x0

    sample = sampler.sample(velocity, torch.randn(1, 3), torch.zeros(1), torch.zeros(1))
    assert torch.allclose(sample, x0, atol=1e-4)


def test_guidance_is_one_batched_forward_inside_its_interval():
    calls = []

    def velocity(x_t, t1000, cond):
        calls.append(x_t.shape[0])
        return cond[:, None].expand_as(x_t).clone()  # v = the condition value

    sampler = FlowEulerSampler(steps=4, cfg_strength=2.0, cfg_interval=(0.5, 1.0))
    x = torch.zeros(3, 2)
    cond, neg = torch.full((3,), 1.0), torch.full((3,), 0.25)
    assert torch.allclose(sampler.guided_velocity(velocity, x, 0.75, cond, neg),
                          torch.full((3, 2), 3 * 1.0 - 2 * 0.25))
    assert torch.allclose(sampler.guided_velocity(velocity, x, 0.25, cond, neg),
                          torch.ones(3, 2))
    assert calls == [6, 3]


def test_sampler_defaults_are_the_released_image_pipeline_settings():
    """``pipeline.json`` of TRELLIS-image-large: sigma_min 1e-5, 25 steps, strength 5, guidance
    interval [0.5, 1], rescale_t 3."""
    s = FlowEulerSampler()
    assert (s.sigma_min, s.steps, s.cfg_strength, s.cfg_interval, s.rescale_t) == (
        1e-5, 25, 5.0, (0.5, 1.0), 3.0)
