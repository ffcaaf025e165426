import itertools
import math

import numpy as np
import pytest
import torch

from cfd.cameras import (
    Cameras, fixed_orbit_cameras, intrinsics_from_fov, look_at, opengl_c2w_to_viewmats,
    orbit_cameras, sample_orbit_cameras, spherical_to_position, viewmats_to_opengl_c2w,
)


def test_look_at_is_opencv_world_to_camera():
    eye = torch.tensor([[3.0, 0.0, 0.0]])
    vm = look_at(eye, torch.zeros(1, 3))
    R = vm[0, :3, :3]
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6)
    assert torch.det(R) == pytest.approx(1.0, abs=1e-6)
    # The target lies straight ahead (+z) at distance 3; world up (+z) maps to camera -y (up).
    target_cam = vm[0] @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(target_cam[:3], torch.tensor([0.0, 0.0, 3.0]), atol=1e-6)
    up_cam = R @ torch.tensor([0.0, 0.0, 1.0])
    assert up_cam[1] < -0.99
    cams = Cameras(vm, intrinsics_from_fov(torch.tensor([40.0]), 8, 8), 8, 8)
    assert torch.allclose(cams.centers, eye, atol=1e-6)


def test_look_at_straight_down_stays_finite():
    vm = look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.zeros(1, 3))
    assert torch.isfinite(vm).all()
    assert torch.allclose(vm[0, :3, :3] @ torch.tensor([0.0, 0.0, -1.0]),
                          torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_opengl_round_trip_and_axes():
    cams = sample_orbit_cameras(6, 16, 16, generator=torch.Generator().manual_seed(0))
    c2w_gl = viewmats_to_opengl_c2w(cams.viewmats)
    assert torch.allclose(opengl_c2w_to_viewmats(c2w_gl), cams.viewmats, atol=1e-5)
    # OpenGL cameras look along their -z column, which is OpenCV's +z (towards the origin).
    to_origin = torch.nn.functional.normalize(-c2w_gl[:, :3, 3], dim=-1)
    assert torch.allclose(-c2w_gl[:, :3, 2], to_origin, atol=1e-5)
    # Same camera centre in both conventions.
    assert torch.allclose(c2w_gl[:, :3, 3], cams.centers, atol=1e-5)


def test_orbit_sampling_ranges_and_seed():
    kw = dict(elevation_range=(5.0, 30.0), azimuth_range=(-45.0, 45.0),
              distance_range=(2.0, 2.5), fov_range=(30.0, 50.0))
    a = sample_orbit_cameras(512, 32, 24, generator=torch.Generator().manual_seed(3), **kw)
    b = sample_orbit_cameras(512, 32, 24, generator=torch.Generator().manual_seed(3), **kw)
    c = sample_orbit_cameras(512, 32, 24, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.viewmats, b.viewmats) and not torch.equal(a.viewmats, c.viewmats)
    assert a.elevation.min() >= 5.0 and a.elevation.max() <= 30.0
    assert a.azimuth.min() >= -45.0 and a.azimuth.max() <= 45.0
    assert a.distance.min() >= 2.0 and a.distance.max() <= 2.5
    # The ranges are covered, not just respected.
    assert a.elevation.max() - a.elevation.min() > 20.0
    # Recorded angles describe the actual camera positions.
    expected = spherical_to_position(a.elevation, a.azimuth, a.distance)
    assert torch.allclose(a.centers, expected, atol=1e-4)
    fov = 2 * torch.rad2deg(torch.atan(0.5 * 24 / a.Ks[:, 1, 1]))
    assert fov.min() >= 30.0 - 1e-3 and fov.max() <= 50.0 + 1e-3


def test_batch_uniform_azimuth_puts_one_camera_in_each_slice():
    seen = torch.zeros(4, 2)
    for seed in range(200):
        plain, cams = (sample_orbit_cameras(4, 8, 8, generator=torch.Generator().manual_seed(seed),
                                            batch_uniform_azimuth=uniform) for uniform in (False, True))
        stratum = torch.floor((cams.azimuth + 180.0) / 90.0)
        assert torch.equal(stratum, torch.arange(4.0))
        # Only the azimuths change: the other draws are the same as without the option.
        assert torch.equal(cams.elevation, plain.elevation) and torch.equal(cams.distance, plain.distance)
        # Each camera still covers its whole slice over seeds.
        offset = (cams.azimuth + 180.0) - 90.0 * stratum
        seen[:, 0] = torch.maximum(seen[:, 0], offset)
        seen[:, 1] = torch.maximum(seen[:, 1], 90.0 - offset)
    assert (seen > 80.0).all()


def test_fixed_orbit_is_evenly_spaced():
    cams = fixed_orbit_cameras(8, 16, 16, elevation_deg=20.0, distance=3.0)
    assert torch.allclose(torch.diff(cams.azimuth), torch.full((7,), 45.0))
    assert torch.allclose(cams.centers.norm(dim=-1), torch.full((8,), 3.0), atol=1e-5)
    assert torch.allclose(cams.centers[:, 2], torch.full((8,), 3.0 * math.sin(math.radians(20))),
                          atol=1e-5)


def test_ray_directions_hit_projected_points():
    cams = orbit_cameras(torch.tensor([10.0]), torch.tensor([30.0]), torch.tensor([3.0]),
                         torch.tensor([40.0]), 20, 10)
    dirs = cams.ray_directions()  # [1,H,W,3]
    point = cams.centers[0] + 2.5 * dirs[0, 3, 7]
    cam = cams.viewmats[0] @ torch.cat([point, torch.ones(1)])
    uv = (cams.Ks[0] @ cam[:3]) / cam[2]
    assert torch.allclose(uv[:2], torch.tensor([7.5, 3.5]), atol=1e-4)
    assert cam[2] == pytest.approx(2.5, abs=1e-5)


def test_camera_validation_errors():
    vm = torch.eye(4)[None]
    K = intrinsics_from_fov(torch.tensor([40.0]), 8, 8)
    with pytest.raises(ValueError, match="image size"):
        Cameras(vm, K, 0, 8)
    with pytest.raises(ValueError, match="NaN"):
        Cameras(vm * float("nan"), K, 8, 8)
    with pytest.raises(ValueError, match=r"\[B,3,3\]"):
        Cameras(vm, K[0], 8, 8)
    with pytest.raises(ValueError, match="whole pixels"):
        Cameras(vm, K, 8.5, 8)
    for axis, value in ((0, 0.0), (1, -K[0, 1, 1].item())):  # fx = 0; fy < 0 (a mirror)
        bad = K.clone()
        bad[0, axis, axis] = value
        with pytest.raises(ValueError, match="focal lengths fx, fy must be > 0"):
            Cameras(vm, bad, 8, 8)
    with pytest.raises(ValueError, match="n_views >= 1.*eval_views and video_frames"):
        fixed_orbit_cameras(0, 8, 8)
    with pytest.raises(ValueError, match="low <= high"):
        sample_orbit_cameras(2, 8, 8, elevation_range=(30.0, 10.0))


def test_int_indexing_checks_the_range_and_iteration_ends():
    cams = fixed_orbit_cameras(5, 8, 8)
    for index in (5, -6):
        with pytest.raises(IndexError, match="out of range for a batch of 5"):
            cams[index]
    # Iteration runs through __getitem__; an out-of-range index must end it (islice bounds the
    # loop, which never ended when such an index gave an empty batch).
    views = list(itertools.islice(iter(cams), 7))
    assert [len(v) for v in views] == [1] * 5
    assert torch.equal(torch.cat([v.azimuth for v in views]), cams.azimuth)
    for index in (np.int64(3), torch.tensor(3), -2):
        one = cams[index]
        assert len(one) == 1 and torch.equal(one.viewmats, cams.viewmats[3:4])
    assert torch.equal(cams[torch.tensor([True, False, True, False, False])].azimuth,
                       cams.azimuth[[0, 2]])


def test_orbit_cameras_match_look_at_and_do_not_roll_over_the_poles():
    el = torch.tensor([0.0, 30.0, -10.0, 45.0, 89.0, -89.0, 60.0])
    az = torch.tensor([0.0, 90.0, -135.0, 170.0, 20.0, -60.0, -180.0])
    d = torch.tensor([3.0, 2.5, 3.2, 4.0, 3.0, 3.0, 2.0])
    cams = orbit_cameras(el, az, d, torch.full((7,), 40.0), 8, 8)
    # Away from the poles: the OpenCV look_at camera with world up +z (right = forward x up).
    expected = look_at(spherical_to_position(el, az, d), torch.zeros(7, 3))
    assert torch.allclose(cams.viewmats, expected, atol=1e-5)
    # At a pole the camera keeps the roll it has just below it, for every azimuth.
    az = torch.tensor([0.0, 45.0, 90.0, -120.0])
    for pole in (90.0, -90.0):
        near = pole - math.copysign(1e-4, pole)
        at, below = (orbit_cameras(torch.full((4,), e), az, torch.full((4,), 3.0),
                                   torch.full((4,), 40.0), 8, 8).viewmats for e in (pole, near))
        assert torch.isfinite(at).all()
        assert torch.allclose(at, below, atol=1e-5), pole


def test_orbit_arguments_are_checked():
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    with pytest.raises(ValueError, match=r"distance must be > 0.*-3\.0"):
        orbit_cameras(one(0), one(0), one(-3), one(40), 8, 8)
    with pytest.raises(ValueError, match=r"distance must be > 0"):
        fixed_orbit_cameras(4, 8, 8, distance=0.0)
    with pytest.raises(ValueError, match=r"elevation_deg must be within \[-90, 90\].*100\.0"):
        orbit_cameras(one(100), one(0), one(3), one(40), 8, 8)
    with pytest.raises(ValueError, match=r"elevation_deg must be within"):
        fixed_orbit_cameras(4, 8, 8, elevation_deg=-95.0)
    with pytest.raises(ValueError, match=r"elevation_range must lie within \[-90, 90\]"):
        sample_orbit_cameras(2, 8, 8, elevation_range=(80.0, 100.0))
    assert torch.isfinite(orbit_cameras(one(-90), one(0), one(3), one(40), 8, 8).viewmats).all()


def test_look_at_stays_finite_when_up_lies_along_the_view():
    for eye, up in (([0.0, 3.0, 0.0], [0.0, 1.0, 0.0]), ([0.0, 0.0, -2.0], None),
                    ([1.0, 0.0, 0.0], [-1.0, 0.0, 0.0])):
        vm = look_at(torch.tensor([eye]), torch.zeros(1, 3),
                     None if up is None else torch.tensor(up))
        assert torch.isfinite(vm).all(), (eye, up)
        R = vm[0, :3, :3]
        assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6)
        assert torch.det(R) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(vm[0] @ torch.tensor([0.0, 0.0, 0.0, 1.0]),
                              torch.tensor([0.0, 0.0, torch.tensor(eye).norm().item(), 1.0]),
                              atol=1e-6)


def test_field_of_view_is_checked():
    for fov in (0.0, 180.0, 200.0, -10.0, float("nan")):
        with pytest.raises(ValueError, match=r"fov_y_deg must be a field of view strictly "
                                             r"between 0 and 180"):
            intrinsics_from_fov(torch.tensor([40.0, fov]), 8, 8)
    for fov in (0.0, 180.0, 200.0, -10.0):
        with pytest.raises(ValueError, match=r"fov_range must be a field of view"):
            sample_orbit_cameras(2, 8, 8, fov_range=(min(fov, 40.0), max(fov, 40.0)))
    assert torch.isfinite(intrinsics_from_fov(torch.tensor([1e-3, 179.9]), 8, 8)).all()


def test_cameras_without_angles_derive_them_from_their_centres():
    """Cameras built from poses alone (look_at, OpenGL c2w) carry the elevation, azimuth and
    distance an orbit camera at the same place records, azimuth in [-180, 180) as sampled."""
    sampled = sample_orbit_cameras(256, 8, 8, elevation_range=(-80.0, 80.0),
                                   generator=torch.Generator().manual_seed(0))
    fixed = fixed_orbit_cameras(8, 8, 8, elevation_deg=-30.0)  # its first azimuth is -180
    for cams in (sampled, fixed):
        bare = Cameras(opengl_c2w_to_viewmats(viewmats_to_opengl_c2w(cams.viewmats)), cams.Ks,
                       8, 8)
        assert torch.allclose(bare.elevation, cams.elevation, atol=1e-4)
        assert torch.allclose(bare.distance, cams.distance, atol=1e-5)
        assert (bare.azimuth >= -180.0).all() and (bare.azimuth < 180.0).all()
        # -180 and +179.99999 are the same direction: compare around the circle.
        turn = torch.remainder(bare.azimuth - cams.azimuth + 180.0, 360.0) - 180.0
        assert turn.abs().max() < 1e-4
    eye = torch.tensor([[0.0, 2.0, 2.0], [-3.0, 0.0, 0.0]])
    built = Cameras(look_at(eye, torch.zeros(2, 3)),
                    intrinsics_from_fov(torch.tensor([40.0, 40.0]), 8, 8), 8, 8)
    assert torch.allclose(built.elevation, torch.tensor([45.0, 0.0]))
    assert torch.allclose(built.azimuth.abs(), torch.tensor([90.0, 180.0]))
    # Given angles are kept, and indexing and moving keep them.
    assert torch.equal(sampled[3:5].azimuth, sampled.azimuth[3:5])
    assert torch.equal(sampled.to("cpu").elevation, sampled.elevation)
