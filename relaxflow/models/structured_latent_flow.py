"""Stage 2 flow model: a DiT over the structured latent on the occupied voxels (``SLatFlowModel``).

Input ``SparseTensor`` of ``feats [N, 8]`` at 64^3 coords. Residual blocks with submanifold
convolutions pack it down ``log2(patch_size)`` times (mean pooling), the transformer blocks
attend over all voxels of each item, and residual blocks unpack it again with skip connections.
Released args (image L): model 1024, cond 1024, 24 blocks, 16 heads, patch 2, io blocks [128].
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import FlowTransformer, LayerNorm32, absolute_position_embedding, convert_to_half
from .sparse import SparseConv3d, SparseLinear, SparseTensor, sparse_downsample, sparse_upsample


class SparseResBlock3d(nn.Module):
    """Optional down/up-sampling, then norm -> SiLU -> conv -> norm modulated by the timestep
    ((scale, shift), in that order) -> SiLU -> conv, plus a skip (linear when channels change)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        if downsample and upsample:
            raise ValueError("a block either downsamples or upsamples")
        out_channels = out_channels or channels
        self.resample = "down" if downsample else "up" if upsample else None
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels)
        self.conv2 = SparseConv3d(out_channels, out_channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = (SparseLinear(channels, out_channels) if channels != out_channels
                                else nn.Identity())

    def forward(self, x: SparseTensor, emb: Tensor) -> SparseTensor:
        if self.resample == "down":
            x = sparse_downsample(x)
        elif self.resample == "up":
            x = sparse_upsample(x)
        scale, shift = self.emb_layers(emb).to(x.feats.dtype).chunk(2, dim=1)
        item = x.coords[:, 0].long()  # each voxel takes its item's modulation
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = h.replace(F.silu(self.norm2(h.feats) * (1 + scale[item]) + shift[item]))
        h = self.conv2(h)
        return h.replace(h.feats + self.skip_connection(x).feats)


class SLatFlowModel(FlowTransformer):
    """Velocity model of TRELLIS's stage 2 (``ElasticSLatFlowModel`` is the same at inference)."""

    def __init__(self, resolution: int, in_channels: int, model_channels: int,
                 cond_channels: int, out_channels: int, num_blocks: int,
                 num_heads: Optional[int] = None, num_head_channels: int = 64,
                 mlp_ratio: float = 4.0, patch_size: int = 2, num_io_res_blocks: int = 2,
                 io_block_channels: Optional[List[int]] = None, pe_mode: str = "ape",
                 use_fp16: bool = False, use_checkpoint: bool = False,
                 use_skip_connection: bool = True, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        io = list(io_block_channels or [])
        if io and 2 ** len(io) != patch_size:
            raise ValueError(f"patch_size {patch_size} needs log2(patch_size) io block channels, "
                             f"got {io}")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.token_resolution = resolution // 2 ** len(io)  # the transformer's voxel grid
        self.model_channels = model_channels
        self.use_skip_connection = use_skip_connection
        self._build_transformer(model_channels, cond_channels, num_blocks, num_heads,
                                num_head_channels, mlp_ratio, qk_rms_norm, qk_rms_norm_cross,
                                share_mod, pe_mode)
        self.input_layer = SparseLinear(in_channels, io[0] if io else model_channels)
        self.input_blocks = nn.ModuleList()
        for chs, next_chs in zip(io, io[1:] + [model_channels]):
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels)
                                     for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs,
                                                      downsample=True))
        widen = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for chs, prev_chs in zip(reversed(io), [model_channels] + list(reversed(io[1:]))):
            self.out_blocks.append(SparseResBlock3d(prev_chs * widen, model_channels, chs,
                                                    upsample=True))
            self.out_blocks.extend(SparseResBlock3d(chs * widen, model_channels, chs)
                                   for _ in range(num_io_res_blocks - 1))
        self.out_layer = SparseLinear(io[0] if io else model_channels, out_channels)

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        """Residual and transformer blocks in ``dtype``; embedders, io layers, norms float32."""
        self.torso_dtype = dtype
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            convert_to_half(part, dtype)

    def _transformer(self, h: SparseTensor, mod: Tensor, cond: Tensor,
                     cond_mask: Optional[Tensor], relaxation) -> SparseTensor:
        """Every block attends over all voxels of each item: items of equal size go as one
        batch (the branches of a guidance batch share their voxels), others one by one."""
        rows = h.items()
        out = torch.empty_like(h.feats)
        if len({len(r) for r in rows}) == 1:
            groups = [(torch.stack(rows), slice(None))]
        else:
            groups = [(r[None], slice(b, b + 1)) for b, r in enumerate(rows)]
        for index, items in groups:
            tokens = h.feats[index]  # [b, N, C]
            item_mask = None if cond_mask is None else cond_mask[items]
            item_relaxation = relaxation
            if relaxation is not None:
                # the grid topology blurs each item's voxels over their own cells
                grid = (self.token_resolution,) * 3 if relaxation.topology == "grid" else None
                item_relaxation = dataclasses.replace(
                    relaxation, query_grid=grid, query_coords=h.coords[index][..., 1:],
                    items=None if relaxation.items is None else relaxation.items[items])
            for block in self.blocks:
                tokens = block(tokens, mod[items], cond[items], item_mask, item_relaxation)
            out[index] = tokens
        return h.replace(out)

    def forward(self, x: SparseTensor, t: Tensor, cond: Tensor,
                cond_mask: Optional[Tensor] = None, relaxation=None) -> SparseTensor:
        """``x`` with ``feats [N, C_in]``, ``t [B]`` (in [0, 1000]), ``cond [B, S, cond_channels]``
        -> velocity ``feats [N, C_out]`` at the same coords. ``cond_mask`` and ``relaxation`` as
        in :class:`~relaxflow.models.SparseStructureFlowModel`; the grid topology blurs the
        queries over their voxels' cells."""
        dtype = self.torso_dtype
        h = self.input_layer(x)
        h = h.replace(h.feats.to(dtype))
        mod, cond = self.modulation(t).to(dtype), cond.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, mod)
            skips.append(h.feats)
        pos = absolute_position_embedding(h.coords[:, 1:], self.model_channels)
        h = self._transformer(h.replace(h.feats + pos.to(dtype)), mod, cond, cond_mask, relaxation)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))
            h = block(h, mod)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]).to(x.feats.dtype))
        return self.out_layer(h)
