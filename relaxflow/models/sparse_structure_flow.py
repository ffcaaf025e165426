"""Stage 1 flow model (``SparseStructureFlowModel``): a dense DiT over the 16^3 structure latent.

Input ``x [B, C_in, R, R, R]`` is cut into patches of ``patch_size^3`` voxels, one token each,
plus a stored absolute position embedding; ``num_blocks`` adaLN-zero blocks cross-attend to the
condition tokens; the output is the velocity, same shape as ``x``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import FlowTransformer, absolute_position_embedding, convert_to_half


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``[B, C, R, R, R] -> [B, (R/p)^3, C p^3]``: one token per patch, features ordered
    (channel, dx, dy, dz), tokens in x-major (ij) order."""
    B, C, X, Y, Z = x.shape
    p = patch_size
    x = x.reshape(B, C, X // p, p, Y // p, p, Z // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (X // p) * (Y // p) * (Z // p), C * p ** 3)


def unpatchify(tokens: Tensor, patch_size: int, resolution: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, (R/p)^3, C p^3] -> [B, C, R, R, R]``."""
    B, _, F_ = tokens.shape
    p, n = patch_size, resolution // patch_size
    x = tokens.reshape(B, n, n, n, F_ // p ** 3, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, -1, resolution, resolution, resolution)


class SparseStructureFlowModel(FlowTransformer):
    """Velocity model of TRELLIS's stage 1 (released args: resolution 16, in/out 8, model 1024,
    cond 1024 for DINOv2 tokens or 768 for CLIP, 24 blocks, 16 heads, patch 1)."""

    def __init__(self, resolution: int, in_channels: int, model_channels: int,
                 cond_channels: int, out_channels: int, num_blocks: int,
                 num_heads: Optional[int] = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4.0, patch_size: int = 2, pe_mode: str = "ape",
                 use_fp16: bool = False, use_checkpoint: bool = False, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch {patch_size}")
        self.resolution, self.patch_size = resolution, patch_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self._build_transformer(model_channels, cond_channels, num_blocks, num_heads,
                                num_head_channels, mlp_ratio, qk_rms_norm, qk_rms_norm_cross,
                                share_mod, pe_mode)
        n = resolution // patch_size
        grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1)
        self.register_buffer("pos_emb", absolute_position_embedding(grid.reshape(-1, 3),
                                                                    model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size ** 3, model_channels)
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size ** 3)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Run the blocks in ``dtype`` (float16/bfloat16 on CUDA); embedders, input and output
        layers and all norms stay float32, the split the released fp16 checkpoints store."""
        self.torso_dtype = dtype
        convert_to_half(self.blocks, dtype)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, cond_mask: Optional[Tensor] = None,
                relaxation=None) -> Tensor:
        """``x [B, C_in, R, R, R]``, ``t [B]`` (in [0, 1000]), ``cond [B, S, cond_channels]`` ->
        velocity ``[B, C_out, R, R, R]``. ``cond_mask [B, S]`` marks real condition tokens
        (padding is False); ``relaxation`` relaxes some items' cross-attention (RelaxFlow)."""
        expected = (self.in_channels,) + (self.resolution,) * 3
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected x of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        h = self.input_layer(patchify(x, self.patch_size)) + self.pos_emb
        mod = self.modulation(t)
        h, mod, cond = (v.to(self.torso_dtype) for v in (h, mod, cond))
        for block in self.blocks:
            h = block(h, mod, cond, cond_mask, relaxation)
        h = self.out_layer(F.layer_norm(h.to(x.dtype), h.shape[-1:]))
        return unpatchify(h, self.patch_size, self.resolution)
