"""Multi-view-consistent noise: statistics a wrong construction would fail (seeded)."""

import math

import pytest
import torch

from cfd.cameras import orbit_cameras
from cfd.noise import NoiseConfig, make_noise
from cfd.noise.sphere_map import sphere_to_square


def sphere_views(azimuths, res=32, radius=0.5, elevation=10.0):
    """Surface points and opacity of a sphere at the origin, computed analytically."""
    n = len(azimuths)
    cams = orbit_cameras(torch.full((n,), elevation), torch.tensor(azimuths, dtype=torch.float32),
                         torch.full((n,), 2.5), torch.full((n,), 40.0), res, res)
    d = torch.nn.functional.normalize(cams.ray_directions(), dim=-1)
    o = cams.centers[:, None, None, :]
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - radius ** 2)
    t = -b - torch.sqrt(disc.clamp(min=0))
    return cams, o + t[..., None] * d, (disc > 0).float()


CFG = NoiseConfig(texture_resolution=64, n_shells=2)


def test_sphere_map_is_equal_area():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(400_000, 3, generator=g), dim=-1)
    uv = sphere_to_square(dirs)
    assert uv.abs().max() <= 1.0 + 1e-6
    hist = torch.histogramdd(uv, bins=[6, 6], range=[-1.0, 1.0, -1.0, 1.0]).hist
    assert ((hist / hist.mean()) - 1).abs().max() < 0.05


def test_cells_are_standard_normal_and_independent_over_texture_draws():
    _, points, opacity = sphere_views([0.0, 40.0])
    draws = torch.stack([make_noise(CFG, 3, "cpu", seed)(points, opacity, (3, 32, 32))
                         for seed in range(300)])  # [S,B,C,h,w]
    fg = opacity[:, None].expand(-1, 3, -1, -1) > 0.5
    mean, var = draws.mean(0)[fg], draws.var(0)[fg]
    assert mean.abs().mean() < 0.08 and mean.mean().abs() < 0.02
    assert (var.mean() - 1).abs() < 0.03 and ((var - 1).abs() < 0.45).all()
    # Horizontal neighbours on the object are uncorrelated within a view.
    x = draws[:, 0, 0]
    both = (opacity[0, :, :-1] > 0.5) & (opacity[0, :, 1:] > 0.5)
    a, b = x[:, :, :-1][:, both], x[:, :, 1:][:, both]
    corr = ((a - a.mean(0)) * (b - b.mean(0))).mean(0) / (a.std(0) * b.std(0))
    assert corr.mean().abs() < 0.03 and corr.abs().mean() < 0.1


def _corresponding_cells(cams, points, opacity, src, dst):
    """Cells of view ``src`` and ``dst`` that see the same visible surface point."""
    res = opacity.shape[-1]
    fg = opacity[src] > 0.5
    P = points[src][fg]
    ys, xs = torch.nonzero(fg, as_tuple=True)
    vm, K = cams.viewmats[dst], cams.Ks[dst]
    pc = P @ vm[:3, :3].T + vm[:3, 3]
    uv = (pc @ K.T)[:, :2] / pc[:, 2:]
    u, v = uv[:, 0].floor().long(), uv[:, 1].floor().long()
    ok = (u >= 0) & (u < res) & (v >= 0) & (v < res)
    u, v, P, xs, ys = u[ok], v[ok], P[ok], xs[ok], ys[ok]
    visible = (opacity[dst, v, u] > 0.5) & ((points[dst, v, u] - P).norm(dim=-1) < 0.03)
    return (ys[visible], xs[visible]), (v[visible], u[visible])


@pytest.mark.parametrize("mode", ["consistent", "iid"])
def test_same_surface_point_gets_correlated_noise_across_views(mode):
    cams, points, opacity = sphere_views([0.0, 10.0], res=48)
    noise = make_noise(NoiseConfig(mode=mode, texture_resolution=128), 3, "cpu", 0)
    z = noise(points, opacity, (3, 48, 48))
    (y0, x0), (y1, x1) = _corresponding_cells(cams, points, opacity, 0, 1)
    assert y0.numel() > 300
    a, b = z[0][:, y0, x0].flatten(), z[1][:, y1, x1].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    if mode == "consistent":
        assert corr > 0.35
    else:
        assert corr.abs() < 0.06


def test_background_is_fixed_in_screen_space():
    _, points, opacity = sphere_views([0.0, 90.0, 200.0])
    noise = make_noise(CFG, 3, "cpu", 0)
    z = noise(points, opacity, (3, 32, 32))
    # Cells at least two pixels away from the surface in every view (footprint corners average
    # neighbouring pixels).
    near = torch.nn.functional.max_pool2d(opacity[:, None], 5, 1, padding=2)[:, 0]
    empty = (near == 0).all(0)
    assert empty.sum() > 100
    assert torch.equal(z[0][:, empty], z[1][:, empty]) and torch.equal(z[0][:, empty],
                                                                       z[2][:, empty])
    assert not torch.equal(z[0][:, ~empty], z[1][:, ~empty])


@pytest.mark.parametrize("gamma", [0.19, 0.64])
def test_refresh_correlation_is_sqrt_one_minus_gamma(gamma):
    _, points, opacity = sphere_views([0.0, 120.0])
    noise = make_noise(CFG, 3, "cpu", 0)
    before = noise(points, opacity, (3, 32, 32))
    noise.refresh(gamma)
    after = noise(points, opacity, (3, 32, 32))
    corr = torch.corrcoef(torch.stack([before.flatten(), after.flatten()]))[0, 1]
    assert abs(corr - math.sqrt(1 - gamma)) < 0.03


def test_deterministic_state_round_trip_and_errors():
    _, points, opacity = sphere_views([0.0])
    a = make_noise(CFG, 3, "cpu", 7)
    b = make_noise(CFG, 3, "cpu", 7)
    assert torch.equal(a(points, opacity, (3, 32, 32)), b(points, opacity, (3, 32, 32)))
    state = a.state_dict()
    a.refresh(0.5)
    expected = a(points, opacity, (3, 32, 32))
    b.load_state_dict(state)
    b.refresh(0.5)
    assert torch.equal(b(points, opacity, (3, 32, 32)), expected)
    with pytest.raises(ValueError, match="multiple of the latent grid"):
        a(points, opacity, (3, 24, 24))
    with pytest.raises(ValueError, match="unknown noise mode"):
        make_noise(NoiseConfig(mode="pink"), 3, "cpu")


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("latent", [32, 16])
def test_a_wall_filling_the_view_leaves_no_background_cells(smooth, latent):
    """Every cell of a view filled by a wall owns texels, the border row and column included:
    footprint corners lie on pixel edges, so the last cells are as large as the others."""
    from cfd.cameras import Cameras, intrinsics_from_fov, look_at

    res = 32
    viewmat = look_at(torch.tensor([[0.0, 0.0, 2.5]]), torch.zeros(1, 3),
                      up=torch.tensor([0.0, 1.0, 0.0]))
    cams = Cameras(viewmat, intrinsics_from_fov(torch.tensor([30.0]), res, res), res, res)
    points = cams.centers[:, None, None] + 2.0 * cams.ray_directions()  # the plane z = 0.5
    noise = make_noise(NoiseConfig(texture_resolution=256, n_maps=6, n_shells=1,
                                   smooth_footprints=smooth), 3, "cpu", 0)
    z = noise(points, torch.ones(1, res, res), (3, latent, latent))
    background = (z[0] == noise.background).all(0)
    assert not background[-1].any() and not background[:, -1].any()
    assert not background.any()
