"""Stage 1 autoencoder: 3D convolutions between a 64^3 occupancy grid and a 16^3 x 8 latent.

``SparseStructureDecoder`` turns the sampled latent ``[B, 8, 16, 16, 16]`` into occupancy logits
``[B, 1, 64, 64, 64]`` (occupied where > 0); ``SparseStructureEncoder`` maps occupancy back to
the latent's mean (only training needs it). Released args: channels [512, 128, 32] (decoder) /
[32, 128, 512] (encoder), two residual blocks per level and in the middle, layer norms. As in
the released code, ``norm_type`` chooses only the output layer's norm; residual blocks always use
layer norms.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import ChannelLayerNorm32, GroupNorm32, convert_to_half


def _norm(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ValueError(f"norm_type is 'layer' or 'group', got {norm_type!r}")


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """``[B, C f^3, X, Y, Z] -> [B, C, f X, f Y, f Z]``; sub-voxel offsets (dx, dy, dz) are the
    slowest-varying part of the channel index after C."""
    B, C, X, Y, Z = x.shape
    c = C // factor ** 3
    x = x.reshape(B, c, factor, factor, factor, X, Y, Z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, c, X * factor, Y * factor, Z * factor)


class ResBlock3d(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3, plus a (1x1 when channels change) skip."""

    def __init__(self, channels: int, out_channels: Optional[int] = None,
                 norm_type: str = "layer"):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = _norm(norm_type, channels)
        self.norm2 = _norm(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = (nn.Conv3d(channels, out_channels, 1)
                                if channels != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Halve the resolution with a stride-2, size-2 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpsampleBlock3d(nn.Module):
    """Double the resolution: conv3 to ``8 out`` channels, then a 3D pixel shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class _ConvTorso(nn.Module):
    """Shared precision handling: the convolutions of ``blocks`` and ``middle_block`` may run in
    half precision."""

    torso_dtype = torch.float32

    def set_torso_dtype(self, dtype: torch.dtype) -> None:
        self.torso_dtype = dtype
        convert_to_half(self.blocks, dtype)
        convert_to_half(self.middle_block, dtype)


class SparseStructureDecoder(_ConvTorso):
    """``[B, latent, r, r, r]`` -> occupancy logits ``[B, out, r 2^(L-1), ...]``."""

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int,
                 channels: List[int], num_res_blocks_middle: int = 2, norm_type: str = "layer",
                 use_fp16: bool = False):
        super().__init__()
        self.latent_channels = latent_channels
        self.upsample_factor = 2 ** (len(channels) - 1)
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0])
                                            for _ in range(num_res_blocks_middle)])
        blocks: List[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks += [ResBlock3d(ch) for _ in range(num_res_blocks)]
            if i + 1 < len(channels):
                blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(_norm(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle_block(self.input_layer(z).to(self.torso_dtype))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(z.dtype))


class SparseStructureEncoder(_ConvTorso):
    """Occupancy ``[B, in, R, R, R]`` -> latent mean ``[B, latent, R / 2^(L-1), ...]`` (and the
    log-variance with ``return_logvar``)."""

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int,
                 channels: List[int], num_res_blocks_middle: int = 2, norm_type: str = "layer",
                 use_fp16: bool = False):
        super().__init__()
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        blocks: List[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks += [ResBlock3d(ch) for _ in range(num_res_blocks)]
            if i + 1 < len(channels):
                blocks.append(DownsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1])
                                            for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(_norm(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], 2 * latent_channels, 3, padding=1))

    def forward(self, occupancy: Tensor, return_logvar: bool = False):
        h = self.input_layer(occupancy).to(self.torso_dtype)
        for block in self.blocks:
            h = block(h)
        mean, logvar = self.out_layer(self.middle_block(h).to(occupancy.dtype)).chunk(2, dim=1)
        return (mean, logvar) if return_logvar else mean
