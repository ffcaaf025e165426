"""Config pieces every optimisation system shares: learning rates, training-camera ranges,
training lights, scheduled loss weights, and the checks of settings every run has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from core.errors import UserError

from ..cameras import Cameras, check_orbit_ranges, sample_orbit_cameras
from ..renderers.rasterize import resolve_backend
from ..renderers.shading import Lighting


def check_backend(device: torch.device, backend: str, splats_only: bool = True) -> None:
    """Refuse, before a run starts, a render ``backend`` that cannot run on ``device`` (or, with
    ``splats_only=False``, cannot render a NeRF), naming the setting to change."""
    if not splats_only and backend not in ("auto", "torch"):
        raise UserError(f"backend={backend} renders splats; a NeRF renders with nerfacc: set "
                        "backend=auto or backend=torch")
    if backend == "gsplat" and device.type != "cuda":
        raise UserError(f"backend=gsplat needs device=cuda (gsplat has no CPU rasteriser); "
                        f"with device={device} use backend=torch or backend=auto")
    try:
        resolve_backend(backend, device)
    except ValueError as err:  # an unknown backend: its error lists the known ones
        raise UserError(f"backend: {err}") from None


def check_counts(counts: Dict[str, int]) -> None:
    """Refuse counts below 1 (``{"eval_views": 8, ...}``), naming the key."""
    for key, value in counts.items():
        if value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")


def scheduled(value: Any, step: int) -> float:
    """A scheduled setting (a ``lambda_*`` weight, the noise's ``gamma``) at ``step``: a number,
    or threestudio's ramp ``[start_step, start_value, end_value, end_step]`` (start_value up to
    start_step, linear to end_value at end_step, end_value after)."""
    if isinstance(value, (int, float)):
        return float(value)
    if not (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) for v in value) and value[0] < value[3]):
        raise ValueError(f"a scheduled value is a number or [start_step, start_value, end_value, "
                         f"end_step] with start_step < end_step, got {value!r}")
    start, v0, v1, end = value
    return float(v0 + (v1 - v0) * min(max((step - start) / (end - start), 0.0), 1.0))


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
    # One camera per equal slice of the azimuth range in every batch (threestudio's option of the
    # same name): each step then pulls on all sides of the object at once.
    batch_uniform_azimuth: bool = False

    def check(self) -> None:
        """Refuse ranges that cannot be sampled, naming the ``camera.`` key."""
        try:
            check_orbit_ranges(self.elevation_range, self.azimuth_range, self.distance_range,
                               self.fov_range)
        except ValueError as err:
            raise UserError(f"camera.{err}") from None

    def sample(self, batch: int, resolution: int, generator: Optional[torch.Generator],
               device) -> Cameras:
        """``batch`` square ``resolution`` cameras drawn from these ranges."""
        return sample_orbit_cameras(batch, resolution, resolution, self.elevation_range,
                                    self.azimuth_range, self.distance_range, self.fov_range,
                                    generator=generator, device=device,
                                    batch_uniform_azimuth=self.batch_uniform_azimuth)


@dataclass
class ShadingConfig:
    """Training lights for fields with normals (DreamFusion's shading augmentation).

    Each view is shaded with probability ``p_shaded`` (else it shows the albedo, unlit): one
    directional light from the camera's side of the object (its direction perturbed by
    ``N(0, light_jitter^2)`` per axis), ``ambient + diffuse * max(0, n.l)``; a shaded view is
    textureless (white, geometry only) with probability ``p_textureless``.
    """

    p_shaded: float = 0.0
    p_textureless: float = 0.5
    ambient: float = 0.1
    diffuse: float = 0.9
    light_jitter: float = 0.3

    def sample(self, cameras: Cameras, generator: Optional[torch.Generator]) -> Optional[Lighting]:
        """Lights for a camera batch; None when no view of it is shaded."""
        if self.p_shaded == 0:
            return None
        B = len(cameras)
        draws = torch.rand(B, 2, generator=generator)
        jitter = torch.randn(B, 3, generator=generator) * self.light_jitter
        towards_camera = F.normalize(cameras.centers.detach().cpu().float(), dim=-1)
        direction = F.normalize(towards_camera + jitter, dim=-1)
        shaded = draws[:, 0] < self.p_shaded
        if not shaded.any():  # albedo everywhere: skip the normals this step
            return None
        real = {"device": cameras.device, "dtype": cameras.viewmats.dtype}
        return Lighting(direction=direction.to(**real),
                        ambient=torch.where(shaded, self.ambient, 1.0).to(**real),
                        diffuse=torch.where(shaded, self.diffuse, 0.0).to(**real),
                        textureless=(shaded & (draws[:, 1] < self.p_textureless)).to(
                            cameras.device))
