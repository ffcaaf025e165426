"""Scenes the engine optimises: 3D Gaussian splats and NeRF fields."""

from .densify import Densifier, DensifyConfig
from .hash_grid import HashGrid, HashGridConfig
from .nerf import NeRFConfig, NeRFField, NeRFLearningRates
from .splats import (PARAM_KEYS, Splats, from_point_cloud, group_mean, merge_in_cells,
                     merge_to_count, random_ball)

__all__ = ["Splats", "PARAM_KEYS", "random_ball", "from_point_cloud", "merge_in_cells",
           "merge_to_count", "group_mean", "Densifier", "DensifyConfig",
           "NeRFField", "NeRFConfig", "NeRFLearningRates", "HashGrid", "HashGridConfig"]
