"""Attention-logit relaxation: a separable Gaussian blur of cross-attention logits.

RelaxFlow relaxes the prior branch by blurring its cross-attention logits ``L = q k^T / sqrt(d)``
(``[Lq, Lk]`` per head) along the query axis and the key axis. The blur is linear, so with
``Gq`` and ``Gk`` the two blur operators ``Gq L Gk^T = (Gq q)(Gk k)^T / sqrt(d)``: blurring the
queries along their tokens and the keys along theirs, then attending as usual, is the same
thing. That runs inside ``scaled_dot_product_attention`` and never forms the ``Lq x Lk`` matrix.

Kernel: ``g[i] ~ exp(-(i - K//2)^2 / (2 sigma^2))`` normalised to sum 1 with ``K = 2 round(3
sigma) + 1`` (Python's round: half to even, so sigma 2.5 gives K = 17). Zero padding, no
renormalisation at the borders (edge logits are pulled toward 0), as the released code does.

Topologies:

* ``"grid"`` (the paper's description): queries blurred over their 3D token grid (16^3 for the
  stage-1 latent, x-major; for stage 2's sparse voxels in their 32^3 grid, the Gaussian-weighted
  mean over each voxel's occupied neighbours: empty cells, most of a thin shell's surroundings,
  neither count nor pull the logits toward 0), keys over each image's 2D patch grid (37 x 37), every prior image
  on its own, its class and register tokens untouched.
* ``"flat"`` (the released code): both axes blurred along the raw 1D token index, across grid rows
  and image boundaries alike.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Topology(Enum):
    """Which tokens are neighbours when the logits are blurred (the module docstring)."""

    grid = "grid"
    flat = "flat"


def kernel_size(sigma: float) -> int:
    return 2 * round(3 * sigma) + 1


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> Tensor:
    """Normalised 1D Gaussian ``[K]`` with ``K = kernel_size(sigma)``."""
    size = kernel_size(sigma)
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


# Axes up to this many tokens are blurred by one product with the banded blur matrix, longer
# ones by conv1d: the matrix costs L multiply-adds per token against the kernel's K (17 at
# sigma 2.5), but conv1d over one-channel rows is slow for short rows (on the CPU, 16 and 37
# tokens: 30-500x slower; 64: 3.6x; 128: the matrix is 1.6x slower).
MATRIX_BLUR_MAX_LENGTH = 64


@functools.lru_cache(maxsize=64)
def blur_matrix(sigma: float, length: int, device=None) -> Tensor:
    """The zero-padded blur of an axis of ``length`` tokens as a float32 ``[length, length]``
    matrix ``B`` (``blurred = B @ x``): row ``i`` holds the kernel centred on ``i``, cut where
    it passes the ends. Cached (every layer of every step asks for the same few): callers must
    not modify it."""
    kernel = gaussian_kernel(sigma, torch.float32, device)
    i = torch.arange(length, device=device)
    offset = i[None, :] - i[:, None] + len(kernel) // 2  # [i, j]: j's place in i's kernel
    inside = (offset >= 0) & (offset < len(kernel))
    return torch.where(inside, kernel[offset.clamp(0, len(kernel) - 1)], kernel.new_zeros(()))


def blur_axis(x: Tensor, sigma: float, dim: int) -> Tensor:
    """Blur ``x`` along ``dim`` with zero padding (same length), in float32."""
    if sigma <= 0:
        return x
    moved = x.movedim(dim, -1)
    length = moved.shape[-1]
    if length <= MATRIX_BLUR_MAX_LENGTH:
        out = moved.float() @ blur_matrix(sigma, length, x.device).T
        return out.to(x.dtype).movedim(-1, dim)
    kernel = gaussian_kernel(sigma, torch.float32, x.device)
    flat = moved.reshape(-1, 1, length).float()
    out = F.conv1d(flat, kernel[None, None], padding=len(kernel) // 2)
    return out.reshape(moved.shape).to(x.dtype).movedim(-1, dim)


def blur_grid(tokens: Tensor, sigma: float, grid: Sequence[int], dim: int) -> Tensor:
    """Blur tokens laid out along ``dim`` as a C-order grid (``prod(grid)`` tokens) on every
    grid axis in turn."""
    if sigma <= 0:
        return tokens
    moved = tokens.movedim(dim, 0)
    shaped = moved.reshape(*grid, *moved.shape[1:])
    for axis in range(len(grid)):
        shaped = blur_axis(shaped, sigma, axis)
    return shaped.reshape(moved.shape).movedim(0, dim)


def blur_sparse(tokens: Tensor, sigma: float, grid: Sequence[int], coords: Tensor,
                dim: int) -> Tensor:
    """Blur tokens that are occupied cells of a grid: ``tokens`` with the batch at dim 0 and
    ``L`` cells at ``dim``, ``coords [B, L, 3]`` their integer cells in ``grid``. Each token
    becomes the Gaussian-weighted mean of the occupied cells around it: scattered into the
    dense grid (zeros elsewhere), ``blur_grid``, read back and divided by the blurred occupancy.
    The dense grid is ``prod(grid)`` tokens, never tokens squared."""
    if sigma <= 0:
        return tokens
    moved = tokens.movedim(dim, 1)
    B = moved.shape[0]
    cell = (coords[..., 0] * grid[1] + coords[..., 1]) * grid[2] + coords[..., 2]  # [B, L]
    batch = torch.arange(B, device=tokens.device)[:, None]
    dense = moved.new_zeros(B, math.prod(grid), *moved.shape[2:])
    dense[batch, cell] = moved
    occupied = torch.zeros(B, math.prod(grid), dtype=torch.float32, device=tokens.device)
    occupied[batch, cell] = 1.0
    mass = blur_grid(occupied, sigma, grid, 1)[batch, cell]  # [B, L], >= the centre weight
    blurred = blur_grid(dense, sigma, grid, 1)[batch, cell]
    mass = mass.reshape(*mass.shape, *[1] * (blurred.ndim - 2)).to(blurred.dtype)
    return (blurred / mass).movedim(1, dim)


@dataclass
class KeyLayout:
    """How the key tokens are laid out: ``n_images`` blocks of ``prefix`` untouched tokens (class
    and registers) followed by a ``grid`` of patch tokens (DINOv2 ViT-L/14-reg at 518 px: 5 and
    37 x 37)."""

    n_images: int = 1
    prefix: int = 5
    grid: Tuple[int, ...] = (37, 37)

    def length(self) -> int:
        return self.n_images * (self.prefix + math.prod(self.grid))


@dataclass
class AttentionRelaxation:
    """The prior branch's relaxation: which batch items it applies to and how.

    Args:
        sigma_query, sigma_key: blur widths in tokens (0: no blur on that axis).
        topology: ``"grid"`` or ``"flat"`` (module docstring).
        query_grid: the queries' token grid (``None``: the flat topology, or stage 2's model
            fills in its voxel grid).
        keys: the key layout (grid topology).
        query_coords: ``[B, Lq, 3]`` cells of sparse queries in ``query_grid`` (stage 2's
            voxels; the model that owns them fills this in); None: the queries fill the grid.
        items: boolean ``[B]``: the batch items (the prior branch's) that are relaxed.
    """

    sigma_query: float = 2.5
    sigma_key: float = 2.5
    topology: str = "grid"
    query_grid: Optional[Tuple[int, ...]] = (16, 16, 16)
    keys: KeyLayout = field(default_factory=KeyLayout)
    query_coords: Optional[Tensor] = None
    items: Optional[Tensor] = None

    def __post_init__(self):
        if self.topology not in ("grid", "flat"):
            raise ValueError(f"topology is 'grid' or 'flat', got {self.topology!r}")

    def blur_queries(self, x: Tensor, dim: int = 1, coords: Optional[Tensor] = None) -> Tensor:
        """Blur along the query tokens at ``dim`` (queries ``[B, Lq, H, D]``, or logits);
        ``coords``: the batch's rows of ``query_coords``."""
        if self.topology == "flat" or self.query_grid is None:
            return blur_axis(x, self.sigma_query, dim)
        if coords is not None:
            return blur_sparse(x, self.sigma_query, self.query_grid, coords, dim)
        return blur_grid(x, self.sigma_query, self.query_grid, dim)

    def blur_keys(self, x: Tensor, dim: int = 1) -> Tensor:
        """Blur along the key tokens at ``dim`` (keys ``[B, Lk, H, D]``, or logits)."""
        if self.topology == "flat":
            return blur_axis(x, self.sigma_key, dim)
        layout = self.keys
        if x.shape[dim] != layout.length():
            raise ValueError(f"{x.shape[dim]} key tokens do not fit {layout.n_images} image(s) "
                             f"of {layout.prefix} + {'x'.join(map(str, layout.grid))} tokens")
        moved = x.movedim(dim, 0)
        per_image = moved.reshape(layout.n_images, -1, *moved.shape[1:])
        patches = blur_grid(per_image[:, layout.prefix:], self.sigma_key, layout.grid, 1)
        blurred = torch.cat([per_image[:, :layout.prefix], patches], 1)
        return blurred.reshape(moved.shape).movedim(0, dim)

    def apply(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """Relax the ``items`` of a batch of queries ``[B, Lq, H, D]`` and keys
        ``[B, Lk, H, D]``."""
        coords = self.query_coords
        if self.items is None:
            return self.blur_queries(q, coords=coords), self.blur_keys(k)
        q, k = q.clone(), k.clone()
        q[self.items] = self.blur_queries(q[self.items], coords=None if coords is None
                                          else coords[self.items])
        k[self.items] = self.blur_keys(k[self.items])
        return q, k

    def blurred_logits(self, q: Tensor, k: Tensor) -> Tensor:
        """Reference: the explicit blurred logits ``[B, H, Lq, Lk]`` (forms the whole matrix)."""
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        return self.blur_keys(self.blur_queries(logits, 2, self.query_coords), 3)
