"""Splat scenes: construction, .ply round trips in the standard layout, densification."""

import numpy as np
import pytest
import torch

from cfd.scene import Densifier, DensifyConfig, Splats, from_point_cloud, random_ball
from cfd.scene.ply import ply_property_names


def _scene(degree=0, n=50):
    g = torch.Generator().manual_seed(0)
    s = random_ball(n, sh_degree=degree, generator=g)
    with torch.no_grad():
        for v in s.params.values():
            v.add_(torch.randn(v.shape, generator=g) * 0.1)
    return s


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_ply_round_trip(tmp_path, degree):
    s = _scene(degree)
    s.save_ply(tmp_path / "s.ply")
    t = Splats.load_ply(tmp_path / "s.ply")
    assert t.sh_degree == degree
    for k in s.params:
        assert torch.equal(s.params[k], t.params[k]), k


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_empty_scene_ply_round_trip(tmp_path, degree):
    Splats.empty(degree).save_ply(tmp_path / "empty.ply")
    t = Splats.load_ply(tmp_path / "empty.ply")
    assert len(t) == 0 and t.sh_degree == degree
    assert t.params["shN"].shape == (0, (degree + 1) ** 2 - 1, 3)


def test_ply_uses_the_standard_3dgs_layout(tmp_path):
    from plyfile import PlyData

    s = _scene(degree=1, n=7)
    s.save_ply(tmp_path / "s.ply")
    vertex = PlyData.read(str(tmp_path / "s.ply"))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [
        f"f_rest_{i}" for i in range(9)] + ["opacity", "scale_0", "scale_1", "scale_2",
                                            "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == ply_property_names(1)
    assert all(p.val_dtype == "f4" for p in vertex.properties)  # "property float ..."
    # Pre-activation values; f_rest is channel-major (all red coefficients first).
    assert np.allclose(vertex["scale_1"], s.params["scales"][:, 1].detach().numpy())
    assert np.allclose(vertex["opacity"], s.params["opacities"].detach().numpy())
    assert np.allclose(vertex["f_rest_4"], s.params["shN"][:, 1, 1].detach().numpy())
    assert np.allclose(vertex["rot_0"], s.params["quats"][:, 0].detach().numpy())


def test_ply_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Splats.load_ply(tmp_path / "missing.ply")
    (tmp_path / "junk.ply").write_text("not a ply")
    with pytest.raises(ValueError, match="not a readable"):
        Splats.load_ply(tmp_path / "junk.ply")


def test_from_activated_round_trips_activations():
    g = torch.Generator().manual_seed(1)
    means, colors = torch.randn(10, 3, generator=g), torch.rand(10, 3, generator=g)
    scales = torch.rand(10, 3, generator=g) + 0.01
    quats = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=-1)
    opac = torch.rand(10, generator=g) * 0.9 + 0.05
    s = Splats.from_activated(means, scales, quats, opac, colors)
    assert torch.allclose(s.scales, scales, atol=1e-6)
    assert torch.allclose(s.opacities, opac, atol=1e-6)
    assert torch.allclose(s.quats, quats, atol=1e-6)
    assert torch.allclose(s.base_colors, colors, atol=1e-6)
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        Splats.from_activated(means, -scales, quats, opac, colors)
    nan_scales = scales.clone()
    nan_scales[3, 1] = float("nan")
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        Splats.from_activated(means, nan_scales, quats, opac, colors)
    with pytest.raises(ValueError, match=r"colors must be \[N,3\] RGB with N=10, got \(10, 4\)"):
        Splats.from_activated(means, scales, quats, opac, torch.rand(10, 4))
    with pytest.raises(ValueError, match="quats must be non-zero"):
        Splats.from_activated(means, scales, quats * (torch.arange(10) != 2)[:, None], opac,
                              colors)


def test_point_cloud_initialiser_scales_by_neighbour_distance():
    grid = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    s = from_point_cloud(grid * 0.1)
    assert len(s) == 64
    assert torch.allclose(s.scales[:, 0].median(), torch.tensor(0.1), atol=1e-5)


def test_one_optimizer_per_parameter_accepted_by_gsplat_strategy():
    s = _scene()
    opts = s.make_optimizers({"means": 1e-3})
    assert set(opts) == set(s.params)
    Densifier(DensifyConfig(), 1.0).check(s, opts)
    with pytest.raises(ValueError, match="unknown parameters"):
        s.make_optimizers({"colour": 1.0})


def _densify_step(s, opts, densifier, step, grad_scale):
    from cfd.cameras import fixed_orbit_cameras
    from cfd.renderers import render

    out = render(s, fixed_orbit_cameras(2, 32, 32))
    densifier.before_backward(s, opts, step, out.info)
    (out.rgb.sum() * grad_scale).backward()
    densifier.after_backward(s, opts, step, out.info)
    for o in opts.values():
        o.zero_grad(set_to_none=True)


def test_opacity_reset_fires_on_schedule():
    """gsplat 1.5.3's own reset never fires (operator precedence); ours must."""
    s = random_ball(200, opacity=0.9, generator=torch.Generator().manual_seed(0))
    opts = s.make_optimizers({k: 1e-3 for k in s.params})
    cfg = DensifyConfig(refine_start_iter=1000, reset_every=5, refine_stop_iter=100)
    d = Densifier(cfg, 1.0)
    for step in range(5):
        _densify_step(s, opts, d, step, 1.0)
    assert s.opacities.min() > 0.89
    _densify_step(s, opts, d, 5, 1.0)
    assert torch.allclose(s.opacities.max(), torch.tensor(cfg.prune_opa * 2.0), atol=1e-6)
    assert all((st == 0).all() for st in opts["opacities"].state[s.params["opacities"]].values()
               if torch.is_tensor(st) and st.ndim > 0)


def test_densification_grows_and_prunes():
    s = random_ball(300, opacity=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s.params["opacities"][:50] = -10.0  # transparent: pruned
    opts = s.make_optimizers({k: 1e-3 for k in s.params})
    cfg = DensifyConfig(refine_start_iter=1, refine_every=2, grow_grad2d=1e-9,
                        reset_every=10_000, refine_stop_iter=100)
    d = Densifier(cfg, 1.0)
    for step in range(3):
        _densify_step(s, opts, d, step, 100.0)
    assert len(s) > 300  # grown by clones and splits
    assert s.opacities.min() > 0.005  # the transparent ones are gone
    assert all(o.param_groups[0]["params"][0] is s.params[k] for k, o in opts.items())


def test_densification_that_prunes_every_splat_stops_with_the_settings_to_change():
    from core.runtime import TrainingStopped

    s = random_ball(40, opacity=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s.params["opacities"][:] = -10.0  # all below prune_opa
    opts = s.make_optimizers({k: 1e-3 for k in s.params})
    cfg = DensifyConfig(refine_start_iter=0, refine_every=1, reset_every=10_000,
                        refine_stop_iter=100)
    d = Densifier(cfg, 1.0)
    with pytest.raises(TrainingStopped, match="pruned every splat.*densify.prune_opa=0.005"):
        for step in range(3):
            _densify_step(s, opts, d, step, 1.0)
    assert len(s) == 0


def test_extra_ply_properties_round_trip_and_leave_the_splats_readable(tmp_path):
    from cfd.scene.ply import read_ply_property

    s = _scene()
    visibility = torch.linspace(0, 1, len(s))
    s.save_ply(tmp_path / "s.ply", {"visibility": visibility})
    assert torch.equal(read_ply_property(tmp_path / "s.ply", "visibility"), visibility)
    t = Splats.load_ply(tmp_path / "s.ply")
    assert torch.equal(t.means, s.means.detach())
    with pytest.raises(ValueError, match="no per-splat 'age' property"):
        read_ply_property(tmp_path / "s.ply", "age")
    with pytest.raises(ValueError, match="one value per splat"):
        s.save_ply(tmp_path / "bad.ply", {"visibility": visibility[:-1]})
    with pytest.raises(ValueError, match="must be a new name"):
        s.save_ply(tmp_path / "bad.ply", {"opacity": visibility})


def test_a_scaled_scene_seen_from_proportionally_farther_looks_the_same():
    from cfd.cameras import fixed_orbit_cameras
    from cfd.renderers import render

    s = _scene(degree=1)
    near = render(s, fixed_orbit_cameras(3, 24, 24, 20.0, 2.0, 40.0), "torch", 0.3)
    far = render(s.scaled(2.5), fixed_orbit_cameras(3, 24, 24, 20.0, 5.0, 40.0), "torch", 0.3)
    assert torch.allclose(near.rgb, far.rgb, atol=1e-5)
    assert torch.allclose(near.depth * 2.5, far.depth, atol=1e-4)
    with pytest.raises(ValueError, match="must be > 0"):
        s.scaled(0.0)


def test_a_turned_scene_seen_from_a_turned_camera_looks_the_same():
    from cfd.cameras import orbit_cameras
    from cfd.renderers import render

    s = _scene()
    with torch.no_grad():  # anisotropic, randomly oriented splats: the quaternions must turn
        s.params["scales"].add_(torch.randn(len(s), 3, generator=torch.Generator().manual_seed(1)))

    def camera(azimuth):
        one = lambda v: torch.tensor([float(v)])  # noqa: E731
        return orbit_cameras(one(20.0), one(azimuth), one(2.5), one(40.0), 24, 24)

    want = render(s, camera(30.0), "torch", 0.3).rgb
    assert torch.allclose(render(s.turned(70.0), camera(100.0), "torch", 0.3).rgb, want,
                          atol=1e-5)
    assert not torch.allclose(render(s, camera(100.0), "torch", 0.3).rgb, want, atol=1e-3)
    with pytest.raises(ValueError, match="SH degree 1"):
        _scene(degree=1).turned(10.0)


def test_merge_in_cells_keeps_one_splat_per_occupied_cube():
    """Two splats sharing a cube become one at their opacity-weighted centre and colour,
    covering what both covered; a splat alone in its cube keeps its centre and colour."""
    from cfd.scene import group_mean, merge_in_cells

    means = torch.tensor([[0.01, 0.01, 0.01], [0.03, 0.01, 0.01], [0.51, 0.0, 0.0]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    opacity = torch.tensor([0.2, 0.6, 0.5])
    splats = Splats.from_activated(means, torch.full((3, 3), 0.01),
                                   torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1), opacity, colors)
    merged, group = merge_in_cells(splats, 0.1)
    merged = merged.requires_grad_(False)
    assert len(merged) == 2 and group[0] == group[1] != group[2]
    pair, alone = int(group[0]), int(group[2])
    assert torch.allclose(merged.means[pair], torch.tensor([0.025, 0.01, 0.01]), atol=1e-6)
    assert torch.allclose(merged.base_colors[pair], torch.tensor([0.25, 0.0, 0.75]), atol=1e-5)
    assert merged.opacities[pair] == pytest.approx(1 - 0.8 * 0.4, abs=1e-5)
    # the pair's spread along x (std 0.00866 at weights 1:3) widens it there only
    assert merged.scales[pair, 0] == pytest.approx(0.01 + 0.0075 ** 0.5 * 0.1, abs=1e-5)
    assert merged.scales[pair, 1] == pytest.approx(0.01, abs=1e-6)
    assert torch.allclose(merged.means[alone], means[2]) and \
        torch.allclose(merged.base_colors[alone], colors[2], atol=1e-5)
    visibility = group_mean(torch.tensor([1.0, 0.0, 0.5]), opacity, group, len(merged))
    assert visibility[pair] == pytest.approx(0.25) and visibility[alone] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cell size must be > 0"):
        merge_in_cells(splats, 0.0)
