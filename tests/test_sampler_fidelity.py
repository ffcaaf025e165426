"""The sampler against TRELLIS's ``FlowEulerSampler`` (``trellis/pipelines/samplers/
flow_euler.py`` and its guidance-interval mixin): the time grid and the guidance decisions bit
for bit, a one-item condition for several samples, and the trajectory it can return."""

import numpy as np
import pytest
import torch

from relaxflow.models import build
from relaxflow.sampler import FlowEulerSampler, Trajectory, rescaled_timesteps

TINY_FLOW = dict(resolution=4, in_channels=2, model_channels=32, cond_channels=16,
                 out_channels=2, num_blocks=2, num_heads=2, patch_size=1, qk_rms_norm=True)
RESCALES = (1, 2, 3, 4, 5, 0.5, 1.5, 2.5, 3.7, 0.25, 7.5)
INTERVALS = ((0.5, 1.0), (0.0, 0.5))


def trellis_times(steps, rescale_t):
    """TRELLIS's ``t_seq``, written out as its ``sample`` computes it."""
    t_seq = np.linspace(1, 0, steps + 1)
    return (rescale_t * t_seq / (1 + (rescale_t - 1) * t_seq)).tolist()


def guided_steps(steps, rescale_t, interval):
    """Which steps the sampler guides: a guided step's forward holds both halves."""
    items = []

    def velocity(x, t, cond):
        items.append(x.shape[0])
        return torch.zeros_like(x)

    FlowEulerSampler(steps=steps, rescale_t=rescale_t, cfg_interval=interval).sample(
        velocity, torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    return [n == 2 for n in items]


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return build("SparseStructureFlowModel", TINY_FLOW).eval()


def test_times_and_guidance_decisions_equal_trellis_bit_for_bit():
    for steps in range(1, 51):
        for rescale_t in RESCALES:
            times = trellis_times(steps, rescale_t)
            assert rescaled_timesteps(steps, rescale_t).tolist() == times, (steps, rescale_t)
            for lo, hi in INTERVALS:
                trellis = [lo <= t <= hi for t in times[:-1]]  # the mixin's test
                assert guided_steps(steps, rescale_t, (lo, hi)) == trellis, (steps, rescale_t)


def test_25_steps_at_rescale_4_leave_the_middle_step_unguided():
    """The case ``torch.linspace`` got wrong: TRELLIS's step 20 is just below 0.5."""
    assert rescaled_timesteps(25, 4.0)[20].item() == 0.49999999999999994
    guided = guided_steps(25, 4.0, (0.5, 1.0))
    assert guided[19] and not guided[20]


def test_one_condition_serves_every_noise_item(flow):
    """As in TRELLIS: one image's condition, several samples."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 2, 4, 4, 4, generator=g)
    cond = torch.randn(1, 5, 16, generator=g)
    neg = torch.zeros_like(cond)
    sampler = FlowEulerSampler(steps=4, cfg_strength=3.0)
    assert torch.equal(sampler.sample(flow, noise, cond, neg),
                       sampler.sample(flow, noise, cond.repeat(3, 1, 1), neg.repeat(3, 1, 1)))
    with pytest.raises(ValueError, match="the condition has a batch of 2 but the noise holds 3"):
        sampler.sample(flow, noise, cond.repeat(2, 1, 1), neg.repeat(2, 1, 1))


def test_voxel_features_take_their_conditions_per_item_or_repeated_to_batch_size():
    """Features ``[N, C]`` do not show their items: conditions go as given unless
    ``batch_size`` says how many there are."""
    seen = []

    def velocity(feats, t, cond):
        seen.append((len(t), cond.shape[0]))
        return torch.ones_like(feats)

    sampler = FlowEulerSampler(steps=2, cfg_strength=1.0, cfg_interval=(0.0, 1.0))
    feats = torch.zeros(5, 2)
    sampler.sample(velocity, feats, torch.zeros(1, 3), torch.zeros(1, 3))
    sampler.sample(velocity, feats, torch.zeros(1, 3), torch.zeros(1, 3), batch_size=2)
    assert seen == [(2, 2)] * 2 + [(4, 4)] * 2


def test_trajectory_holds_each_step_and_the_same_sample(flow):
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 2, 4, 4, 4, generator=g)
    cond = torch.randn(2, 5, 16, generator=g)
    sampler = FlowEulerSampler(steps=5, cfg_strength=3.0, rescale_t=3.0)
    plain = sampler.sample(flow, noise, cond, torch.zeros_like(cond))
    run = sampler.sample(flow, noise, cond, torch.zeros_like(cond), return_trajectory=True)
    assert isinstance(run, Trajectory) and isinstance(plain, torch.Tensor)
    assert len(run.pred_x_t) == len(run.pred_x_0) == 5
    assert torch.equal(run.samples, plain) and torch.equal(run.pred_x_t[-1], plain)
    # the last step runs to t = 0 along the same velocity, so without sigma_min its x_0 is the
    # sample; with it, x_0 = (1 - s) x_t - (s + (1 - s) t) v from that step's x_t and v
    t = rescaled_timesteps(5, 3.0)[-2].item()
    x_t = run.pred_x_t[-2]
    v = (x_t - plain) / t
    s = sampler.sigma_min
    assert torch.allclose(run.pred_x_0[-1], (1 - s) * x_t - (s + (1 - s) * t) * v, atol=1e-5)
    exact = FlowEulerSampler(sigma_min=0.0, steps=5, cfg_strength=3.0, rescale_t=3.0)
    last = exact.sample(flow, noise, cond, torch.zeros_like(cond), return_trajectory=True)
    assert torch.allclose(last.pred_x_0[-1], last.samples, atol=1e-5)


def test_trajectory_predicts_the_data_point_of_an_exact_velocity():
    """For data at one point x0 the exact velocity points at x0 from every x_t."""
    sampler = FlowEulerSampler(steps=6, cfg_strength=0.0, rescale_t=3.0)
    x0 = torch.tensor([[0.5, -2.0, 1.0]])
    s = sampler.sigma_min

    def velocity(x_t, t1000, cond):
        t = (t1000 / 1000)[:, None]
        return (1 - s) * (x_t - (1 - t) * x0) / (s + (1 - s) * t) - x0

    run = sampler.sample(velocity, torch.randn(1, 3), torch.zeros(1), torch.zeros(1),
                         return_trajectory=True)
    for pred in run.pred_x_0:
        assert torch.allclose(pred, x0, atol=1e-4)
