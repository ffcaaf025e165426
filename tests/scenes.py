"""Small seeded scenes and cameras shared by the tests."""

import torch

from cfd.cameras import sample_orbit_cameras


def random_scene(n=200, seed=0, dtype=torch.float64, log_scale=-2.5):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.5
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.5 + log_scale)
    opacities = torch.sigmoid(torch.randn(n, generator=g))
    colors = torch.rand(n, 3, generator=g)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors)]


def random_cameras(b=2, width=37, height=29, seed=1, dtype=torch.float64):
    cams = sample_orbit_cameras(b, width, height, generator=torch.Generator().manual_seed(seed))
    return cams.viewmats.to(dtype), cams.Ks.to(dtype)
