"""The pure-PyTorch splat rasteriser: analytic images, a dense oracle, gradients, bad input."""

import math

import pytest
import torch

from cfd.cameras import Cameras, intrinsics_from_fov, look_at
from cfd.renderers import rasterization, render
from cfd.scene import Splats

from .dense_reference import dense_render
from .scenes import random_cameras, random_scene


def _identity_camera(width, height, focal, dtype=torch.float64):
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=dtype)
    return torch.eye(4, dtype=dtype)[None], K[None]


@pytest.mark.parametrize("center", [(0.0, 0.0), (0.3, -0.2)])
def test_single_isotropic_gaussian_matches_analytic_image(center):
    W, H, f, z, s, o = 48, 40, 50.0, 4.0, 0.12, 0.8
    x, y = center
    viewmat, K = _identity_camera(W, H, f)
    dt = torch.float64
    out = rasterization(
        torch.tensor([[x, y, z]], dtype=dt), torch.tensor([[1.0, 0, 0, 0]], dtype=dt),
        torch.full((1, 3), s, dtype=dt), torch.tensor([o], dtype=dt),
        torch.tensor([[0.2, 0.6, 1.0]], dtype=dt), viewmat, K, W, H,
        backgrounds=torch.tensor([1.0, 0.0, 0.0], dtype=dt),
    )
    # EWA: cov2d = s^2 J J^T + 0.3 I, with J the perspective Jacobian at the mean.
    u, v = x / z, y / z
    g = (f / z) ** 2 * s * s
    cov = torch.tensor([[g * (1 + u * u) + 0.3, g * u * v], [g * u * v, g * (1 + v * v) + 0.3]],
                       dtype=dt)
    mean = torch.tensor([f * u + W / 2, f * v + H / 2], dtype=dt)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dt) + 0.5, torch.arange(W, dtype=dt) + 0.5,
                            indexing="ij")
    d = torch.stack([xs, ys], -1) - mean
    maha = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov), d)
    alpha = (o * torch.exp(-0.5 * maha)).clamp(max=0.999)
    alpha = alpha * (alpha >= 1 / 255)
    assert torch.allclose(out.alpha[0, ..., 0], alpha, atol=1e-10)
    expected = alpha[..., None] * torch.tensor([0.2, 0.6, 1.0], dtype=dt)
    expected = expected + (1 - alpha[..., None]) * torch.tensor([1.0, 0.0, 0.0], dtype=dt)
    assert torch.allclose(out.rgb[0], expected, atol=1e-10)
    covered = alpha > 0
    assert torch.allclose(out.depth[0, ..., 0][covered], torch.full_like(alpha[covered], z))
    assert (out.depth[0, ..., 0][~covered] == 0).all()


def test_matches_dense_oracle_values_and_gradients():
    means, quats, scales, opacities, colors = random_scene(300)
    viewmats, Ks = random_cameras(3)
    params = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = rasterization(*params, viewmats, Ks, 37, 29, backgrounds=bg, chunk_size=8)
    ref = dense_render(*params, viewmats, Ks, 37, 29, background=bg)
    ours = (out.rgb, out.alpha, out.depth)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert out.alpha.max() > 0.5  # the scene is not trivially empty
    weights = [torch.randn_like(t, generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(ours)]
    g_ours = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights)), params)
    g_ref = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, weights)), params)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("tile_size,chunk_size", [(4, 8), (8, 32), (16, 16)])
def test_tiling_does_not_change_the_image(tile_size, chunk_size):
    scene = random_scene(400, seed=3, dtype=torch.float32)
    viewmats, Ks = random_cameras(2, 50, 31, dtype=torch.float32)
    base = rasterization(*scene, viewmats, Ks, 50, 31, tile_size=8, chunk_size=16)
    other = rasterization(*scene, viewmats, Ks, 50, 31, tile_size=tile_size,
                          chunk_size=chunk_size)
    # a pixel stops before the splat that takes its transmittance below 1e-4; the running sum
    # is rounded per chunk, and chunks follow the tiling, so the stop can move by one splat
    assert torch.allclose(base.rgb, other.rgb, atol=1e-4)
    assert torch.allclose(base.alpha, other.alpha, atol=1e-4)


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors"])
def test_finite_difference_gradients(name):
    scene = random_scene(12, seed=5, log_scale=-1.8)
    viewmats, Ks = random_cameras(1, 14, 12, seed=2)
    index = ["means", "quats", "scales", "opacities", "colors"].index(name)
    weight = torch.rand(1, 12, 14, 5, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(7))

    def f(x):
        args = list(scene)
        args[index] = x
        out = rasterization(*args, viewmats, Ks, 14, 12, backgrounds=torch.ones(3).double())
        return (torch.cat([out.rgb, out.alpha, out.depth], -1) * weight).sum()

    assert torch.autograd.gradcheck(f, (scene[index].clone().requires_grad_(),), eps=1e-6,
                                    atol=1e-5, rtol=1e-4)


def _wall(depth, n=40, color=(0.1, 0.8, 0.3), opacity=0.99):
    """An n x n grid of flat splats covering [-1,1]^2 in the plane z = depth, facing the camera."""
    xs = torch.linspace(-1, 1, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((n * n,), depth)], -1)
    N = means.shape[0]
    spacing = 2.0 / (n - 1)
    return Splats.from_activated(
        means, torch.tensor([1.5 * spacing, 1.5 * spacing, 1e-3]).repeat(N, 1),
        torch.tensor([1.0, 0, 0, 0]).repeat(N, 1), torch.full((N,), opacity),
        torch.tensor(color).repeat(N, 1),
    )


def test_opaque_wall_depth_alpha_and_background():
    W = H = 32
    viewmat = torch.eye(4)[None]
    K = intrinsics_from_fov(torch.tensor([20.0]), W, H)  # sees |x|, |y| < 0.88 at z = 5
    cams = Cameras(viewmat, K, W, H)
    out = render(_wall(5.0), cams, background=(1.0, 0.0, 0.0))
    # gsplat's early stop (before T would drop to <= 1e-4) can leave up to 1% transmittance.
    assert out.alpha.min() > 0.99 - 1e-6
    assert torch.allclose(out.depth, torch.full_like(out.depth, 5.0), atol=1e-3)
    expected = out.alpha * torch.tensor([0.1, 0.8, 0.3]) + (1 - out.alpha) * torch.tensor([1.0, 0, 0])
    assert torch.allclose(out.rgb, expected, atol=1e-5)
    # A half-transparent single layer: rgb = alpha * colour + (1 - alpha) * background.
    thin = render(_wall(5.0, n=20, opacity=0.03), cams, background=(1.0, 0.0, 0.0))
    a = thin.alpha
    assert 0.05 < a.mean() < 0.95
    expected = a * torch.tensor([0.1, 0.8, 0.3]) + (1 - a) * torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(thin.rgb, expected, atol=1e-5)


def test_cameras_behind_and_inside_the_scene():
    wall = _wall(5.0)
    W = H = 16
    K = intrinsics_from_fov(torch.tensor([40.0]), W, H)
    # Facing away from the wall: everything is behind the camera and culled.
    away = look_at(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -1.0]]))
    out = render(wall, Cameras(away, K, W, H), background=0.5)
    assert out.alpha.max() == 0 and torch.allclose(out.rgb, torch.full_like(out.rgb, 0.5))
    # Inside a cloud of splats: renders finite values, no error.
    from cfd.scene import random_ball

    cloud = random_ball(500, radius=1.0, generator=torch.Generator().manual_seed(0))
    inside = render(cloud, Cameras(torch.eye(4)[None], K, W, H))
    assert torch.isfinite(inside.rgb).all() and inside.alpha.max() > 0


def test_empty_scene_renders_background():
    cams = Cameras(torch.eye(4)[None].repeat(2, 1, 1),
                   intrinsics_from_fov(torch.tensor([40.0, 40.0]), 6, 5), 6, 5)
    out = render(Splats.empty(), cams, background=(0.1, 0.2, 0.3))
    assert out.rgb.shape == (2, 5, 6, 3)
    assert torch.allclose(out.rgb, torch.tensor([0.1, 0.2, 0.3]).expand(2, 5, 6, 3))
    assert (out.alpha == 0).all() and (out.depth == 0).all()


def test_bad_input_errors():
    scene = random_scene(5, dtype=torch.float32)
    viewmats, Ks = random_cameras(1, 8, 8, dtype=torch.float32)
    bad = [t.clone() for t in scene]
    bad[0][2, 1] = float("nan")
    with pytest.raises(ValueError, match="means contains NaN"):
        rasterization(*bad, viewmats, Ks, 8, 8)
    with pytest.raises(ValueError, match="image size"):
        rasterization(*scene, viewmats, Ks, 0, 8)
    with pytest.raises(ValueError, match="shape"):
        rasterization(scene[0], scene[1][:3], *scene[2:], viewmats, Ks, 8, 8)
    with pytest.raises(ValueError, match="backend='torch'"):
        rasterization(*scene, viewmats, Ks, 8, 8, backend="gsplat")
    with pytest.raises(ValueError, match=r"viewmats must be \[B,4,4\].*\(4, 4\)"):
        rasterization(*scene, viewmats[0], Ks[0], 8, 8)
    with pytest.raises(ValueError, match=r"Ks must be \[B,3,3\] with B=2"):
        rasterization(*scene, viewmats.repeat(2, 1, 1), Ks, 8, 8)
    broken_pose = viewmats.clone()
    broken_pose[0, 0, 3] = math.nan
    with pytest.raises(ValueError, match="viewmats contains NaN.*camera poses"):
        rasterization(*scene, broken_pose, Ks, 8, 8)
    splats = Splats.from_activated(scene[0], scene[2], scene[1], scene[3], scene[4])
    with torch.no_grad():
        splats.params["scales"][0, 0] = math.inf
    cams = Cameras(viewmats, Ks, 8, 8)
    with pytest.raises(ValueError, match="scales contains NaN or Inf"):
        render(splats, cams)
    # an infinite stored value whose activation is finite (log-scale -inf: scale 0; opacity
    # logit inf: opacity 1) is refused where splats are made, as from a broken file
    for key, value in (("scales", -math.inf), ("opacities", math.inf)):
        fresh = Splats.from_activated(scene[0], scene[2], scene[1], scene[3], scene[4])
        params = {k: v.detach().clone() for k, v in fresh.params.items()}
        params[key].view(-1)[0] = value
        with pytest.raises(ValueError, match=rf"\['{key}'\] contain NaN or Inf"):
            Splats(params)


def test_sh_degree_must_fit_the_colours_given():
    """One contract for both backends: SH coefficients need a degree whose (degree+1)^2 bands
    they hold; RGB colours take no degree."""
    means, quats, scales, opacities, rgb = random_scene(5, dtype=torch.float32)
    viewmats, Ks = random_cameras(1, 8, 8, dtype=torch.float32)
    dc_only = rgb[:, None, :]  # [N,1,3]: degree 0 coefficients
    rasterization(means, quats, scales, opacities, dc_only, viewmats, Ks, 8, 8, sh_degree=0)
    for degree in (1, 3, None):  # more bands than given, or none named
        with pytest.raises(ValueError, match=r"1 SH coefficients.*\(sh_degree\+1\)\^2 <= K"):
            rasterization(means, quats, scales, opacities, dc_only, viewmats, Ks, 8, 8,
                          sh_degree=degree)
    with pytest.raises(ValueError, match=r"sh_degree=0 is set but colors are RGB \[N,3\]"):
        rasterization(means, quats, scales, opacities, rgb, viewmats, Ks, 8, 8, sh_degree=0)


def test_sh_colours_match_gsplat_reference():
    from gsplat.cuda._torch_impl import _spherical_harmonics

    from cfd.scene.sh import sh_to_rgb

    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(50, 16, 3, generator=g)
    means = torch.randn(50, 3, generator=g)
    centers = torch.randn(2, 3, generator=g) * 4
    for degree in range(4):
        ours = sh_to_rgb(coeffs, means, centers, degree)
        dirs = means[None] - centers[:, None]
        ref = _spherical_harmonics(degree, dirs, coeffs[None].expand(2, -1, -1, -1))
        assert torch.allclose(ours, (ref + 0.5).clamp(min=0), atol=1e-5), degree


def test_projection_matches_gsplat_reference():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    from cfd.renderers.projection import project_gaussians

    means, quats, scales, opacities, _ = random_scene(200, dtype=torch.float32)
    viewmats, Ks = random_cameras(2, 40, 30, dtype=torch.float32)
    ours = project_gaussians(means, quats, scales, opacities, viewmats, Ks, 40, 30)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, 40, 30)
    valid = (ours.radii > 0).all(-1)
    assert valid.sum() > 100
    assert torch.allclose(ours.means2d[valid], means2d[valid], atol=1e-4)
    assert torch.allclose(ours.depths[valid], depths[valid], atol=1e-5)
    assert torch.allclose(ours.conics[valid], conics[valid], rtol=1e-4, atol=1e-5)
    # Opacity-aware radii are never larger than gsplat's 3.33-sigma reference radii.
    assert (ours.radii[valid] <= radii[valid]).all()
