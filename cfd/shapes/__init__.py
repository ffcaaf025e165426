"""The procedural shape world behind the embedded prior, and its multi-view dataset."""

from .dataset import ShapeDatasetConfig, build_shape_dataset, dataset_dir
from .world import SHAPE_WORLD, object_splats, objects_for, prompts

__all__ = ["SHAPE_WORLD", "object_splats", "objects_for", "prompts", "ShapeDatasetConfig",
           "build_shape_dataset", "dataset_dir"]
