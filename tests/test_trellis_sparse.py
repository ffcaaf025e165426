"""Sparse voxel layers against dense references, and the stage-2 flow model's attention."""

import pytest
import torch
import torch.nn.functional as F

from relaxflow.models import build
from relaxflow.models.sparse import (SparseConv3d, SparseTensor, sparse_downsample,
                                     sparse_upsample)

SLAT_IMAGE_L = dict(resolution=64, in_channels=8, model_channels=1024, cond_channels=1024,
                    out_channels=8, num_blocks=24, num_heads=16, mlp_ratio=4, patch_size=2,
                    num_io_res_blocks=2, io_block_channels=[128], pe_mode="ape",
                    qk_rms_norm=True, use_fp16=True)
TINY_SLAT = dict(resolution=8, in_channels=4, model_channels=32, cond_channels=16,
                 out_channels=4, num_blocks=2, num_heads=2, patch_size=2, num_io_res_blocks=2,
                 io_block_channels=[8], qk_rms_norm=True)


def random_sites(n_items, size, density, generator):
    occupied = torch.rand(n_items, size, size, size, generator=generator) < density
    return torch.argwhere(occupied).int()  # (batch, x, y, z), sorted by item


@pytest.mark.parametrize("released, millions", [
    (SLAT_IMAGE_L, 600.4),
    ({**SLAT_IMAGE_L, "model_channels": 768, "num_blocks": 12, "num_heads": 12,
      "cond_channels": 768}, 185.4),
    ({**SLAT_IMAGE_L, "cond_channels": 768}, 587.8),
])
def test_stage2_flow_has_the_released_size_and_keys(released, millions):
    model = build("SLatFlowModel", released, device="meta")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    c = released["model_channels"]
    assert shapes["input_blocks.1.conv1.conv.weight"] == (c, 3, 3, 3, 128)
    assert shapes["out_blocks.0.norm1.weight"] == (2 * c,)
    assert shapes["out_blocks.1.skip_connection.weight"] == (128, 256)
    assert shapes["input_layer.weight"] == (128, 8) and shapes["out_layer.weight"] == (8, 128)


def test_submanifold_conv_equals_dense_conv_at_the_occupied_sites():
    g = torch.Generator().manual_seed(0)
    coords = random_sites(2, 6, 0.3, g)
    feats = torch.randn(len(coords), 5, generator=g)
    conv = SparseConv3d(5, 7)
    out = conv(SparseTensor(feats, coords)).feats
    dense = torch.zeros(2, 5, 6, 6, 6)
    b, x, y, z = coords.long().unbind(1)
    dense[b, :, x, y, z] = feats
    weight = conv.conv.weight.permute(0, 4, 1, 2, 3)  # [out, 3, 3, 3, in] -> [out, in, 3, 3, 3]
    expected = F.conv3d(dense, weight, conv.conv.bias, padding=1)[b, :, x, y, z]
    assert torch.allclose(out, expected, atol=1e-5)


def test_downsample_matches_the_released_mean_and_upsample_copies_back():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 2, 0, 0], [1, 0, 0, 1]],
                          dtype=torch.int32)
    feats = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    coarse = sparse_downsample(SparseTensor(feats, coords))
    as_dict = {tuple(c.tolist()): f.item() for c, f in zip(coarse.coords, coarse.feats)}
    # sum / (children + 1), as torch.scatter_reduce(zeros, ..., "mean") gives in TRELLIS
    assert as_dict == pytest.approx({(0, 0, 0, 0): 4 / 3, (0, 1, 0, 0): 2.5, (1, 0, 0, 0): 3.5})
    released = torch.zeros(3, 1).scatter_reduce(
        0, torch.tensor([[0], [0], [1], [2]]), feats, reduce="mean")
    assert torch.allclose(coarse.feats, released)
    fine = sparse_upsample(coarse)
    assert torch.equal(fine.coords, coords)
    assert fine.feats.squeeze(1).tolist() == pytest.approx([4 / 3, 4 / 3, 2.5, 3.5])


def test_stage2_attention_keeps_items_apart():
    """Items of different sizes (one by one) and of equal size (one batch) give what each
    item gives alone: attention never mixes voxels of different items."""
    torch.manual_seed(0)
    model = build("SLatFlowModel", TINY_SLAT)
    g = torch.Generator().manual_seed(1)
    coords = random_sites(2, 8, 0.2, g)
    feats = torch.randn(len(coords), 4, generator=g)
    t, cond = torch.tensor([700.0, 300.0]), torch.randn(2, 3, 16, generator=g)
    both = model(SparseTensor(feats, coords), t, cond).feats
    assert both.shape == (len(coords), 4)
    for b in range(2):
        rows = coords[:, 0] == b
        alone_coords = coords[rows].clone()
        alone_coords[:, 0] = 0
        alone = model(SparseTensor(feats[rows], alone_coords), t[b:b + 1], cond[b:b + 1]).feats
        assert torch.allclose(both[rows], alone, atol=1e-5)
    twin = torch.cat([coords[coords[:, 0] == 0], coords[coords[:, 0] == 0]])
    twin[len(twin) // 2:, 0] = 1
    twin_feats = torch.cat([feats[coords[:, 0] == 0]] * 2)
    pair = model(SparseTensor(twin_feats, twin), torch.tensor([700.0, 700.0]),
                 torch.cat([cond[:1], cond[:1]])).feats
    assert torch.allclose(pair[: len(twin) // 2], both[coords[:, 0] == 0], atol=1e-5)
    assert torch.allclose(pair[len(twin) // 2:], both[coords[:, 0] == 0], atol=1e-5)


REP = {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0,
              "_rotation": 0.1},
       "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32,
       "2d_filter_kernel_size": 0.1, "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3,
       "opacity_bias": 0.1, "scaling_activation": "softplus"}
GS_DECODER_B = dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12,
                    num_heads=12, mlp_ratio=4, attn_mode="swin", window_size=8, pe_mode="ape",
                    use_fp16=True, representation_config=REP)


def test_gaussian_decoder_has_the_released_size_and_layout():
    model = build("SLatGaussianDecoder", GS_DECODER_B, device="meta")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(85.37, abs=0.01)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["out_layer.weight"] == (448, 768)
    assert shapes["offset_perturbation"] == (32, 3)
    assert shapes["blocks.11.attn.to_qkv.weight"] == (2304, 768)


def test_windowed_attention_equals_attention_inside_each_shifted_window():
    from relaxflow.models.gaussian_decoder import windowed_attention

    g = torch.Generator().manual_seed(0)
    coords = random_sites(2, 12, 0.15, g)
    q, k, v = (torch.randn(len(coords), 2, 4, generator=g) for _ in range(3))
    for shift in (0, 2):
        out = windowed_attention(q, k, v, coords, window=4, shift=shift, windows_per_chunk=3)
        cell = torch.div(coords[:, 1:].long() + shift, 4, rounding_mode="floor")
        key = torch.cat([coords[:, :1].long(), cell], 1)
        for w in torch.unique(key, dim=0):
            rows = (key == w).all(1)
            expected = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            assert torch.allclose(out[rows], expected.transpose(0, 1), atol=1e-5)


def test_gaussian_activations_match_hand_computed_values():
    import math

    torch.manual_seed(0)
    decoder = build("SLatGaussianDecoder", {**GS_DECODER_B, "model_channels": 24, "num_blocks": 2,
                                            "num_heads": 2, "representation_config": {
                                                **REP, "num_gaussians": 2}})
    coords = torch.tensor([[0, 10, 20, 30], [1, 63, 0, 5]], dtype=torch.int32)
    raw = torch.zeros(2, 2 * 14)  # per voxel: xyz 6 | dc 6 | scaling 6 | rotation 8 | opacity 2
    raw[0, 18 + 4: 18 + 8] = torch.tensor([0.0, 10.0, 0.0, 0.0])  # rotation of Gaussian 1
    first, second = decoder.to_splats(raw, coords)
    assert len(first) == len(second) == 2
    pert = torch.atanh((torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 1 / 3]]) * 2 - 1) / 1.5)
    expected_means = (torch.tensor([10.5, 20.5, 30.5]) / 64
                      + torch.tanh(pert) / 64 * 0.75 - 0.5)
    assert torch.allclose(first.params["means"], expected_means, atol=1e-6)
    scale = math.sqrt(0.004 ** 2 + 9e-4 ** 2)
    assert torch.allclose(first.scales, torch.full((2, 3), scale), rtol=1e-4)
    assert torch.allclose(first.opacities, torch.full((2,), 0.1), atol=1e-6)
    assert torch.allclose(first.params["quats"][0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(first.params["quats"][1], torch.tensor([1.0, 1.0, 0, 0]) / 2 ** 0.5)
    assert torch.allclose(first.base_colors, torch.full((2, 3), 0.5))


def test_tiny_gaussian_decoder_output_renders():
    from cfd.cameras import fixed_orbit_cameras
    from cfd.renderers import render

    torch.manual_seed(0)
    decoder = build("SLatGaussianDecoder", {**GS_DECODER_B, "resolution": 16,
                                            "model_channels": 24, "num_blocks": 2,
                                            "num_heads": 2, "window_size": 4})
    coords = random_sites(1, 16, 0.05, torch.Generator().manual_seed(2))
    latent = SparseTensor(torch.randn(len(coords), 8), coords)
    with torch.no_grad():
        (splats,) = decoder.to_splats(decoder(latent), coords)
    assert len(splats) == 32 * len(coords)
    assert splats.params["means"].abs().max() <= 0.5 + 0.75 / 16
    out = render(splats, fixed_orbit_cameras(1, 32, 32, 20.0, 2.0, 40.0), backend="torch")
    assert out.alpha.max() > 0.5


@pytest.mark.gpu
def test_stage2_and_decoder_on_cuda_in_half_precision_agree_with_cpu():
    torch.manual_seed(0)
    flow = build("SLatFlowModel", {**TINY_SLAT, "use_fp16": True})
    decoder = build("SLatGaussianDecoder", {**GS_DECODER_B, "resolution": 16,
                                            "model_channels": 24, "num_blocks": 2,
                                            "num_heads": 2, "window_size": 4})
    coords = random_sites(2, 8, 0.2, torch.Generator().manual_seed(1))
    feats, cond = torch.randn(len(coords), 4), torch.randn(2, 3, 16)
    t = torch.tensor([700.0, 300.0])
    expected = flow(SparseTensor(feats, coords), t, cond).feats
    flow_cuda = build("SLatFlowModel", {**TINY_SLAT, "use_fp16": True}, device="cuda")
    flow_cuda.load_state_dict(flow.state_dict())
    assert flow_cuda.blocks[0].mlp.mlp[0].weight.dtype == torch.float16
    got = flow_cuda(SparseTensor(feats.cuda(), coords.cuda()), t.cuda(), cond.cuda()).feats
    assert (got.float().cpu() - expected).abs().max() < 2e-2 * expected.abs().max()
    fine = coords.clone()
    fine[:, 1:] *= 2  # on the decoder's 16^3 grid
    latent = SparseTensor(torch.randn(len(coords), 8), fine)
    with torch.no_grad():
        ref = decoder(latent)
        decoder.cuda().set_torso_dtype(torch.float16)
        half = decoder(SparseTensor(latent.feats.cuda(), latent.coords.cuda()))
    assert (half.float().cpu() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_stage2_grid_relaxation_blurs_over_space_not_token_order():
    """With the grid topology the stage-2 model blurs each voxel's query over its neighbours in
    space: listing the voxels in another order permutes the output and nothing else; the blur
    changes the velocity, and differently from the flat topology's blur along the token list."""
    from relaxflow.relaxation import AttentionRelaxation, KeyLayout

    torch.manual_seed(0)
    model = build("SLatFlowModel", TINY_SLAT)
    g = torch.Generator().manual_seed(2)
    coords = random_sites(1, 8, 0.3, g)
    feats = torch.randn(len(coords), 4, generator=g)
    t, cond = torch.tensor([600.0]), torch.randn(1, 3, 16, generator=g)
    keys = KeyLayout(n_images=1, prefix=1, grid=(2, 1))
    order = torch.randperm(len(coords), generator=g)

    def velocity(topology, permute):
        relax = AttentionRelaxation(1.5, 0.0, topology=topology, query_grid=None, keys=keys)
        c, f = (coords[order], feats[order]) if permute else (coords, feats)
        return model(SparseTensor(f, c), t, cond, relaxation=relax).feats

    plain = model(SparseTensor(feats, coords), t, cond).feats
    grid = velocity("grid", False)
    assert (grid - plain).abs().max() > 1e-3
    assert torch.allclose(velocity("grid", True), grid[order], atol=1e-5)
    assert (velocity("flat", False) - grid).abs().max() > 1e-3
