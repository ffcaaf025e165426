"""Camera batches, convention conversions and orbit sampling.

Conventions
-----------
* World: right-handed, **+z up** (as threestudio). A camera at elevation ``el`` and azimuth ``az``
  (degrees) sits at ``d * (cos el cos az, cos el sin az, sin el)`` and looks at the origin, so
  azimuth 0 looks at the object's front from the +x axis and azimuth 90 from the +y axis.
* ``Cameras.viewmats`` are world-to-camera matrices in the **OpenCV** convention used by gsplat:
  camera +x right, +y down, +z forward (depth).
* ``Cameras.Ks`` are pinhole intrinsics in pixels with pixel centres at ``+0.5`` (gsplat): the
  centre of pixel ``(i, j)`` is at ``(j + 0.5, i + 0.5)``.
* The OpenGL / threestudio convention is a camera-to-world matrix ``c2w`` whose columns are
  (right, up, backward): camera +y up, camera looks along -z. ``opengl_c2w_to_viewmats`` and
  ``viewmats_to_opengl_c2w`` convert between the two.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# diag(1, -1, -1, 1): flips camera y and z, mapping OpenGL camera axes to OpenCV camera axes.
_GL_TO_CV = torch.tensor([1.0, -1.0, -1.0, 1.0])


@dataclass
class Cameras:
    """A batch of B pinhole cameras sharing one image size.

    Attributes:
        viewmats: world-to-camera matrices, OpenCV convention. ``[B, 4, 4]``.
        Ks: intrinsics in pixels, pixel centres at +0.5. ``[B, 3, 3]``.
        width, height: image size in pixels (positive).
        elevation, azimuth: degrees, ``[B]``, for view-dependent prompts.
        distance: camera distance to the orbit centre (the world origin), ``[B]``.

    Angles and distance not given are derived from the camera centres (``orbit_angles``), so
    every batch carries them, whether built on an orbit, with ``look_at`` or from OpenGL poses.
    Indexing with an int keeps the batch dimension (a batch of one); iterating yields those.
    """

    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int
    elevation: Optional[Tensor] = None
    azimuth: Optional[Tensor] = None
    distance: Optional[Tensor] = field(default=None)

    def __post_init__(self) -> None:
        if self.viewmats.ndim != 3 or self.viewmats.shape[-2:] != (4, 4):
            raise ValueError(f"viewmats must be [B,4,4], got {tuple(self.viewmats.shape)}")
        B = self.viewmats.shape[0]
        if self.Ks.shape != (B, 3, 3):
            raise ValueError(f"Ks must be [B,3,3] with B={B}, got {tuple(self.Ks.shape)}")
        if not all(float(n) == int(n) >= 1 for n in (self.width, self.height)):
            raise ValueError(
                f"image size must be whole pixels >= 1, got width={self.width} "
                f"height={self.height}; pass at least 1x1 pixels"
            )
        self.width, self.height = int(self.width), int(self.height)
        for name in ("viewmats", "Ks"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"Cameras.{name} contains NaN or Inf; check the poses you built")
        focal = self.Ks[:, [0, 1], [0, 1]]
        if not (focal > 0).all():
            raise ValueError(f"Cameras.Ks focal lengths fx, fy must be > 0 pixels, got "
                             f"{focal.tolist()}; build Ks with intrinsics_from_fov")
        for name in ("elevation", "azimuth", "distance"):
            value = getattr(self, name)
            if value is not None and value.shape != (B,):
                raise ValueError(f"Cameras.{name} must be [B]={B}, got {tuple(value.shape)}")
        missing = [name for name in ("elevation", "azimuth", "distance")
                   if getattr(self, name) is None]
        if missing:
            derived = dict(zip(("elevation", "azimuth", "distance"), orbit_angles(self.centers)))
            for name in missing:
                setattr(self, name, derived[name])

    def __len__(self) -> int:
        return self.viewmats.shape[0]

    @property
    def device(self) -> torch.device:
        return self.viewmats.device

    @property
    def centers(self) -> Tensor:
        """Camera centres in world space. ``[B, 3]``."""
        return camera_centers(self.viewmats)

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(
            self.viewmats.to(device), self.Ks.to(device), self.width, self.height,
            self.elevation.to(device), self.azimuth.to(device), self.distance.to(device),
        )

    def __getitem__(self, index) -> "Cameras":
        """Select cameras by index, slice, index tensor or mask; keeps the batch dimension.

        Any integer (Python, NumPy, a 0-d tensor) selects one camera and must be in range:
        iteration, which Python runs through this method, stops at the ``IndexError``.
        """
        if not (isinstance(index, Tensor) and index.ndim > 0):
            try:
                i = operator.index(index)
            except TypeError:
                pass  # a slice or a sequence: tensor indexing checks it
            else:
                n = len(self)
                if not -n <= i < n:
                    raise IndexError(f"camera index {i} is out of range for a batch of {n} "
                                     f"cameras (valid: -{n} to {n - 1})")
                index = slice(i % n, i % n + 1)
        return Cameras(
            self.viewmats[index], self.Ks[index], self.width, self.height,
            self.elevation[index], self.azimuth[index], self.distance[index],
        )

    def ray_directions(self) -> Tensor:
        """World-space ray directions through pixel centres, scaled so that their camera-space z is 1.

        A point at expected depth ``d`` (camera z, as the renderer returns) along pixel ``p`` is
        ``centers + d * ray_directions()[p]``. ``[B, H, W, 3]``.
        """
        H, W = self.height, self.width
        dtype, device = self.viewmats.dtype, self.device
        ys, xs = torch.meshgrid(
            torch.arange(H, dtype=dtype, device=device) + 0.5,
            torch.arange(W, dtype=dtype, device=device) + 0.5,
            indexing="ij",
        )
        fx, fy = self.Ks[:, 0, 0], self.Ks[:, 1, 1]
        cx, cy = self.Ks[:, 0, 2], self.Ks[:, 1, 2]
        x = (xs[None] - cx[:, None, None]) / fx[:, None, None]
        y = (ys[None] - cy[:, None, None]) / fy[:, None, None]
        dirs_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [B,H,W,3]
        R = self.viewmats[:, :3, :3]
        return torch.einsum("bji,bhwj->bhwi", R, dirs_cam)


def camera_centers(viewmats: Tensor) -> Tensor:
    """Camera centres in world space of world-to-camera matrices. ``[B,4,4] -> [B,3]``."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    return -(R.transpose(1, 2) @ t[:, :, None])[:, :, 0]


def orbit_angles(centers: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Elevation and azimuth (degrees) and distance of camera centres about the origin: the
    inverse of ``spherical_to_position``, azimuth wrapped to [-180, 180) as the samplers do
    (on the z axis it is whatever the rounding of x and y gives). ``[B, 3] -> 3 x [B]``."""
    x, y, z = centers.unbind(-1)
    elevation = torch.rad2deg(torch.atan2(z, torch.hypot(x, y)))
    azimuth = _wrap_azimuth(torch.rad2deg(torch.atan2(y, x)))
    return elevation, azimuth, centers.norm(dim=-1)


def _wrap_azimuth(azimuth_deg: Tensor) -> Tensor:
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def _check_values(name: str, values: Tensor, ok: Tensor, rule: str) -> None:
    """Raise naming the argument, the rule and (a few of) the values that break it."""
    if not ok.all():
        bad = values[~ok].flatten()
        raise ValueError(f"{name} must be {rule}, got {bad[:5].tolist()}"
                         f"{f' (and {bad.numel() - 5} more)' if bad.numel() > 5 else ''}")


def _check_fov(name: str, fov_deg: Tensor) -> None:
    fov = torch.as_tensor(fov_deg)
    _check_values(name, fov, (fov > 0) & (fov < 180),
                  "a field of view strictly between 0 and 180 degrees")


def intrinsics_from_fov(fov_y_deg: Tensor, width: int, height: int) -> Tensor:
    """Pinhole intrinsics for a vertical field of view (degrees, in (0, 180)), square pixels.
    ``[B] -> [B,3,3]``."""
    _check_fov("fov_y_deg", fov_y_deg)
    fov_y = torch.deg2rad(fov_y_deg)
    focal = 0.5 * height / torch.tan(0.5 * fov_y)
    Ks = torch.zeros(fov_y.shape + (3, 3), dtype=fov_y.dtype, device=fov_y.device)
    Ks[..., 0, 0] = focal
    Ks[..., 1, 1] = focal
    Ks[..., 0, 2] = 0.5 * width
    Ks[..., 1, 2] = 0.5 * height
    Ks[..., 2, 2] = 1.0
    return Ks


def look_at(eye: Tensor, target: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """World-to-camera matrices (OpenCV) for cameras at ``eye`` looking at ``target``.

    Args:
        eye, target: ``[B, 3]``.
        up: world up ``[3]`` or ``[B, 3]``; default +z. Where the view direction is parallel to
            ``up`` (a camera straight above), the world axis least aligned with the view is used
            instead, so the result stays finite whatever ``up`` is.
    Returns:
        ``[B, 4, 4]``.
    """
    eye = torch.as_tensor(eye)
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = target - eye
    norm = forward.norm(dim=-1, keepdim=True)
    if (norm < 1e-12).any():
        raise ValueError("look_at: eye and target coincide; move the camera away from its target")
    forward = forward / norm
    right = torch.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    # At least one axis is at most 1/sqrt(3) aligned with any direction, so this cross product
    # has norm >= sqrt(2/3).
    least_aligned = F.one_hot(forward.abs().argmin(-1), 3).to(forward.dtype)
    right = torch.where(degenerate, torch.cross(forward, least_aligned, dim=-1), right)
    right = right / right.norm(dim=-1, keepdim=True)
    return _viewmats(right, forward, eye)


def _viewmats(right: Tensor, forward: Tensor, eye: Tensor) -> Tensor:
    """World-to-camera matrices (OpenCV) from unit camera axes in world coordinates and the
    camera centres. ``3 x [B, 3] -> [B, 4, 4]``."""
    down = torch.cross(forward, right, dim=-1)  # OpenCV camera +y points down
    R = torch.stack([right, down, forward], dim=-2)  # rows: camera axes in world coordinates
    viewmats = torch.zeros(eye.shape[:-1] + (4, 4), dtype=eye.dtype, device=eye.device)
    viewmats[..., :3, :3] = R
    viewmats[..., :3, 3] = -(R @ eye[..., None])[..., 0]
    viewmats[..., 3, 3] = 1.0
    return viewmats


def opengl_c2w_to_viewmats(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[B,4,4]`` (threestudio) -> OpenCV world-to-camera ``[B,4,4]``."""
    flip = _GL_TO_CV.to(dtype=c2w.dtype, device=c2w.device)
    return torch.linalg.inv(c2w * flip[None, None, :])


def viewmats_to_opengl_c2w(viewmats: Tensor) -> Tensor:
    """OpenCV world-to-camera ``[B,4,4]`` -> OpenGL camera-to-world ``[B,4,4]`` (threestudio)."""
    flip = _GL_TO_CV.to(dtype=viewmats.dtype, device=viewmats.device)
    return torch.linalg.inv(viewmats) * flip[None, None, :]


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera positions on an orbit around the origin (z up). ``[B] x 3 -> [B, 3]``."""
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az),
         distance * torch.sin(el)],
        dim=-1,
    )


def orbit_cameras(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    distance: Tensor,
    fov_y_deg: Tensor,
    width: int,
    height: int,
) -> Cameras:
    """Cameras looking at the origin from the given spherical positions (all ``[B]``):
    ``distance > 0``, ``-90 <= elevation_deg <= 90``, ``0 < fov_y_deg < 180``.

    The image's right is the direction of increasing azimuth, ``(-sin az, cos az, 0)``, at every
    elevation: the camera does not roll as it passes over the pole (there, ``look_at`` with up
    +z is degenerate and would pick an arbitrary roll).
    """
    _check_values("distance", distance, distance > 0, "> 0 (the orbit radius)")
    _check_values("elevation_deg", elevation_deg, (elevation_deg >= -90) & (elevation_deg <= 90),
                  "within [-90, 90] degrees (past a pole the camera would be upside down)")
    az = torch.deg2rad(azimuth_deg)
    forward = -spherical_to_position(elevation_deg, azimuth_deg, torch.ones_like(az))
    right = torch.stack([-torch.sin(az), torch.cos(az), torch.zeros_like(az)], dim=-1)
    eye = spherical_to_position(elevation_deg, azimuth_deg, distance)
    viewmats = _viewmats(right, forward, eye)
    Ks = intrinsics_from_fov(fov_y_deg, width, height)
    return Cameras(viewmats, Ks, width, height, elevation_deg, azimuth_deg, distance)


def _check_range(name: str, lo_hi: Sequence[float]) -> Tuple[float, float]:
    lo, hi = (float(v) for v in lo_hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name} must be a finite [low, high] with low <= high, got {list(lo_hi)}")
    return lo, hi


def check_orbit_ranges(elevation_range: Sequence[float], azimuth_range: Sequence[float],
                       distance_range: Sequence[float], fov_range: Sequence[float]
                       ) -> List[Tuple[float, float]]:
    """``(lo, hi)`` of each range (degrees; distance in world units), refusing one that is not
    ``[lo, hi]`` with ``lo <= hi``, elevations outside [-90, 90], distances <= 0 and fields of
    view outside (0, 180), naming the range."""
    ranges = {
        "elevation_range": elevation_range, "azimuth_range": azimuth_range,
        "distance_range": distance_range, "fov_range": fov_range,
    }
    lo_hi = [_check_range(k, v) for k, v in ranges.items()]
    if lo_hi[0][0] < -90 or lo_hi[0][1] > 90:
        raise ValueError(f"elevation_range must lie within [-90, 90] degrees, got "
                         f"{list(elevation_range)}")
    if lo_hi[2][0] <= 0:
        raise ValueError(f"distance_range must be positive, got {list(distance_range)}")
    _check_fov("fov_range", torch.tensor(lo_hi[3]))
    return lo_hi


def sample_orbit_cameras(
    batch_size: int,
    width: int,
    height: int,
    elevation_range: Sequence[float] = (-10.0, 45.0),
    azimuth_range: Sequence[float] = (-180.0, 180.0),
    distance_range: Sequence[float] = (3.0, 3.5),
    fov_range: Sequence[float] = (40.0, 45.0),
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    batch_uniform_azimuth: bool = False,
) -> Cameras:
    """B random cameras on an orbit, uniform in each range (degrees), reproducible with ``generator``.

    With ``batch_uniform_azimuth`` the azimuth range is cut into B equal strata and camera i is
    drawn from stratum i, so every batch sees the object from all round. Azimuths are wrapped to
    [-180, 180).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lo_hi = check_orbit_ranges(elevation_range, azimuth_range, distance_range, fov_range)
    u = torch.rand(4, batch_size, generator=generator, dtype=torch.float64)
    if batch_uniform_azimuth:
        u[1] = (torch.arange(batch_size, dtype=torch.float64) + u[1]) / batch_size
    el, az, dist, fov = (lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(lo_hi))
    az = _wrap_azimuth(az)
    return orbit_cameras(
        el.float(), az.float(), dist.float(), fov.float(), width, height
    ).to(device)


def fixed_orbit_cameras(
    n_views: int,
    width: int,
    height: int,
    elevation_deg: float = 15.0,
    distance: float = 3.2,
    fov_y_deg: float = 40.0,
    device: torch.device | str = "cpu",
) -> Cameras:
    """``n_views`` cameras evenly spaced in azimuth at one elevation: the orbit used for videos."""
    if n_views < 1:
        raise ValueError(f"an orbit needs n_views >= 1 cameras, got {n_views} (in a run config: "
                         "eval_views and video_frames must be >= 1)")
    az = torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views) - 180.0
    full = lambda v: torch.full((n_views,), float(v))  # noqa: E731
    return orbit_cameras(
        full(elevation_deg), az, full(distance), full(fov_y_deg), width, height
    ).to(device)
