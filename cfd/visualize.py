"""Renders people look at: orbit videos and view grids of a scene."""

from __future__ import annotations

from pathlib import Path

import torch

from .cameras import fixed_orbit_cameras
from .renderers import render
from .utils.media import save_grid, save_video


@torch.no_grad()
def render_orbit(scene, n_frames: int = 60, size: int = 128, elevation: float = 15.0,
                 distance: float = 3.2, fov: float = 40.0, background=1.0, batch: int = 8):
    """RGB frames of a full turn around the origin. ``[n_frames, size, size, 3]``."""
    cams = fixed_orbit_cameras(n_frames, size, size, elevation, distance, fov, device=scene.device)
    frames = [render(scene, cams[i : i + batch], background=background).rgb
              for i in range(0, n_frames, batch)]
    return torch.cat(frames)


def write_orbit_video(scene, path, n_frames: int = 60, size: int = 128, fps: int = 24,
                      **orbit) -> Path:
    """Render an orbit and write it as mp4 (GIF when ffmpeg is missing); returns the file."""
    return save_video(render_orbit(scene, n_frames, size, **orbit), path, fps=fps)


@torch.no_grad()
def write_view_grid(scene, path, n_views: int = 8, size: int = 128, **orbit) -> Path:
    """PNG grid of rgb, alpha and normalised depth rows around the orbit."""
    cams = fixed_orbit_cameras(n_views, size, size, orbit.get("elevation", 15.0),
                               orbit.get("distance", 3.2), orbit.get("fov", 40.0),
                               device=scene.device)
    out = render(scene, cams, background=orbit.get("background", 1.0))
    depth = out.depth
    valid = out.alpha > 0.5
    if valid.any():
        lo, hi = depth[valid].min(), depth[valid].max()
        depth = ((depth - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1) * valid
    return save_grid([out.rgb, out.alpha, depth], path, n_cols=n_views)
