"""Renders people look at: orbit videos of a scene."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .cameras import fixed_orbit_cameras
from .renderers import render
from .utils.media import save_video


@torch.no_grad()
def render_orbit(scene, n_frames: int = 60, size: int = 128, elevation: float = 15.0,
                 distance: float = 3.2, fov: float = 40.0, background=1.0, batch: int = 8,
                 render_options: Optional[dict] = None):
    """RGB frames of a full turn around the origin. ``[n_frames, size, size, 3]``.
    ``render_options``: extra ``render`` arguments (a NeRF's ``n_samples``, ``occupancy``)."""
    cams = fixed_orbit_cameras(n_frames, size, size, elevation, distance, fov, device=scene.device)
    frames = [render(scene, cams[i : i + batch], background=background,
                     **(render_options or {})).rgb
              for i in range(0, n_frames, batch)]
    return torch.cat(frames)


def write_orbit_video(scene, path, n_frames: int = 60, size: int = 128, fps: int = 24,
                      **orbit) -> Path:
    """Render an orbit and write it as mp4 (GIF when ffmpeg is missing); returns the file."""
    return save_video(render_orbit(scene, n_frames, size, **orbit), path, fps=fps)
