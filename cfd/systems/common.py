"""Config pieces every optimisation system shares: learning rates and training-camera ranges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..cameras import Cameras, sample_orbit_cameras


@dataclass
class LearningRates:
    means: float = 2e-3
    scales: float = 5e-3
    quats: float = 1e-3
    opacities: float = 5e-2
    sh0: float = 1e-2
    shN: float = 5e-4


@dataclass
class OrbitConfig:
    """Training-camera ranges, in degrees and world units."""

    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: List[float] = field(default_factory=lambda: [3.0, 3.4])
    fov_range: List[float] = field(default_factory=lambda: [38.0, 42.0])

    def sample(self, batch: int, resolution: int, generator: Optional[torch.Generator],
               device) -> Cameras:
        """``batch`` square ``resolution`` cameras drawn from these ranges."""
        return sample_orbit_cameras(batch, resolution, resolution, self.elevation_range,
                                    self.azimuth_range, self.distance_range, self.fov_range,
                                    generator=generator, device=device)
