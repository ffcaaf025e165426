"""Scenes the engine optimises: 3D Gaussian splats (NeRF fields come later)."""

from .densify import DensifyConfig, Densifier
from .splats import PARAM_KEYS, Splats, from_point_cloud, random_ball

__all__ = ["Splats", "PARAM_KEYS", "random_ball", "from_point_cloud", "Densifier", "DensifyConfig"]
