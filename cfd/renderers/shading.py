"""Lambertian shading of volume samples (DreamFusion's): ``base * (ambient + diffuse * max(0, n.l))``.

The base colour is the field's albedo or, in a textureless view, white: such a view shows only
the geometry, so a 2D prior judges the shape without the colours that could fake it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Lighting:
    """One directional light per view.

    Attributes:
        direction: ``[B,3]`` unit vectors from the surface toward the light (world frame).
        ambient: ``[B]`` light every sample gets whatever its normal.
        diffuse: ``[B]`` strength of the Lambertian term.
        textureless: ``[B]`` bool; True shades white instead of the albedo.
    """

    direction: Tensor
    ambient: Tensor
    diffuse: Tensor
    textureless: Tensor

    def shade(self, albedo: Tensor, normal: Tensor, view: Tensor) -> Tensor:
        """Colours of samples ``albedo [R,S,3]`` with unit ``normal [R,S,3]`` on rays of the
        views ``view [R]`` (indices into the batch). ``[R,S,3]``."""
        light = self.direction[view][:, None, :]
        lambert = (normal * light).sum(-1, keepdim=True).clamp(min=0.0)
        base = albedo.masked_fill(self.textureless[view][:, None, None], 1.0)
        return base * (self.ambient[view][:, None, None]
                       + self.diffuse[view][:, None, None] * lambert)
