"""Sparse voxel tensors and their layers in plain PyTorch (what TRELLIS takes from spconv).

A :class:`SparseTensor` holds ``feats [N, C]`` at ``coords [N, 4]`` int rows ``(batch, x, y, z)``.
Submanifold convolution finds each site's 27 neighbours by binary search in the sorted
coordinate keys and accumulates ``W_k f`` per kernel offset; its weight keeps spconv's
checkpoint layout ``[out, 3, 3, 3, in]`` (equal to a dense ``Conv3d`` weight permuted to
``[out, in, 3, 3, 3]``, cross-correlation, missing neighbours count as zero).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

# Kernel offsets in the weight's (x, y, z) order: index 9 i + 3 j + k is offset (i-1, j-1, k-1).
OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.long)


@dataclass
class SparseTensor:
    """``feats [N, C]`` at ``coords [N, 4]`` (batch, x, y, z). ``parents`` remembers the finer
    grids that downsampling left, so upsampling can go back to them. ``cache`` holds what
    depends on the coordinates only (neighbour tables, the downsampled grid); ``replace`` shares
    it, and a caller that reuses coordinates (a sampler, step after step) may pass it on."""

    feats: Tensor
    coords: Tensor
    parents: List[Tuple[Tensor, Tensor, Dict[str, Any]]] = field(default_factory=list)
    cache: Dict[str, Any] = field(default_factory=dict)

    def replace(self, feats: Tensor) -> "SparseTensor":
        return replace(self, feats=feats)

    @property
    def batch_size(self) -> int:
        return int(self.coords[:, 0].max()) + 1 if len(self.coords) else 0

    def items(self) -> List[Tensor]:
        """Row indices of each batch item (rows are grouped by item after any sort)."""
        return [torch.nonzero(self.coords[:, 0] == b).squeeze(1) for b in range(self.batch_size)]


def coordinate_keys(coords: Tensor, extent: int) -> Tensor:
    """One int64 per (batch, x, y, z) with x, y, z in ``[-1, extent - 1)`` (room for offsets)."""
    c = coords.long()
    return ((c[:, 0] * extent + c[:, 1] + 1) * extent + c[:, 2] + 1) * extent + c[:, 3] + 1


def neighbour_index(coords: Tensor) -> Tensor:
    """``[27, N]``: row of the site at ``coords + offset`` for each kernel offset, or -1."""
    extent = int(coords[:, 1:].max()) + 3 if len(coords) else 3
    keys = coordinate_keys(coords, extent)
    sorted_keys, order = torch.sort(keys)
    shifted = coords.long()[None].repeat(27, 1, 1)
    shifted[:, :, 1:] += OFFSETS.to(coords.device)[:, None]
    wanted = coordinate_keys(shifted.reshape(-1, 4), extent)
    pos = torch.searchsorted(sorted_keys, wanted).clamp(max=len(keys) - 1)
    found = sorted_keys[pos] == wanted
    return torch.where(found, order[pos], -1).reshape(27, -1)


class SparseLinear(nn.Linear):
    """A linear layer on the features of a :class:`SparseTensor`."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class _KernelWeights(nn.Module):
    """Holds the parameters under spconv's names: ``weight [out, 3, 3, 3, in]``, ``bias``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, 3, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = (27 * in_channels) ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(nn.Module):
    """Submanifold 3x3x3 convolution: outputs at the input sites only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size != 3:
            raise NotImplementedError("only the released 3x3x3 kernels are supported")
        self.conv = _KernelWeights(in_channels, out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if "neighbours" not in x.cache:
            x.cache["neighbours"] = neighbour_index(x.coords)
        neighbours = x.cache["neighbours"]
        weight = self.conv.weight.reshape(self.conv.weight.shape[0], 27, -1)  # [out, 27, in]
        # products in the features' dtype, the sum over the 27 offsets in float32 (as spconv)
        out = self.conv.bias.float().expand(len(x.feats), -1).clone()
        for k in range(27):
            rows = torch.nonzero(neighbours[k] >= 0).squeeze(1)
            if len(rows):
                gathered = x.feats.index_select(0, neighbours[k].index_select(0, rows))
                out.index_add_(0, rows, (gathered @ weight[:, k].T.to(x.feats.dtype)).float())
        return x.replace(out.to(x.feats.dtype))


def sparse_downsample(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Coordinates ``// factor``; each coarse site takes its children's features summed and
    divided by their number plus one. The ``+ 1`` is what the released models compute (and were
    trained with): TRELLIS's scatter-mean starts from a zero that counts as a value."""
    key = f"down{factor}"
    if key not in x.cache:
        coarse = x.coords.clone()
        coarse[:, 1:] = torch.div(coarse[:, 1:], factor, rounding_mode="floor")
        unique, parent = torch.unique(coarse, dim=0, return_inverse=True)
        x.cache[key] = (unique.to(x.coords.dtype), parent, {})
    unique, parent, coarse_cache = x.cache[key]
    total = torch.zeros(len(unique), x.feats.shape[1], dtype=x.feats.dtype, device=x.feats.device)
    total.index_add_(0, parent, x.feats)
    count = torch.bincount(parent, minlength=len(unique)).to(x.feats.dtype)[:, None]
    return SparseTensor(total / (count + 1), unique, x.parents + [(x.coords, parent, x.cache)],
                        coarse_cache)


def sparse_upsample(x: SparseTensor) -> SparseTensor:
    """Back to the grid the last downsampling left: each fine site copies its parent."""
    if not x.parents:
        raise ValueError("sparse_upsample needs a tensor that was downsampled before")
    fine_coords, parent, fine_cache = x.parents[-1]
    return SparseTensor(x.feats.index_select(0, parent), fine_coords, x.parents[:-1], fine_cache)
