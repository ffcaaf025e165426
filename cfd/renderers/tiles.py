"""Tile binning: which projected Gaussians touch which tile, sorted front to back.

Each Gaussian's opacity-aware bounding box (from its radii) is intersected with a grid of
``tile_size`` x ``tile_size`` pixel tiles. Every (tile, Gaussian) intersection is sorted by tile,
then by depth, and each tile's list is cut into fixed-length *chunks* of ``chunk_size`` Gaussians
(the last one padded with a dummy index). The rasteriser then works on dense ``[chunks, pixels,
chunk_size]`` blocks, so its memory grows with the number of intersections, never with
pixels x Gaussians.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TileBins:
    """Chunked, depth-sorted intersection lists of one batch of images.

    Attributes:
        gaussian_ids: flat Gaussian index ``b * N + n`` per chunk slot; padding slots hold
            ``n_gaussians`` (a transparent dummy). ``[C, K]`` int64.
        chunk_tile: flat tile index ``(b * tiles_y + ty) * tiles_x + tx`` of each chunk. ``[C]``.
        chunk_first: index of the first chunk of the same tile. ``[C]``.
        chunk_last: index of the last chunk of the same tile. ``[C]``.
        chunk_origin: pixel coordinates (x, y) of the tile's top-left corner. ``[C, 2]`` float.
        n_gaussians: ``B * N``; tile_size, tiles_x, tiles_y, n_images: the grid.
        n_intersections: number of (tile, Gaussian) pairs before padding.
    """

    gaussian_ids: Tensor
    chunk_tile: Tensor
    chunk_first: Tensor
    chunk_last: Tensor
    chunk_origin: Tensor
    n_gaussians: int
    tile_size: int
    tiles_x: int
    tiles_y: int
    n_images: int
    n_intersections: int

    @property
    def n_tiles(self) -> int:
        return self.n_images * self.tiles_y * self.tiles_x


def bin_gaussians(
    means2d: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    tile_size: int = 8,
    chunk_size: int = 32,
) -> TileBins:
    """Sort the Gaussians of B images into tiles.

    Args:
        means2d ``[B,N,2]`` pixels; radii ``[B,N,2]`` int (0 = culled); depths ``[B,N]``.
    """
    B, N = radii.shape[:2]
    device = means2d.device
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    n_tiles = B * tiles_y * tiles_x
    with torch.no_grad():
        radii_flat = radii.reshape(B * N, 2)
        ids = torch.nonzero((radii_flat > 0).all(dim=-1), as_tuple=False)[:, 0]
        mean = means2d.detach().reshape(B * N, 2)[ids]
        rad = radii_flat[ids].to(mean.dtype)
        lo = torch.floor((mean - rad) / tile_size)
        hi = torch.ceil((mean + rad) / tile_size)
        limit = torch.tensor([tiles_x, tiles_y], device=device, dtype=lo.dtype)
        lo = torch.minimum(lo.clamp(min=0), limit).long()
        hi = torch.minimum(hi.clamp(min=0), limit).long()
        span = hi - lo  # [G,2]
        counts = span[:, 0] * span[:, 1]
        total = int(counts.sum())

        gid = torch.repeat_interleave(ids, counts)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, device=device) - torch.repeat_interleave(starts, counts)
        span_x = torch.repeat_interleave(span[:, 0], counts)
        tx = torch.repeat_interleave(lo[:, 0], counts) + local % span_x.clamp(min=1)
        ty = torch.repeat_interleave(lo[:, 1], counts) + local // span_x.clamp(min=1)
        tile = ((gid // N) * tiles_y + ty) * tiles_x + tx

        depth_rank = torch.empty(B * N, dtype=torch.long, device=device)
        depth_rank[torch.argsort(depths.detach().reshape(-1))] = torch.arange(B * N, device=device)
        order = torch.argsort(tile * (B * N) + depth_rank[gid])
        gid, tile = gid[order], tile[order]

        per_tile = torch.bincount(tile, minlength=n_tiles)
        tile_start = torch.cumsum(per_tile, 0) - per_tile
        chunks_per_tile = (per_tile + chunk_size - 1) // chunk_size
        n_chunks = int(chunks_per_tile.sum())
        chunk_tile = torch.repeat_interleave(torch.arange(n_tiles, device=device), chunks_per_tile)
        first_chunk_of_tile = torch.cumsum(chunks_per_tile, 0) - chunks_per_tile
        chunk_first = first_chunk_of_tile[chunk_tile]
        chunk_last = chunk_first + chunks_per_tile[chunk_tile] - 1
        chunk_rank = torch.arange(n_chunks, device=device) - chunk_first
        slot = (tile_start[chunk_tile] + chunk_rank * chunk_size)[:, None] + torch.arange(
            chunk_size, device=device
        )
        in_tile = slot < (tile_start + per_tile)[chunk_tile][:, None]
        padded = torch.cat([gid, torch.full((1,), B * N, device=device, dtype=gid.dtype)])
        gaussian_ids = padded[torch.where(in_tile, slot, torch.full_like(slot, total))]

        txy = chunk_tile % (tiles_y * tiles_x)
        chunk_origin = torch.stack(
            [(txy % tiles_x) * tile_size, (txy // tiles_x) * tile_size], dim=-1
        ).to(means2d.dtype)
    return TileBins(
        gaussian_ids=gaussian_ids,
        chunk_tile=chunk_tile,
        chunk_first=chunk_first,
        chunk_last=chunk_last,
        chunk_origin=chunk_origin,
        n_gaussians=B * N,
        tile_size=tile_size,
        tiles_x=tiles_x,
        tiles_y=tiles_y,
        n_images=B,
        n_intersections=total,
    )
