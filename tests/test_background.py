"""Backgrounds: a learned one (an MLP of the view direction) and image backgrounds in render()."""

import pytest
import torch

from cfd.cameras import fixed_orbit_cameras
from cfd.renderers import render
from cfd.scene import HashGridConfig, NeRFConfig, NeRFField, random_ball
from cfd.scene.background import BackgroundMLPConfig, MLPBackground


def test_learned_background_starts_solid_and_learns_a_sky():
    """It starts as the colour it replaces; Adam then fits a colour that depends on the
    direction (blue above the horizon, brown below) on cameras at several elevations."""
    background = MLPBackground(BackgroundMLPConfig(), 0.3,
                               generator=torch.Generator().manual_seed(0))
    cams = [fixed_orbit_cameras(4, 8, 8, elevation, 2.5, 60.0) for elevation in (-40.0, 40.0)]
    assert all(torch.allclose(background.image(c), torch.tensor(0.3)) for c in cams)
    sky, ground = torch.tensor([0.2, 0.4, 0.9]), torch.tensor([0.5, 0.3, 0.1])

    def target(c):
        up = c.ray_directions()[..., 2:3] > 0
        return torch.where(up, sky, ground)

    optimiser = torch.optim.Adam(background.parameters(), lr=1e-2)
    for _ in range(300):
        loss = sum(((background.image(c) - target(c)) ** 2).mean() for c in cams)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for c in cams:
        assert (background.image(c) - target(c)).abs().mean() < 0.05


def test_learned_background_rejects_bad_settings():
    with pytest.raises(ValueError, match="grey level in"):
        MLPBackground(BackgroundMLPConfig(), 1.5)
    white = fixed_orbit_cameras(1, 4, 4, 0.0, 2.5, 40.0)
    assert torch.allclose(MLPBackground(BackgroundMLPConfig(), 1.0).image(white),
                          torch.tensor(0.9))
    with pytest.raises(ValueError, match="sh_degree is 0..3"):
        MLPBackground(BackgroundMLPConfig(sh_degree=4))


@pytest.mark.parametrize("scene_kind", ["splats", "nerf"])
def test_an_image_background_is_composited_behind_the_scene(scene_kind):
    """``rgb = rgb_on_black + (1 - alpha) * image`` for both scene types; a wrong shape is a
    clear error."""
    g = torch.Generator().manual_seed(0)
    cams = fixed_orbit_cameras(2, 12, 10, 20.0, 2.5, 40.0)
    if scene_kind == "splats":
        scene, options = random_ball(200, 0.5, generator=g), {"backend": "torch"}
    else:
        grid = HashGridConfig(n_levels=2, log2_hashmap_size=8, max_resolution=8)
        scene, options = NeRFField(NeRFConfig(grid=grid), generator=g), {"n_samples": 16}
    image = torch.rand(2, 10, 12, 3, generator=g)
    with torch.no_grad():
        black = render(scene, cams, background=None, **options)
        on_image = render(scene, cams, background=image, **options)
    assert 0.05 < black.alpha.mean() < 0.95
    assert torch.allclose(on_image.rgb, black.rgb + (1 - black.alpha) * image, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B,H,W,3\] image"):
        render(scene, cams, background=image[:, :, :11], **options)
