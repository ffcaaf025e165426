"""The procedural shape world behind the embedded prior, its multi-view dataset, and its
categories of parametric objects (for training a generator)."""

from .categories import (CATEGORIES, GENERATOR_SCALE, SHARED_PARTS, ambiguous_with, category,
                         held_out_seeds, occupancy_grid, render_views, surface_points,
                         to_generator_box, train_seeds)
from .dataset import ShapeDatasetConfig, build_shape_dataset, dataset_dir
from .world import SHAPE_WORLD, object_splats, objects_for, prompts

__all__ = ["SHAPE_WORLD", "object_splats", "objects_for", "prompts", "ShapeDatasetConfig",
           "build_shape_dataset", "dataset_dir", "CATEGORIES", "GENERATOR_SCALE", "SHARED_PARTS",
           "ambiguous_with", "category", "held_out_seeds", "occupancy_grid", "render_views",
           "surface_points", "to_generator_box", "train_seeds"]
