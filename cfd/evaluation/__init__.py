"""Metrics that studies and benchmarks share: small functions on plain tensors.

One module per family:

* :mod:`.geometry`: voxel IoU, Chamfer distance, F-score, surface point sampling of splats,
  occupancy grids and NeRF fields, the nearest category of a shape (text adherence).
* :mod:`.images`: PSNR and mask IoU inside a mask, 95% confidence intervals for tables.
* :mod:`.features`: CLIP score, CLIP R-precision and the Fréchet distance of DINOv2 features,
  with models from local folders only.
* :mod:`.export`: renders written in GPTEval3D's layout.
"""

from .export import depth_to_normals, encode_normals, export_gpteval3d, gpteval3d_cameras
from .features import (ClipModels, clip_image_embeddings, clip_r_precision, clip_score,
                       clip_text_embeddings, dinov2_cls_features, dinov2_frechet_distance,
                       frechet_distance, frechet_distance_from_stats, load_clip, load_dinov2,
                       r_precision_hits)
from .geometry import (adherence_accuracy, chamfer_distance, f_score, field_surface_points,
                       grid_cell_centres, grid_surface_points, nearest_category,
                       nearest_neighbours, points_in_grid, restrict_to_region,
                       scene_surface_points, splat_surface_points, voxel_iou)
from .images import confidence_interval, mask_iou, psnr

__all__ = [
    "voxel_iou", "grid_cell_centres", "points_in_grid", "grid_surface_points",
    "nearest_neighbours", "chamfer_distance", "f_score", "restrict_to_region",
    "splat_surface_points", "field_surface_points", "scene_surface_points",
    "nearest_category", "adherence_accuracy",
    "psnr", "mask_iou", "confidence_interval",
    "ClipModels", "load_clip", "clip_image_embeddings", "clip_text_embeddings", "clip_score",
    "r_precision_hits", "clip_r_precision", "load_dinov2", "dinov2_cls_features",
    "frechet_distance_from_stats", "frechet_distance", "dinov2_frechet_distance",
    "gpteval3d_cameras", "depth_to_normals", "encode_normals", "export_gpteval3d",
]
