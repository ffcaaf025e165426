"""A deliberately simple dense renderer (every pixel x every Gaussian) used as a test oracle.

It follows gsplat's compositing rules with plain autograd, so it checks both the forward values
and the hand-written backward pass of the tile rasteriser.
"""

import torch

from cfd.renderers.projection import project_gaussians


def dense_render(means, quats, scales, opacities, rgb, viewmats, Ks, W, H, background=None):
    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, W, H)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=means.dtype) + 0.5,
                            torch.arange(W, dtype=means.dtype) + 0.5, indexing="ij")
    colors, alphas, depths = [], [], []
    for b in range(viewmats.shape[0]):
        order = torch.argsort(proj.depths[b].detach())
        order = order[(proj.radii[b] > 0).all(-1)[order]]
        m, con = proj.means2d[b][order], proj.conics[b][order]
        o, z, c = opacities[order], proj.depths[b][order], rgb[order]
        dx = m[:, 0] - xs[..., None]
        dy = m[:, 1] - ys[..., None]
        sigma = 0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) + con[:, 1] * dx * dy
        raw = o * torch.exp(-sigma)
        alpha = torch.where(raw < 0.999, raw, torch.full_like(raw, 0.999))
        alpha = alpha * (alpha >= 1 / 255)
        ones = torch.ones_like(alpha[..., :1])
        T = torch.cumprod(torch.cat([ones, 1 - alpha], -1), -1)
        alpha = alpha * (T[..., 1:] > 1e-4)
        T = torch.cumprod(torch.cat([ones, 1 - alpha], -1), -1)
        w = alpha * T[..., :-1]
        t_final = T[..., -1:]
        color = w @ c
        if background is not None:
            color = color + t_final * background
        a = 1 - t_final
        colors.append(color)
        alphas.append(a)
        depths.append((w @ z)[..., None] / a.clamp(min=1e-10))
    return torch.stack(colors), torch.stack(alphas), torch.stack(depths)
