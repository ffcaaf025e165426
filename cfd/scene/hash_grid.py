"""Multi-resolution hash-grid encoding (Instant-NGP) in pure PyTorch, in tiny-cuda-nn's layout.

Level ``l`` has ``scale_l = base_resolution * per_level_scale**l - 1`` and
``R_l = ceil(scale_l) + 1`` vertices per axis. A point ``x`` in ``[0, 1]^3`` lands at
``p = x * scale_l + 0.5``; its cell's corner is ``floor(p)`` and the trilinear weights come from
``p - floor(p)``. A vertex ``v`` indexes its level's table densely (``v_x + v_y R + v_z R^2``)
when the dense grid fits the table, otherwise by the spatial hash
``(v_x * 1) xor (v_y * 2654435761) xor (v_z * 805459861)`` (32-bit), then modulo the table size.
The tables are one flat parameter, level after level with the features innermost; a level holds
``R^3`` entries rounded up to a multiple of 8, at most ``2**log2_hashmap_size``. Outputs are
level-major, ``[N, n_levels * n_features_per_level]``, initialised uniform in +-1e-4.

These are tiny-cuda-nn's ``HashGrid`` rules (linear interpolation), so ``params`` moves between
this encoding and tcnn's fused one (``hash_grid(backend="tcnn")``) unchanged.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from enum import Enum
from typing import List, Tuple

import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)
UINT32 = 0xFFFFFFFF


class GridBackend(Enum):
    auto = "auto"  # tcnn on CUDA when installed, else torch
    torch = "torch"  # the pure-PyTorch encoding below
    tcnn = "tcnn"  # tiny-cuda-nn's fused CUDA encoding


@dataclass
class HashGridConfig:
    """Official CFD: 16 levels x 2 features, ``log2_hashmap_size`` 20, base 16, max 4096.
    The defaults here are sized for a CPU."""

    n_levels: int = 12
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    max_resolution: int = 512
    backend: GridBackend = GridBackend.auto

    @property
    def per_level_scale(self) -> float:
        if self.n_levels < 2:
            return 1.0
        return math.exp(math.log(self.max_resolution / self.base_resolution)
                        / (self.n_levels - 1))

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def tcnn_config(self) -> dict:
        return {"otype": "HashGrid", "n_levels": self.n_levels,
                "n_features_per_level": self.n_features_per_level,
                "log2_hashmap_size": self.log2_hashmap_size,
                "base_resolution": self.base_resolution,
                "per_level_scale": self.per_level_scale}


@dataclass(frozen=True)
class Level:
    scale: float
    resolution: int
    offset: int  # first table entry of the level
    size: int  # table entries of the level

    @property
    def hashed(self) -> bool:
        return self.resolution ** 3 > self.size


def level_layout(cfg: HashGridConfig) -> List[Level]:
    """Scale, resolution and table slice of each level (single-precision scales, as tcnn)."""
    log2_scale = torch.log2(torch.tensor(cfg.per_level_scale, dtype=torch.float32))
    levels, offset = [], 0
    for level in range(cfg.n_levels):
        scale = float(torch.exp2(level * log2_scale) * cfg.base_resolution - 1.0)
        resolution = math.ceil(scale) + 1
        dense = min(resolution ** 3, (2 ** 32 - 1) // 2)
        size = min(-(-dense // 8) * 8, 2 ** cfg.log2_hashmap_size)
        levels.append(Level(scale, resolution, offset, size))
        offset += size
    return levels


def level_corners(x: Tensor, level: Level) -> Tuple[Tensor, Tensor]:
    """Table entries of the 8 cell corners around points ``x [N,3]`` in [0,1] on one level and
    their trilinear weights, ``([N,8] int64, [N,8])``; corner ``c`` is one vertex further
    along axis ``d`` when bit ``d`` of ``c`` is set. Built per axis and combined by
    broadcasting, so no ``[N,8,3]`` vertex tensor is formed."""
    position = x * level.scale + 0.5
    cell = torch.floor(position)
    frac = position - cell
    vertex = cell.long()[..., None] + torch.arange(2, device=x.device)  # [N,3,2]
    weight = torch.stack([1 - frac, frac], -1)  # [N,3,2]
    if not level.hashed:
        R = level.resolution
        ix, iy, iz = vertex[:, 0], vertex[:, 1] * R, vertex[:, 2] * (R * R)
        index = iz[:, :, None, None] + iy[:, None, :, None] + ix[:, None, None, :]
    else:
        ix, iy, iz = (vertex[:, d] * PRIMES[d] & UINT32 for d in range(3))
        index = iz[:, :, None, None] ^ iy[:, None, :, None] ^ ix[:, None, None, :]
    corner_weight = (weight[:, 2, :, None, None] * weight[:, 1, None, :, None]
                     * weight[:, 0, None, None, :])
    N = x.shape[0]
    return index.reshape(N, 8) % level.size + level.offset, corner_weight.reshape(N, 8)


class HashGrid(nn.Module):
    """The encoding on plain PyTorch ops (CPU or CUDA). ``x [N,3]`` in [0,1] ->
    ``[N, n_levels * n_features_per_level]``; differentiable in ``params`` and ``x``."""

    def __init__(self, cfg: HashGridConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.levels = level_layout(cfg)
        entries = self.levels[-1].offset + self.levels[-1].size
        init = torch.rand(entries * cfg.n_features_per_level, generator=generator) * 2e-4 - 1e-4
        self.params = nn.Parameter(init)

    @property
    def n_output_dims(self) -> int:
        return self.cfg.n_output_dims

    def forward(self, x: Tensor) -> Tensor:
        return hash_encode(x, self.params, self.levels, self.cfg.n_features_per_level)


class _GatherRows(torch.autograd.Function):
    """``table[index]`` whose backward sums the rows' gradients with ``bincount``: a fixed
    summation order, so the same step gives the same bits on any number of threads (the
    backward of plain indexing accumulates with parallel atomic adds on CPU)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        columns = [torch.bincount(index, weights=grad[:, f], minlength=ctx.rows)
                   for f in range(grad.shape[1])]
        return torch.stack(columns, 1).to(grad.dtype), None


def hash_encode(x: Tensor, params: Tensor, levels: List[Level], n_features: int) -> Tensor:
    """The encoding as a function: points ``x [N,3]`` in [0,1], flat tables ``params``
    (``level_layout``'s) -> ``[N, len(levels) * n_features]``. One gather per level: a
    single gather over all levels, or ``embedding_bag``, measured slower on CPU."""
    table = params.view(-1, n_features)
    x = x.to(table.dtype)
    outputs = []
    for level in levels:
        index, weight = level_corners(x, level)
        features = _GatherRows.apply(table, index.reshape(-1)).view(*index.shape, n_features)
        outputs.append((weight[..., None] * features).sum(1))
    return torch.cat(outputs, -1)


def tcnn_available() -> bool:
    """tinycudann installed and CUDA present (checked without importing the extension)."""
    return importlib.util.find_spec("tinycudann") is not None and torch.cuda.is_available()


def hash_grid(cfg: HashGridConfig, device, generator: torch.Generator | None = None) -> nn.Module:
    """The encoding for ``cfg.backend`` on ``device``: tcnn when asked for (or ``auto`` on CUDA
    with tinycudann installed), the PyTorch one otherwise."""
    device = torch.device(device)
    backend = GridBackend(cfg.backend)
    use_tcnn = backend is GridBackend.tcnn or (backend is GridBackend.auto
                                               and device.type == "cuda" and tcnn_available())
    if use_tcnn:
        if device.type != "cuda" or not tcnn_available():
            raise RuntimeError(
                "hash grid backend 'tcnn' needs CUDA and tinycudann (not on PyPI: pip install "
                "'git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch' with "
                "nvcc on the PATH); use backend=torch to run without it")
        import tinycudann as tcnn  # a CUDA extension: imported here, never at import time

        # tcnn's module keeps its tables in one parameter named ``params``, as HashGrid does,
        # so state dicts load into either backend.
        return tcnn.Encoding(3, cfg.tcnn_config(), dtype=torch.float32).to(device)
    return HashGrid(cfg, generator).to(device)
