"""RelaxFlow: the relaxation through queries and keys against explicit blurred logits, the
alpha schedule, prior pooling, and the dual-branch sampler against single-branch runs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relaxflow.dual_branch import RelaxFlowSampler, alpha_schedule, pool_priors
from relaxflow.models import build
from relaxflow.models.layers import attention
from relaxflow.relaxation import (MATRIX_BLUR_MAX_LENGTH, AttentionRelaxation, KeyLayout,
                                  gaussian_kernel, kernel_size)
from relaxflow.sampler import FlowEulerSampler

TINY_FLOW = dict(resolution=4, in_channels=2, model_channels=32, cond_channels=16,
                 out_channels=2, num_blocks=2, num_heads=2, patch_size=1, qk_rms_norm=True)
TINY_KEYS = KeyLayout(n_images=2, prefix=2, grid=(3, 3))  # 2 x (2 + 9) = 22 tokens


def test_kernel_follows_the_released_size_rule():
    assert [kernel_size(s) for s in (1.0, 1.5, 2.5)] == [7, 9, 17]  # round half to even
    g = gaussian_kernel(1.5)
    assert g.sum().item() == pytest.approx(1.0) and torch.equal(g, g.flip(0))


@pytest.mark.parametrize("topology", ["grid", "flat"])
@pytest.mark.parametrize("sigmas", [(0.7, 1.3), (1.5, 0.0), (2.5, 2.5)])
def test_blurred_queries_and_keys_equal_the_blurred_logits(topology, sigmas):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 3, 8, generator=g)  # queries on a 4^3 grid
    k = torch.randn(2, TINY_KEYS.length(), 3, 8, generator=g)
    v = torch.randn_like(k)
    relax = AttentionRelaxation(*sigmas, topology=topology, query_grid=(4, 4, 4), keys=TINY_KEYS)
    bq, bk = relax.apply(q, k)
    logits = relax.blurred_logits(q, k)
    assert (torch.einsum("bqhd,bkhd->bhqk", bq, bk) / 8 ** 0.5 - logits).abs().max() <= 1e-5
    reference = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
    assert (attention(bq, bk, v) - reference).abs().max() <= 1e-5


def released_flat_blur(logits, sigma_query, sigma_key):
    """The released code's blur, written out independently: the ``[Lq, Lk]`` logit matrix of
    each head as an image, a 2D convolution with the query kernel ``[K, 1]`` and then the key
    kernel ``[1, K]``, zero padding, ``K = 2 round(3 sigma) + 1``."""
    B, H, Lq, Lk = logits.shape
    image = logits.reshape(B * H, 1, Lq, Lk).double()
    for sigma, shape in ((sigma_query, (-1, 1)), (sigma_key, (1, -1))):
        if sigma <= 0:
            continue
        size = 2 * round(3 * sigma) + 1
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        weights = torch.exp(-x ** 2 / (2 * sigma ** 2))
        kernel = (weights / weights.sum()).reshape(1, 1, *shape)
        image = F.conv2d(image, kernel, padding=(kernel.shape[2] // 2, kernel.shape[3] // 2))
    return image.reshape(B, H, Lq, Lk)


@pytest.mark.parametrize("sigmas", [(0.7, 1.3), (1.5, 0.0), (2.5, 2.5), (1.0, 2.5)])
@pytest.mark.parametrize("lengths", [(40, 30), (100, 90)])  # by the blur matrix, by conv1d
def test_flat_query_and_key_blur_equals_the_released_2d_logit_blur(sigmas, lengths):
    assert 40 <= MATRIX_BLUR_MAX_LENGTH < 90  # so the two cases take the two paths
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, lengths[0], 3, 8, generator=g)
    k = torch.randn(2, lengths[1], 3, 8, generator=g)
    relax = AttentionRelaxation(*sigmas, topology="flat", query_grid=None)
    bq, bk = relax.apply(q, k)
    want = released_flat_blur(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
                              / 8 ** 0.5, *sigmas)
    got = torch.einsum("bqhd,bkhd->bhqk", bq, bk) / 8 ** 0.5
    assert (got.double() - want).abs().max() <= 1e-5


def sparse_cells(n_items=2, n_cells=20, grid=5, seed=0):
    """Distinct random cells of a grid^3, a different set per item, ``[B, L, 3]``."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(grid ** 3, generator=g)[:n_cells] for _ in range(n_items)]
    return torch.stack([torch.stack([p // grid ** 2, p // grid % grid, p % grid], -1)
                        for p in picks])


def test_sparse_query_blur_is_the_3d_gaussian_over_occupied_cells():
    """Against the direct weighted mean ``sum_j w_ij q_j / sum_j w_ij`` over the occupied
    cells, ``w_ij = g(x_i - x_j) g(y_i - y_j) g(z_i - z_j)``, and through queries and keys
    against the blurred logits as for dense grids."""
    sigma, coords = 1.2, sparse_cells()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 20, 3, 8, generator=g)
    k = torch.randn(2, TINY_KEYS.length(), 3, 8, generator=g)
    relax = AttentionRelaxation(sigma, 0.9, query_grid=(5, 5, 5), query_coords=coords,
                                keys=TINY_KEYS)
    kernel, half = gaussian_kernel(sigma, torch.float64), kernel_size(sigma) // 2
    offset = coords[:, :, None, :] - coords[:, None, :, :]  # [B, i, j, 3]
    inside = (offset.abs() <= half).all(-1)
    weight = kernel[(offset + half).clamp(0, 2 * half)].prod(-1) * inside
    weight = weight / weight.sum(-1, keepdim=True)
    want = torch.einsum("bij,bjhd->bihd", weight, q.double())
    bq, bk = relax.apply(q, k)
    assert (bq.double() - want).abs().max() <= 1e-5
    logits = relax.blurred_logits(q, k)
    assert (torch.einsum("bqhd,bkhd->bhqk", bq, bk) / 8 ** 0.5 - logits).abs().max() <= 1e-5
    items = torch.tensor([False, True])  # only the prior item is relaxed
    some = AttentionRelaxation(sigma, 0.0, query_grid=(5, 5, 5), query_coords=coords,
                               keys=TINY_KEYS, items=items).apply(q, k)[0]
    assert torch.equal(some[0], q[0]) and (some[1].double() - want[1]).abs().max() <= 1e-5


def test_grid_keys_leave_class_and_register_tokens_and_other_images_alone():
    k = torch.zeros(1, TINY_KEYS.length(), 1, 1)
    k[0, 2 + 4] = 1.0  # centre patch of image 0
    out = AttentionRelaxation(0.0, 1.0, keys=TINY_KEYS).blur_keys(k)[0, :, 0, 0]
    assert torch.equal(out[:2], torch.zeros(2)) and torch.equal(out[11:], torch.zeros(11))
    assert out[2:11].sum().item() == pytest.approx(gaussian_kernel(1.0)[2:5].sum().item() ** 2)
    k = torch.zeros(1, TINY_KEYS.length(), 1, 1)
    k[0, 2] = 1.0  # first patch of image 0, next to the prefix tokens
    flat = AttentionRelaxation(0.0, 1.0, topology="flat").blur_keys(k)[0, :, 0, 0]
    assert (flat[:2] > 0).all()  # the released flat blur crosses into the prefix tokens


def test_alpha_schedule_values():
    expected12 = [1.0, 11 / 12, 10 / 12, 9 / 12, 8 / 12] + [0.0] * 7
    assert alpha_schedule(12) == pytest.approx(expected12)
    a25 = alpha_schedule(25)
    assert a25[:11] == pytest.approx([1 - k / 25 for k in range(11)]) and set(a25[11:]) == {0.0}
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_schedule(12, "steep")
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_schedule(12, "constant")  # not a released schedule
    # two_stage at K = 25: ramp over int(2.5) = 2 steps, hold int(5) = 5, linear over the last 18
    expected25 = [0.5, 1.0] + [1.0] * 5 + [1 - j / 18 for j in range(18)]
    assert alpha_schedule(25, "two_stage") == pytest.approx(expected25)
    assert alpha_schedule(12, "two_stage") == pytest.approx([1.0] * 3 + [1 - j / 9 for j in range(9)])
    assert alpha_schedule(12, "inverse_sqrt") == pytest.approx(
        [(1 + 5 * k / 12) ** -0.5 for k in range(12)])


def test_prior_pooling_modes():
    tokens = torch.randn(3, 5, 4)
    assert pool_priors(tokens).shape == (1, 15, 4)
    assert torch.allclose(pool_priors(tokens, "mean"), tokens.mean(0, keepdim=True))
    same = tokens[:1].expand(3, -1, -1)
    assert torch.allclose(pool_priors(same, "consensus"), tokens[:1], atol=1e-6)


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return build("SparseStructureFlowModel", TINY_FLOW)


def conditions(seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(1, 7, 16, generator=g)
    prior = torch.randn(1, TINY_KEYS.length(), 16, generator=g)
    return (obs, torch.zeros_like(obs)), (prior, torch.zeros_like(prior))


def relaxflow(steps=6, **kwargs):
    base = FlowEulerSampler(steps=steps, cfg_strength=3.0, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    relaxation = AttentionRelaxation(2.5, 1.5, query_grid=(4, 4, 4), keys=TINY_KEYS)
    return RelaxFlowSampler(base=base, relaxation=relaxation, **kwargs)


def test_shared_unconditional(flow):
    """All-zero negatives give the same velocity whatever their length and blur."""
    x, t = torch.randn(1, 2, 4, 4, 4), torch.tensor([800.0])
    short = flow(x, t, torch.zeros(1, 7, 16))
    relax = AttentionRelaxation(2.5, 1.5, query_grid=(4, 4, 4), keys=TINY_KEYS)
    long = flow(x, t, torch.zeros(1, TINY_KEYS.length(), 16), relaxation=relax)
    assert (short - long).abs().max() <= 1e-5


def test_zero_alpha_is_plain_sampling_bitwise(flow):
    obs, prior = conditions()
    noise = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sampler = relaxflow(alpha0=0.0)
    plain = sampler.base.sample(flow, noise, *obs)
    assert torch.equal(sampler.sample(flow, noise, obs, prior), plain)


def test_full_visibility_gives_the_observation_branch(flow):
    obs, prior = conditions()
    noise = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sampler = relaxflow()
    plain = sampler.base.sample(flow, noise, *obs)
    seen = sampler.sample(flow, noise, obs, prior, visibility=torch.ones(1, 1, 4, 4, 4))
    assert (seen - plain).abs().max() <= 1e-5
    unseen = sampler.sample(flow, noise, obs, prior)
    assert (unseen - plain).abs().max() > 1e-2  # the prior branch changes what is not seen


def test_batched_branches_equal_separate_forwards(flow):
    obs, prior = conditions()
    sampler = relaxflow()
    x = torch.randn(1, 2, 4, 4, 4)
    m = torch.rand(1, 1, 4, 4, 4)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return flow(*args, **kwargs)

    fused = sampler.fused_velocity(counted, x, 0.8, 0.7, obs, prior, m)
    assert calls == [3]  # observation, prior and one shared unconditional item
    v_obs = sampler.base.guided_velocity(flow, x, 0.8, *obs)
    relax = sampler.relaxation
    t = torch.tensor([800.0])
    v_prior = (4 * flow(x, t, prior[0], relaxation=relax)
               - 3 * flow(x, t, prior[1], relaxation=relax))
    expected = v_obs + (1 - m) * 0.7 * (v_prior - v_obs)
    assert (fused - expected).abs().max() <= 1e-5
    # a non-zero prior negative (text models) gets its own, relaxed item: four in the batch
    calls.clear()
    text_prior = (prior[0], prior[0] * 0.5)
    fused = sampler.fused_velocity(counted, x, 0.8, 0.7, obs, text_prior, m)
    assert calls == [4]
    v_prior = (4 * flow(x, t, prior[0], relaxation=relax)
               - 3 * flow(x, t, prior[0] * 0.5, relaxation=relax))
    assert (fused - (v_obs + (1 - m) * 0.7 * (v_prior - v_obs))).abs().max() <= 1e-5


def test_visibility_hides_voxels_behind_an_occluder():
    from cfd.cameras import orbit_cameras
    from relaxflow.visibility import voxel_visibility

    # a wall at x = 40 (facing the camera on +x) hides a block behind it at x = 20; a second
    # block beside the wall is in plain view
    wall = torch.stack(torch.meshgrid(torch.tensor([40]), torch.arange(16, 48),
                                      torch.arange(16, 48), indexing="ij"), -1).reshape(-1, 3)
    hidden = torch.stack(torch.meshgrid(torch.arange(18, 22), torch.arange(28, 36),
                                        torch.arange(28, 36), indexing="ij"), -1).reshape(-1, 3)
    beside = torch.stack(torch.meshgrid(torch.arange(40, 44), torch.arange(52, 58),
                                        torch.arange(28, 36), indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([wall, hidden, beside])
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    camera = orbit_cameras(one(0), one(0), one(2.0), one(40), 128, 128)
    vis = voxel_visibility(coords, 64, camera)
    n_wall, n_hidden = len(wall), len(hidden)
    assert vis[:n_wall].mean() > 0.95
    assert vis[n_wall:n_wall + n_hidden].max() < 0.05
    front_face = beside[:, 0] == 43  # the beside block's face towards the camera
    assert vis[n_wall + n_hidden:][front_face].mean() > 0.95
    assert vis[n_wall + n_hidden:][beside[:, 0] == 40].max() < 0.05  # its own back
    mask = torch.zeros(128, 128)
    assert voxel_visibility(coords, 64, camera, mask).max() == 0
    with pytest.raises(ValueError, match="image mask is"):
        voxel_visibility(coords, 64, camera, torch.zeros(64, 64))


def test_embedded_prior_draws_views_of_a_prompt_with_their_alpha(tmp_path):
    from cfd.shapes.dataset import ShapeDatasetConfig
    from relaxflow.conditioning import preprocess_image
    from cfd.systems.prior import ModelChoice
    from relaxflow.priors import PriorImagesConfig, prior_images

    dataset = ShapeDatasetConfig(views_per_object=12, views_per_variant=2, resolution=32,
                                 cache_dir=str(tmp_path))
    rgba = prior_images("a lamp", 0, PriorImagesConfig(steps=20,
                                                       model=ModelChoice(dataset=dataset)))
    assert rgba.shape == (3, 32, 32, 4) and rgba.dtype == np.uint8
    alpha = rgba[..., 3] / 255.0
    assert (alpha > 0.5).mean(axis=(1, 2)).min() > 0.05  # an object in every view
    assert alpha[:, 0, 0].max() == 0  # corners are background
    # the alpha fits the colours: background pixels are the dataset's grey
    background = rgba[..., :3][alpha == 0] / 255.0
    assert abs(background.mean() - 0.5) < 0.05
    assert preprocess_image(rgba[0]).shape == (3, 518, 518)


def test_embedded_prior_draws_a_category_prompt(tmp_path):
    """A category's prompt ("a stool") draws views of its variants: each prior image is one of
    the dataset's stool images, with that image's alpha."""
    from safetensors.torch import load_file

    from cfd.shapes import build_shape_dataset, prompts
    from cfd.shapes.dataset import ShapeDatasetConfig
    from cfd.systems.prior import ModelChoice
    from relaxflow.priors import PriorImagesConfig, prior_images

    dataset = ShapeDatasetConfig(views_per_object=2, views_per_variant=12, resolution=32,
                                 cache_dir=str(tmp_path))
    rgba = prior_images("a stool", 0, PriorImagesConfig(steps=20,
                                                        model=ModelChoice(dataset=dataset)))
    assert rgba.shape == (3, 32, 32, 4)
    data = load_file(str(build_shape_dataset(dataset) / "images.safetensors"))
    drawn = torch.from_numpy(rgba).float()
    stored = torch.cat([data["rgb"], data["alpha"]], -1).float()
    nearest = ((drawn[:, None] - stored[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (data["prompt_index"][nearest] == prompts().index("a stool")).all()
    assert (drawn - stored[nearest]).abs().amax(dim=(1, 2, 3)).max() <= 2  # the image itself
    with pytest.raises(ValueError, match=r"cannot draw 'a sofa' \(it knows: a mug, .*a stool"):
        prior_images("a sofa", 0, PriorImagesConfig(model=ModelChoice(dataset=dataset)))


def test_padded_conditions_attend_to_their_own_keys_only():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 2, 4, generator=g)
    k, v = torch.randn(2, 6, 2, 4, generator=g), torch.randn(2, 6, 2, 4, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    out = attention(q, k, v, mask)
    assert torch.allclose(out[1:], attention(q[1:], k[1:, :3], v[1:, :3]), atol=1e-6)
    assert torch.allclose(out[:1], attention(q[:1], k[:1], v[:1]), atol=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        attention(q, k, v, torch.tensor([[True] * 6, [False] * 3 + [True] * 3]))


@pytest.mark.gpu
def test_relaxflow_step_on_cuda_matches_cpu(flow):
    obs, prior = conditions()
    sampler = relaxflow()
    x, m = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 1, 4, 4, 4)
    expected = sampler.fused_velocity(flow, x, 0.8, 0.7, obs, prior, m)
    cuda_flow = build("SparseStructureFlowModel", TINY_FLOW, device="cuda")
    cuda_flow.load_state_dict(flow.state_dict())
    to = lambda pair: tuple(p.cuda() for p in pair)  # noqa: E731
    got = sampler.fused_velocity(cuda_flow, x.cuda(), 0.8, 0.7, to(obs), to(prior), m.cuda())
    assert (got.cpu() - expected).abs().max() < 1e-4 * expected.abs().max().clamp(min=1)


def test_key_out_background_keeps_the_object_and_its_enclosed_background_colour():
    """A red ring with a white hole on white: outside is background (alpha 0), the ring and the
    enclosed hole are object (alpha 1), and a pixel halfway in colour is halfway in alpha."""
    from relaxflow.priors import key_out_background

    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = ((x - 15.5) ** 2 + (y - 15.5) ** 2).sqrt()
    image = torch.ones(1, 32, 32, 3)
    ring = (r > 5) & (r < 10)
    image[0, ring] = torch.tensor([0.9, 0.1, 0.1])
    image[0, 0, 16] = 1 - 0.12  # a grey pixel on the border: distance 0.12, halfway
    alpha = key_out_background(image, low=0.06, high=0.18)[0, ..., 0]
    assert alpha[r > 12].max() < 0.51 and alpha[r > 12].mean() < 0.01
    assert alpha[ring].min() == 1 and alpha[r < 4].min() == 1
    assert alpha[0, 16].item() == pytest.approx(0.5, abs=1e-5)


def test_an_image_model_draws_prior_images_through_the_same_path(tmp_path):
    """A (tiny) Stable Diffusion folder gives seeded RGBA prior images at the asked size; its
    ``decode`` is diffusers' own VAE decode and post-processing."""
    from diffusers.image_processor import VaeImageProcessor

    from guidance.stable_diffusion import StableDiffusionGuidance
    from cfd.systems.prior import ModelChoice
    from relaxflow.priors import PriorImagesConfig, prior_images

    from .tiny_models import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    cfg = PriorImagesConfig(n_images=2, steps=3, size=32, guidance_scale=5.0,
                            model=ModelChoice(kind="stable-diffusion", model_id=str(folder),
                                                   half_precision=False))
    rgba = prior_images("a chair", 0, cfg)
    assert rgba.shape == (2, 32, 32, 4) and rgba.dtype == np.uint8
    assert np.array_equal(rgba, prior_images("a chair", 0, cfg))
    assert not np.array_equal(rgba, prior_images("a chair", 1, cfg))
    sd = StableDiffusionGuidance.from_pretrained(folder, half_precision=False)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    want = VaeImageProcessor().postprocess(
        sd.vae.decode(z / sd.vae.config.scaling_factor).sample, output_type="pt")
    assert torch.allclose(sd.decode(z), want.permute(0, 2, 3, 1), atol=1e-6)


def test_prior_image_settings_are_checked_before_a_model_loads():
    from cfd.systems.prior import ModelChoice
    from relaxflow.priors import PriorImagesConfig, prior_images

    with pytest.raises(ValueError, match="generate_priors.n_images is 0: draw at least one"):
        prior_images("a lamp", 0, PriorImagesConfig(n_images=0))
    with pytest.raises(ValueError, match="generate_priors.model.kind is one of"):
        prior_images("a lamp", 0, PriorImagesConfig(model=ModelChoice(kind="dall-e")))


def test_prior_model_settings_are_only_those_sampling_reads():
    """Distillation-only settings (guidance_scale, weighting, latent_sampling) are not settings
    of the prior model: the sampling's own guidance_scale is the only one."""
    from cfd.config import ConfigError, load_config, to_object
    from cfd.systems.prior import GuidanceKind
    from jobs.relaxflow import RelaxFlowConfig
    from relaxflow.priors import guidance_config

    cfg = to_object(load_config(RelaxFlowConfig, "configs/relaxflow-trellis.yaml",
                                ["generate_priors.model.kind=stable-diffusion",
                                 "generate_priors.model.model_id=sd",
                                 "generate_priors.guidance_scale=4"]))
    assert cfg.generate_priors.guidance_scale == 4
    guidance = guidance_config(cfg.generate_priors.model, 64)
    assert (guidance.kind, guidance.model_id, guidance.resolution) == (
        GuidanceKind.stable_diffusion, "sd", 64)
    for ignored in ("guidance_scale=9", "weighting=uniform", "latent_sampling=mean"):
        with pytest.raises(ConfigError):
            load_config(RelaxFlowConfig, "configs/relaxflow-trellis.yaml",
                        [f"generate_priors.model.{ignored}"])


def test_guidance_options_are_the_model_configs_by_name():
    """GuidanceConfig hands its options to a diffusers prior's LatentModelConfig by name: every
    option of the one is an option of the other, with the same default where both have one."""
    from dataclasses import MISSING, fields

    from cfd.systems.prior import GuidanceConfig, ModelChoice
    from guidance.latent import LatentModelConfig

    ours = {f.name: f for f in fields(GuidanceConfig)}
    for f in fields(LatentModelConfig):
        assert f.name in ours, f.name
        if f.default is not MISSING:
            assert ours[f.name].default == f.default, f.name
    assert {f.name for f in fields(ModelChoice)} <= set(ours)
