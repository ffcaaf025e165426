"""The procedural shape world behind the embedded prior, its multi-view dataset, and its
categories of parametric objects (for training a generator)."""

from .catalogue import (VARIANTS_PER_CATEGORY, objects_for, prior_objects, prompts,
                        variant_categories, variant_seeds)
from .categories import (CATEGORIES, GENERATOR_SCALE, SHARED_PARTS, ambiguous_with, category,
                         held_out_seeds, occupancy_grid, surface_points, to_generator_box,
                         train_seeds)
from .dataset import ShapeDatasetConfig, build_shape_dataset, dataset_dir, render_views
from .world import SHAPE_WORLD, object_splats

__all__ = ["SHAPE_WORLD", "object_splats", "objects_for", "prior_objects", "prompts",
           "VARIANTS_PER_CATEGORY", "variant_categories", "variant_seeds", "ShapeDatasetConfig",
           "build_shape_dataset", "dataset_dir", "render_views", "CATEGORIES", "GENERATOR_SCALE",
           "SHARED_PARTS", "ambiguous_with",
           "category", "held_out_seeds", "occupancy_grid", "surface_points", "to_generator_box",
           "train_seeds"]
