"""Renders people look at: orbit videos of a scene."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .cameras import fixed_orbit_cameras
from .renderers import render
from .utils.media import save_video


def _normal_frame(out, background) -> torch.Tensor:
    """World normals as colours, ``n / 2 + 1/2``, over the background (a scalar or RGB)."""
    colour = torch.as_tensor(background, dtype=out.alpha.dtype, device=out.alpha.device)
    return 0.5 * out.normal + 0.5 * out.alpha + (1 - out.alpha) * colour


@torch.no_grad()
def render_orbit(scene, n_frames: int = 60, size: int = 128, elevation: float = 15.0,
                 distance: float = 3.2, fov: float = 40.0, background=1.0, batch: int = 8,
                 render_options: Optional[dict] = None, show: str = "rgb"):
    """Frames of a full turn around the origin, ``[n_frames, size, size, 3]``: the colours
    (``show="rgb"``) or, for a field, its normals (``show="normal"``). ``render_options``:
    extra ``render`` arguments (a NeRF's ``n_samples``, ``occupancy``)."""
    if show not in ("rgb", "normal"):
        raise ValueError(f"show is 'rgb' or 'normal', got {show!r}")
    if show == "normal" and not hasattr(scene, "query_with_normals"):
        raise ValueError(f"a {type(scene).__name__} has no normals to show; use show='rgb'")
    options = {**(render_options or {}), **({"normals": True} if show == "normal" else {})}
    cams = fixed_orbit_cameras(n_frames, size, size, elevation, distance, fov, device=scene.device)
    frames = []
    for i in range(0, n_frames, batch):
        out = render(scene, cams[i : i + batch], background=background, **options)
        frames.append(out.rgb if show == "rgb" else _normal_frame(out, background))
    return torch.cat(frames)


def write_orbit_video(scene, path, n_frames: int = 60, size: int = 128, fps: int = 24,
                      **orbit) -> Path:
    """Render an orbit and write it as mp4 (GIF when ffmpeg is missing); returns the file."""
    return save_video(render_orbit(scene, n_frames, size, **orbit), path, fps=fps)
