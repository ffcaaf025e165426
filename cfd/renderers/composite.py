"""Front-to-back alpha compositing of binned 2D Gaussians, with a hand-written backward pass.

The rules are gsplat's, so both backends agree to float precision:

* pixel centres at ``(x + 0.5, y + 0.5)``;
* ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``; ``alpha = min(0.999, o exp(-sigma))``;
* a pair with ``alpha < 1/255`` is skipped (gsplat also skips ``sigma < 0``, which for its
  positive-definite conics happens only by rounding at the very centre; we keep those pairs);
* a pixel stops *before* the Gaussian that would bring its transmittance to ``<= 1e-4``;
* the clamp at 0.999 stops gradients to opacity and conic, as gsplat's backward does.

Work proceeds over blocks of chunks (see ``tiles.py``) sized to stay in cache; the backward pass
recomputes each block's alphas instead of storing them, so memory holds only a few floats per
(chunk, pixel) besides the intersection lists. Transmittance is carried across the chunks of a
tile in log space (``log(1 - alpha)`` sums), with float64 running sums between chunks.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .projection import ALPHA_THRESHOLD
from .tiles import TileBins

ALPHA_MAX = 0.999
LOG_T_STOP = math.log(1e-4)
# Below this a chunk's log-transmittance is clamped; every later Gaussian is past the stop anyway.
LOG_T_FLOOR = -30.0
# Target number of (chunk, pixel, slot) elements per block: about 1 MB of float32.
BLOCK_ELEMENTS = 1 << 18


def _pixel_monomials(tile_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Monomials (1, x, y, x^2, xy, y^2) of the pixel centres in a tile, row-major, relative to
    its corner. ``[P, 6]``."""
    r = torch.arange(tile_size, device=device, dtype=dtype) + 0.5
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    x, y = xs.reshape(-1), ys.reshape(-1)
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y], dim=-1)


def _local_means(params: Tensor, origin: Tensor) -> Tuple[Tensor, Tensor]:
    """Gaussian centres relative to their tile's corner, ``[cb, K]`` each."""
    return params[..., 0] - origin[:, 0:1], params[..., 1] - origin[:, 1:2]


def _block_alphas(params: Tensor, origin: Tensor, monomials: Tensor):
    """Per-pair quantities of one block of chunks.

    sigma is a quadratic in the pixel coordinates, so all P x K values come from one matmul of
    the pixel monomials with six per-Gaussian coefficients (no per-pair subtractions).

    Args:
        params: gathered (mean x, mean y, a, b, c, opacity) ``[cb, K, 6]``.
        origin: tile corners ``[cb, 2]``; monomials ``[P, 6]``.
    Returns:
        expo = exp(-sigma), alpha (skipped pairs at 0) and the mask of pairs whose alpha is
        differentiable (kept and not clamped at 0.999, as float 0/1), each ``[cb, P, K]``.
    """
    mx, my = _local_means(params, origin)
    a, b, c, o = params[..., 2], params[..., 3], params[..., 4], params[..., 5]
    neg_sigma_coef = torch.stack(
        [
            -(0.5 * a * mx * mx + b * mx * my + 0.5 * c * my * my),
            a * mx + b * my,
            b * mx + c * my,
            -0.5 * a,
            -b,
            -0.5 * c,
        ],
        dim=1,
    )  # [cb, 6, K]
    expo = torch.matmul(monomials, neg_sigma_coef).exp_()
    raw = expo * o[:, None, :]
    differentiable = _step(raw, ALPHA_THRESHOLD).mul_(_step(-raw, -ALPHA_MAX))
    alpha = torch.threshold(raw.clamp_(max=ALPHA_MAX), ALPHA_THRESHOLD, 0.0)
    return expo, alpha, differentiable


def _step(x: Tensor, edge: float) -> Tensor:
    """1.0 where ``x > edge``, else 0.0, as float.

    Written with arithmetic because on CPU a comparison to bool followed by a conversion or
    ``torch.where`` costs several times a float multiply.
    """
    return (x - edge).mul_(1e30).clamp_(0.0, 1.0)


def _blocks(n_chunks: int, per_chunk: int):
    size = max(1, BLOCK_ELEMENTS // max(per_chunk, 1))
    return [(s, min(s + size, n_chunks)) for s in range(0, n_chunks, size)]


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params: Tensor, features: Tensor, bins: TileBins) -> Tuple[Tensor, Tensor]:
        n_tiles, n_chunks = bins.n_tiles, bins.gaussian_ids.shape[0]
        K, D = bins.gaussian_ids.shape[1], features.shape[-1]
        monomials = _pixel_monomials(bins.tile_size, params.device, params.dtype)
        P = monomials.shape[0]
        feat_tiles = params.new_zeros(n_tiles, P, D)
        log_t_tiles = params.new_zeros(n_tiles, P)
        log_t_in = params.new_zeros(n_chunks, P)
        prefix = torch.zeros(n_chunks, P, dtype=torch.float64, device=params.device)
        carry = torch.zeros(P, dtype=torch.float64, device=params.device)
        for c0, c1 in _blocks(n_chunks, P * K):
            ids = bins.gaussian_ids[c0:c1]
            _, alpha, _ = _block_alphas(params[ids], bins.chunk_origin[c0:c1], monomials)
            log1m = torch.log1p(alpha.neg())
            csum = torch.cumsum(log1m, dim=2)
            total = csum[:, :, -1].double().clamp_(min=LOG_T_FLOOR)
            block_prefix = carry + torch.cumsum(total, 0) - total
            prefix[c0:c1] = block_prefix
            carry = block_prefix[-1] + total[-1]
            t_in = (block_prefix - prefix[bins.chunk_first[c0:c1]]).to(params.dtype)
            log_t_in[c0:c1] = t_in
            log_t_after = csum.add_(t_in[:, :, None])
            live = _step(log_t_after, LOG_T_STOP)
            weights = (log_t_after - log1m).exp_().mul_(alpha).mul_(live)
            tiles = bins.chunk_tile[c0:c1]
            feat_tiles.index_add_(0, tiles, torch.bmm(weights, features[ids]))
            log_t_tiles.index_add_(0, tiles, log1m.mul_(live).sum(dim=2))
        transmittance = torch.exp(log_t_tiles)
        ctx.bins = bins
        ctx.save_for_backward(params, features, log_t_in, transmittance)
        return feat_tiles, transmittance

    @staticmethod
    def backward(ctx, grad_feat: Tensor, grad_t: Tensor):
        params, features, log_t_in, transmittance = ctx.saved_tensors
        bins: TileBins = ctx.bins
        n_chunks, K = bins.gaussian_ids.shape
        monomials = _pixel_monomials(bins.tile_size, params.device, params.dtype)
        P = monomials.shape[0]
        grad_params = torch.zeros_like(params)
        grad_features = torch.zeros_like(features)
        # Background term of every suffix sum: d/d alpha of T_final * dL/dT_final.
        t_term = transmittance * grad_t
        # suffix[c] = sum over chunks c' >= c (global order) of each chunk's weighted dot products.
        suffix = torch.zeros(n_chunks + 1, P, dtype=torch.float64, device=params.device)
        for c0, c1 in reversed(_blocks(n_chunks, P * K)):
            ids = bins.gaussian_ids[c0:c1]
            tiles = bins.chunk_tile[c0:c1]
            gathered = params[ids]
            feats = features[ids]
            expo, alpha, differentiable = _block_alphas(gathered, bins.chunk_origin[c0:c1], monomials)
            one_minus = 1.0 - alpha
            log1m = torch.log1p(alpha.neg())
            log_t_after = torch.cumsum(log1m, dim=2).add_(log_t_in[c0:c1, :, None])
            live = _step(log_t_after, LOG_T_STOP)
            t_before = log_t_after.sub_(log1m).exp_().mul_(live)
            weights = alpha.mul_(t_before)
            g_pix = grad_feat[tiles]  # [cb,P,D]
            dots = torch.bmm(g_pix, feats.transpose(1, 2))  # [cb,P,K]
            wdots = weights * dots
            csum = torch.cumsum(wdots, dim=2)
            total = csum[:, :, -1].clone()
            rev = torch.flip(torch.cumsum(torch.flip(total.double(), [0]), 0), [0])
            suffix[c0:c1] = rev + suffix[c1]
            after = (suffix[c0 + 1 : c1 + 1] - suffix[bins.chunk_last[c0:c1] + 1]).to(params.dtype)
            # Everything composited behind each pair: later pairs of the chunk, later chunks of
            # the tile, and the background through the final transmittance.
            later = csum.neg_().add_((total + after + t_term[tiles])[:, :, None])
            d_alpha = dots.mul_(t_before).sub_(later.div_(one_minus))
            q = d_alpha.mul_(expo).mul_(live).mul_(differentiable)  # dL/d(opacity) per pair
            moments = torch.matmul(monomials.T, q)  # [cb, 6, K]
            m0, m1, m2, m3, m4, m5 = moments.unbind(1)
            mx, my = _local_means(gathered, bins.chunk_origin[c0:c1])
            a, b, c, o = (gathered[..., i] for i in (2, 3, 4, 5))
            # Sums over pixels of q times dx, dy, dx^2, dx dy, dy^2 (dx = mean - pixel).
            s_x, s_y = mx * m0 - m1, my * m0 - m2
            s_xx = mx * mx * m0 - 2 * mx * m1 + m3
            s_xy = mx * my * m0 - mx * m2 - my * m1 + m4
            s_yy = my * my * m0 - 2 * my * m2 + m5
            block_grad = torch.stack(
                [
                    -o * (a * s_x + b * s_y),
                    -o * (b * s_x + c * s_y),
                    -0.5 * o * s_xx,
                    -o * s_xy,
                    -0.5 * o * s_yy,
                    m0,
                ],
                dim=-1,
            )
            flat_ids = ids.reshape(-1)
            grad_params.index_add_(0, flat_ids, block_grad.reshape(-1, 6))
            grad_features.index_add_(
                0, flat_ids, torch.bmm(weights.transpose(1, 2), g_pix).reshape(-1, feats.shape[-1])
            )
        return grad_params, grad_features, None


def composite(
    means2d: Tensor, conics: Tensor, opacities: Tensor, features: Tensor, bins: TileBins
) -> Tuple[Tensor, Tensor]:
    """Composite binned Gaussians into tiles.

    Args:
        means2d ``[G,2]``, conics ``[G,3]``, opacities ``[G]``, features ``[G,D]`` with
        ``G = bins.n_gaussians`` (flattened over images).
    Returns:
        accumulated features ``sum_i w_i f_i`` ``[n_tiles, P, D]`` and final transmittance
        ``[n_tiles, P]``, where ``P = tile_size^2`` pixels in row-major order within a tile.
    """
    params = torch.cat([means2d, conics, opacities[:, None]], dim=-1)
    # Row G is the transparent dummy that pads the last chunk of each tile.
    params = torch.cat([params, params.new_zeros(1, 6)], dim=0)
    features = torch.cat([features, features.new_zeros(1, features.shape[-1])], dim=0)
    return _Composite.apply(params, features, bins)


def tiles_to_images(tiles: Tensor, bins: TileBins, width: int, height: int) -> Tensor:
    """``[n_tiles, P, ...]`` in tile order -> ``[B, H, W, ...]`` (cropping the partial tiles)."""
    ts = bins.tile_size
    rest = tiles.shape[2:]
    x = tiles.reshape((bins.n_images, bins.tiles_y, bins.tiles_x, ts, ts) + rest)
    x = x.transpose(2, 3).reshape((bins.n_images, bins.tiles_y * ts, bins.tiles_x * ts) + rest)
    return x[:, :height, :width]
