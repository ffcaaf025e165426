"""Structured latent -> 3D Gaussians (``SLatGaussianDecoder``), returned as our ``Splats``, and
the sparse transformer torso the SLat VAE's encoder (``structured_latent_encoder``) shares.

The torso (:class:`SparseTransformerBase`: input linear, absolute positions, no modulation,
shifted-window self-attention: block ``i`` shifts the voxel grid by ``window // 2 * (i % 2)``
on every axis and attends inside each ``window^3`` cell, then a layer norm without affine)
maps each voxel's latent to features; the decoder's output layer turns them into
``num_gaussians`` Gaussians. The per-voxel output is laid out as
``xyz (G*3) | features_dc (G*3) | scaling (G*3) | rotation (G*4) | opacity (G)``, each part
multiplied by its ``lr`` from the representation config, and activated as the released
Gaussian representation does (see :meth:`SLatGaussianDecoder.to_splats`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cfd.scene import Splats

from .layers import (FeedForwardNet, LayerNorm32, MultiHeadAttention, absolute_position_embedding,
                     convert_to_half)
from .sparse import SparseLinear, SparseTensor

# Order and width (per Gaussian) of the decoder's output channels.
GAUSSIAN_LAYOUT = (("xyz", 3), ("features_dc", 3), ("scaling", 3), ("rotation", 4), ("opacity", 1))


class VoxelGaussians(NamedTuple):
    """The decoder's Gaussians, ``G`` per voxel of ``N``, activated (see
    :meth:`SLatGaussianDecoder.gaussians`)."""

    means: Tensor  # [N, G, 3] in the generator's box [-0.5, 0.5]^3
    scales: Tensor  # [N, G, 3] standard deviations (> 0)
    quats: Tensor  # [N, G, 4] unit quaternions, wxyz
    opacity_logits: Tensor  # [N, G]: opacity = sigmoid(logit)
    features_dc: Tensor  # [N, G, 3] degree-0 SH coefficients: colour = max(0.2821 f + 0.5, 0)


def radical_inverse(base: int, n: int) -> float:
    value, scale = 0.0, 1.0 / base
    while n > 0:
        n, digit = divmod(n, base)
        value += digit * scale
        scale /= base
    return value


def hammersley(n_points: int) -> Tensor:
    """``[n, 3]`` points ``(i / n, radical_inverse_2(i), radical_inverse_3(i))`` in [0, 1)."""
    return torch.tensor([[i / n_points, radical_inverse(2, i), radical_inverse(3, i)]
                         for i in range(n_points)], dtype=torch.float32)


def window_partition(coords: Tensor, window: int, shift: int):
    """Rows grouped by (item, shifted window): ``order [N]`` (rows sorted by window) and
    ``counts [W]`` (rows per window, in that order)."""
    cells = torch.div(coords[:, 1:].long() + shift, window, rounding_mode="floor")
    # one int64 per (item, cell), ordered as the rows (item, cell) are: a 1-D unique is many
    # times faster than one over rows, and numbers the windows the same
    extent = int(cells.max()) + 1 if len(cells) else 1
    keys = coords[:, 0].long()
    for axis in range(3):
        keys = keys * extent + cells[:, axis]
    _, window_id = torch.unique(keys, return_inverse=True)
    return torch.argsort(window_id, stable=True), torch.bincount(window_id)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, coords: Tensor, window: int, shift: int,
                       windows_per_chunk: int = 128) -> Tensor:
    """Self-attention inside each window. ``q, k, v [N, H, D]`` -> ``[N, H, D]``.

    Windows are padded to the longest one and run as a batch of ``scaled_dot_product_attention``
    calls with padded keys masked out, ``windows_per_chunk`` windows at a time.
    """
    order, counts = window_partition(coords, window, shift)
    n_windows, length = len(counts), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    window_of_sorted = torch.repeat_interleave(torch.arange(n_windows, device=q.device), counts)
    slot = window_of_sorted * length + (torch.arange(len(order), device=q.device)
                                        - starts[window_of_sorted])
    valid = torch.zeros(n_windows * length, dtype=torch.bool, device=q.device)
    valid[slot] = True
    valid = valid.view(n_windows, length)

    def padded(x):
        out = x.new_zeros(n_windows * length, *x.shape[1:])
        out[slot] = x[order]
        return out.view(n_windows, length, *x.shape[1:]).transpose(1, 2)  # [W, H, L, D]

    qp, kp, vp = padded(q), padded(k), padded(v)
    result = torch.empty_like(qp)
    for start in range(0, n_windows, windows_per_chunk):
        part = slice(start, start + windows_per_chunk)
        result[part] = F.scaled_dot_product_attention(
            qp[part], kp[part], vp[part], attn_mask=valid[part, None, None, :])
    out = torch.empty_like(q)
    out[order] = result.transpose(1, 2).reshape(n_windows * length, *q.shape[1:])[slot]
    return out


class SparseTransformerBlock(nn.Module):
    """Pre-norm (no affine) windowed self-attention and MLP over the voxels of a sparse tensor."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, window_size: int,
                 shift: int, qk_rms_norm: bool = False):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(channels, num_heads, qk_rms_norm=qk_rms_norm)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, feats: Tensor, coords: Tensor) -> Tensor:
        q, k, v = self.attn.project(self.norm1(feats)[None])
        h = windowed_attention(q[0], k[0], v[0], coords, self.window_size, self.shift)
        feats = feats + self.attn.to_out(h.reshape(feats.shape))
        return feats + self.mlp(self.norm2(feats))


class SparseTransformerBase(nn.Module):
    """The SLat VAE's torso (TRELLIS's ``SparseTransformerBase``): ``input_layer``, absolute
    position embeddings of the coordinates, ``num_blocks`` swin blocks. Subclasses add their
    ``out_layer`` on :meth:`torso`'s features."""

    def __init__(self, in_channels: int, model_channels: int, num_blocks: int,
                 num_heads: Optional[int] = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4.0, attn_mode: str = "swin", window_size: int = 8,
                 pe_mode: str = "ape", qk_rms_norm: bool = False):
        super().__init__()
        if attn_mode != "swin" or pe_mode != "ape":
            raise NotImplementedError(f"attn_mode {attn_mode!r}, pe_mode {pe_mode!r}: the released "
                                      "SLat VAEs use 'swin' and 'ape'")
        self.model_channels = model_channels
        self.torso_dtype = torch.float32
        num_heads = num_heads or model_channels // num_head_channels
        self.input_layer = SparseLinear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(model_channels, num_heads, mlp_ratio, window_size,
                                   shift=window_size // 2 * (i % 2), qk_rms_norm=qk_rms_norm)
            for i in range(num_blocks))

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        self.torso_dtype = dtype
        convert_to_half(self.blocks, dtype)

    def torso(self, x: SparseTensor) -> SparseTensor:
        """``x``: ``feats [N, in_channels]`` at ``coords [N, 4]`` -> the last block's features,
        layer-normed without affine, ``feats [N, model_channels]`` in ``x``'s dtype."""
        h = self.input_layer(x).feats
        h = (h + absolute_position_embedding(x.coords[:, 1:], self.model_channels)).to(
            self.torso_dtype)
        for block in self.blocks:
            h = block(h, x.coords)
        return x.replace(F.layer_norm(h.to(x.feats.dtype), h.shape[-1:]))


class SLatGaussianDecoder(SparseTransformerBase):
    """Released args: resolution 64, model 768, latent 8, 12 blocks, 12 heads, swin window 8,
    32 Gaussians per voxel (448 output channels)."""

    def __init__(self, resolution: int, model_channels: int, latent_channels: int,
                 num_blocks: int, num_heads: Optional[int] = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4.0, attn_mode: str = "swin", window_size: int = 8,
                 pe_mode: str = "ape", use_fp16: bool = False, use_checkpoint: bool = False,
                 qk_rms_norm: bool = False,
                 representation_config: Optional[Dict[str, Any]] = None):
        super().__init__(latent_channels, model_channels, num_blocks, num_heads,
                         num_head_channels, mlp_ratio, attn_mode, window_size, pe_mode,
                         qk_rms_norm)
        self.resolution = resolution
        self.rep = dict(representation_config or {})
        self.num_gaussians = int(self.rep.get("num_gaussians", 32))
        out_channels = self.num_gaussians * sum(width for _, width in GAUSSIAN_LAYOUT)
        self.out_layer = SparseLinear(model_channels, out_channels)
        voxel_size = float(self.rep.get("voxel_size", 1.5))
        self.register_buffer("offset_perturbation",
                             torch.atanh((hammersley(self.num_gaussians) * 2 - 1) / voxel_size))

    def forward(self, x: SparseTensor) -> Tensor:
        """``x``: latent ``feats [N, latent]`` at 64^3 coords -> raw Gaussian parameters
        ``[N, 448]`` (activate them with :meth:`gaussians` or :meth:`to_splats`)."""
        return self.out_layer(self.torso(x)).feats

    def gaussians(self, raw: Tensor, coords: Tensor) -> VoxelGaussians:
        """The activated Gaussians of every voxel, differentiable (training renders them), in
        the generator's world box [-0.5, 0.5]^3. ``raw [N, C_out]`` (:meth:`forward`) at
        ``coords [N, 4]``.

        Per voxel ``v`` and Gaussian ``g`` (``lr`` scales each raw part first):
        centre ``(v + 0.5) / R + tanh(xyz + perturbation_g) * voxel_size / (2 R)``;
        scale ``sqrt(softplus(s + softplus^-1(scaling_bias))^2 + kernel^2)``;
        rotation ``normalize(r + [1, 0, 0, 0])`` (wxyz); opacity ``sigmoid(o + logit(
        opacity_bias))``; colour: degree-0 SH coefficients ``features_dc``.
        """
        rep, G = self.rep, self.num_gaussians
        lr = {"xyz": 1.0, "features_dc": 1.0, "scaling": 1.0, "rotation": 1.0, "opacity": 1.0}
        lr.update({k.lstrip("_"): float(v) for k, v in rep.get("lr", {}).items()})
        parts, start = {}, 0
        for name, width in GAUSSIAN_LAYOUT:
            parts[name] = raw[:, start:start + G * width].reshape(-1, G, width).float() * lr[name]
            start += G * width
        offset = parts["xyz"]
        if rep.get("perturb_offset", True):
            offset = offset + self.offset_perturbation.float()
        voxel_size = float(rep.get("voxel_size", 1.5))
        centre = (coords[:, 1:].float()[:, None] + 0.5) / self.resolution
        means = centre + torch.tanh(offset) / self.resolution * 0.5 * voxel_size - 0.5
        bias = float(rep.get("scaling_bias", 0.004))
        if rep.get("scaling_activation", "exp") == "softplus":
            scales = F.softplus(parts["scaling"] + (bias + math.log(-math.expm1(-bias))))
        else:
            scales = torch.exp(parts["scaling"] + math.log(bias))
        kernel = float(rep.get("3d_filter_kernel_size", 0.0))
        scales = torch.sqrt(scales ** 2 + kernel ** 2)
        identity = parts["rotation"].new_tensor([1.0, 0, 0, 0])
        quats = F.normalize(parts["rotation"] + identity, dim=-1)
        opacity_bias = float(rep.get("opacity_bias", 0.1))
        opacity_logits = parts["opacity"][..., 0] + math.log(opacity_bias / (1 - opacity_bias))
        return VoxelGaussians(means, scales, quats, opacity_logits, parts["features_dc"])

    def to_splats(self, raw: Tensor, coords: Tensor) -> List[Splats]:
        """One :class:`Splats` per batch item of :meth:`gaussians`."""
        g = self.gaussians(raw, coords)
        splats = []
        for b in range(int(coords[:, 0].max()) + 1 if len(coords) else 0):
            rows = coords[:, 0] == b
            splats.append(Splats({
                "means": g.means[rows].reshape(-1, 3),
                "scales": g.scales[rows].reshape(-1, 3).log(),
                "quats": g.quats[rows].reshape(-1, 4),
                "opacities": g.opacity_logits[rows].reshape(-1),
                "sh0": g.features_dc[rows].reshape(-1, 1, 3),
                "shN": raw.new_zeros(int(rows.sum()) * self.num_gaussians, 0, 3,
                                     dtype=torch.float32)}))
        return splats
