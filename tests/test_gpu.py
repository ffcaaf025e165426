"""torch backend against gsplat's CUDA rasteriser on the same scenes (needs CUDA)."""

import pytest
import torch

from cfd.renderers import rasterization

from .scenes import random_cameras, random_scene

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_backend_matches_gsplat(seed):
    dev = torch.device("cuda")
    scene = [t.to(dev).requires_grad_() for t in random_scene(2000, seed, dtype=torch.float32)]
    viewmats, Ks = (t.to(dev) for t in random_cameras(3, 96, 64, seed, dtype=torch.float32))
    bg = torch.tensor([0.3, 0.6, 0.9], device=dev)
    outs = {}
    for backend in ("torch", "gsplat"):
        out = rasterization(*scene, viewmats, Ks, 96, 64, backgrounds=bg, backend=backend)
        w = torch.linspace(0, 1, out.rgb.numel(), device=dev).reshape(out.rgb.shape)
        loss = (out.rgb * w).sum() + out.alpha.sum() + 0.1 * out.depth.sum()
        outs[backend] = (out, torch.autograd.grad(loss, scene))
    (a, ga), (b, gb) = outs["torch"], outs["gsplat"]
    assert torch.allclose(a.rgb, b.rgb, atol=1e-4)
    assert torch.allclose(a.alpha, b.alpha, atol=1e-4)
    assert torch.allclose(a.depth, b.depth, atol=1e-3)
    for x, y in zip(ga, gb):
        scale = y.abs().max().clamp(min=1e-6)
        assert ((x - y).abs().max() / scale) < 1e-3
