"""Writing images, image grids and videos. Tensors in, files out; knows nothing of 3D."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def to_uint8(images: Tensor) -> np.ndarray:
    """``[..., H, W, 3|1]`` floats in [0,1] -> uint8 numpy (values clipped)."""
    x = images.detach().float().cpu().clamp(0.0, 1.0)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return (x * 255.0 + 0.5).to(torch.uint8).numpy()


def make_grid(images: Tensor, n_cols: int | None = None, pad: int = 2) -> Tensor:
    """Tile ``[B,H,W,C]`` images into one ``[H', W', C]`` image (padding white)."""
    B, H, W, C = images.shape
    n_cols = n_cols or math.ceil(math.sqrt(B))
    n_rows = math.ceil(B / n_cols)
    grid = images.new_ones(n_rows * (H + pad) + pad, n_cols * (W + pad) + pad, C)
    for i in range(B):
        r, c = divmod(i, n_cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = images[i]
    return grid


def save_image(image: Tensor, path) -> Path:
    """Write one ``[H,W,3|1]`` image in [0,1] as PNG."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, to_uint8(image))
    return path


def save_grid(rows: Sequence[Tensor], path, n_cols: int | None = None) -> Path:
    """Concatenate ``[B,H,W,C]`` batches (e.g. rgb, alpha, depth) and save as one PNG grid."""
    images = torch.cat([r if r.shape[-1] == 3 else r.expand(*r.shape[:-1], 3) for r in rows])
    return save_image(make_grid(images, n_cols or rows[0].shape[0]), path)


def save_video(frames: Tensor, path, fps: int = 24) -> Path:
    """Write ``[T,H,W,3]`` frames in [0,1] as mp4 (H.264 through imageio-ffmpeg).

    Falls back to a GIF next to the requested path when no ffmpeg is available; returns the
    path actually written.
    """
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    # H.264 wants even sizes.
    data = data[:, : data.shape[1] // 2 * 2, : data.shape[2] // 2 * 2]
    if path.suffix == ".mp4":
        try:
            imageio.mimwrite(path, list(data), fps=fps, codec="libx264", quality=8,
                             macro_block_size=1)
            return path
        except Exception as err:  # missing ffmpeg binary or codec
            log.warning("mp4 writing failed (%s); writing a GIF instead", err)
            path = path.with_suffix(".gif")
    imageio.mimwrite(path, list(data), duration=1000.0 / fps, loop=0)
    return path
