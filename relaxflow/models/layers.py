"""Dense building blocks shared by the TRELLIS-compatible models.

Parameter names follow the released checkpoints (``to_qkv``, ``q_rms_norm.gamma``,
``adaLN_modulation.1``, ``mlp.mlp.0`` ...), so their state dicts load with strict key matching.
Attention runs through ``F.scaled_dot_product_attention`` (no flash-attn, no xformers).
Normalisations compute in float32 whatever the torso's dtype, as the checkpoints were trained.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def convert_to_half(module: nn.Module, dtype: torch.dtype) -> None:
    """Put the weights of ``module`` in ``dtype``, except its norms': they stay float32, as the
    released fp16 checkpoints store them and as they compute."""
    for layer in module.modules():
        if not isinstance(layer, (nn.LayerNorm, nn.GroupNorm, MultiHeadRMSNorm)):
            for param in layer.parameters(recurse=False):
                param.data = param.data.to(dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis of ``[B, C, *spatial]``."""

    def forward(self, x: Tensor) -> Tensor:
        moved = x.movedim(1, -1)
        return super().forward(moved).movedim(-1, 1)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]``: cosines first, then sines (TRELLIS's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """``t [B]`` (the samplers pass ``1000 t``) -> ``[B, C]``: sinusoid(256) -> Linear -> SiLU ->
    Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


def absolute_position_embedding(coords: Tensor, channels: int) -> Tensor:
    """Sin/cos embedding of integer coordinates ``[N, D] -> [N, channels]``.

    Per axis ``channels // D // 2`` frequencies ``1 / 10000^(i / n)``; per point the features are
    ``[sin(x f), cos(x f), sin(y f), cos(y f), ...]``, zero-padded to ``channels``.
    """
    n_points, n_dims = coords.shape
    n_freqs = channels // n_dims // 2
    freqs = 1.0 / (10000 ** (torch.arange(n_freqs, dtype=torch.float32, device=coords.device)
                             / n_freqs))
    angles = coords.float()[..., None] * freqs  # [N, D, F]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n_points, -1)
    return F.pad(embedding, (0, channels - embedding.shape[1]))


class MultiHeadRMSNorm(nn.Module):
    """RMS norm per head of ``[..., H, D]``: ``normalize(x) * gamma * sqrt(D)``, in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    """``[B, L, H, D]`` queries, ``[B, S, H, D]`` keys and values -> ``[B, L, H, D]``.

    ``key_mask [B, S]`` (True = a real key, padding at the end) comes with batches of conditions
    of different lengths: items of each length attend to their own keys only, with no padding
    computed."""
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)

    if key_mask is None:
        return sdpa(q, k, v)
    lengths = key_mask.sum(1)
    if not torch.equal(key_mask, torch.arange(k.shape[1], device=k.device) < lengths[:, None]):
        raise ValueError("key_mask must mark each item's real keys as a prefix "
                         "(padding at the end)")
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    for length in lengths.unique().tolist():
        items = torch.nonzero(lengths == length).squeeze(1)
        out[items] = sdpa(q[items], k[items, :length], v[items, :length])
    return out


class MultiHeadAttention(nn.Module):
    """Self-attention (``to_qkv``) or cross-attention (``to_q``, ``to_kv``) with optional QK
    RMS norm; ``[B, L, C]`` (and context ``[B, S, ctx_channels]``) -> ``[B, L, C]``."""

    def __init__(self, channels: int, num_heads: int, ctx_channels: Optional[int] = None,
                 type: str = "self", qkv_bias: bool = True, qk_rms_norm: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must divide into {num_heads} heads")
        if type not in ("self", "cross"):
            raise ValueError(f"attention type is 'self' or 'cross', got {type!r}")
        self.num_heads = num_heads
        self.cross = type == "cross"
        head_dim = channels // num_heads
        if self.cross:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def project(self, x: Tensor, context: Optional[Tensor] = None):
        """Queries, keys and values ``[B, L|S, H, D]`` after the optional RMS norm."""
        B, L, _ = x.shape
        if self.cross:
            q = self.to_q(x).reshape(B, L, self.num_heads, -1)
            k, v = self.to_kv(context).reshape(B, context.shape[1], 2, self.num_heads, -1).unbind(2)
        else:
            q, k, v = self.to_qkv(x).reshape(B, L, 3, self.num_heads, -1).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None, relaxation=None) -> Tensor:
        """``context_mask [B, S]``: which context tokens are real (batches of conditions of
        different lengths are padded); ``relaxation``: a
        :class:`relaxflow.relaxation.AttentionRelaxation` blurring the queries and keys of some
        items (cross-attention only)."""
        q, k, v = self.project(x, context)
        if relaxation is not None:
            q, k = relaxation.apply(q, k)
        return self.to_out(attention(q, k, v, context_mask).reshape(x.shape))


class FeedForwardNet(nn.Module):
    """Linear(C, r C) -> GELU(tanh) -> Linear(r C, C)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-zero DiT block: modulated, gated self-attention; cross-attention after an affine
    LayerNorm (not modulated, not gated); modulated, gated MLP.

    ``x [B, L, C]``, ``mod [B, C]`` (the timestep embedding, or ``[B, 6C]`` when the model
    shares one modulation), ``context [B, S, ctx_channels]`` -> ``[B, L, C]``; ``context_mask``
    and ``relaxation`` go to the cross-attention.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 qkv_bias: bool = True, share_mod: bool = False):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qkv_bias=qkv_bias,
                                            qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels, type="cross",
                                             qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: Tensor, mod: Tensor, context: Tensor,
                context_mask: Optional[Tensor] = None, relaxation=None) -> Tensor:
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None].chunk(6, -1)
        x = x + gate_msa * self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(self.norm2(x), context, context_mask, relaxation)
        return x + gate_mlp * self.mlp(self.norm3(x) * (1 + scale_mlp) + shift_mlp)


class FlowTransformer(nn.Module):
    """What both flow models share, under the released keys: ``t_embedder``, an optional
    ``adaLN_modulation`` shared by all blocks, and the adaLN-zero ``blocks``."""

    torso_dtype = torch.float32

    def _build_transformer(self, model_channels: int, cond_channels: int, num_blocks: int,
                           num_heads: Optional[int], num_head_channels: int, mlp_ratio: float,
                           qk_rms_norm: bool, qk_rms_norm_cross: bool, share_mod: bool,
                           pe_mode: str) -> None:
        if pe_mode != "ape":
            raise NotImplementedError(f"pe_mode {pe_mode!r}: the released models use 'ape'")
        num_heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        self.share_mod = share_mod
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels,
                                                                       6 * model_channels))
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio,
                                           qk_rms_norm=qk_rms_norm,
                                           qk_rms_norm_cross=qk_rms_norm_cross,
                                           share_mod=share_mod)
            for _ in range(num_blocks))

    def modulation(self, t: Tensor) -> Tensor:
        """``t [B]`` -> what the blocks take: ``[B, C]``, or ``[B, 6C]`` when shared."""
        mod = self.t_embedder(t)
        return self.adaLN_modulation(mod) if self.share_mod else mod
