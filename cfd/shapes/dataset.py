"""Multi-view renders of the shape world: the data of the embedded prior.

It holds the objects of ``catalogue.prior_objects()`` in order: ``views_per_object`` views of
each named object, then ``views_per_variant`` of each category variant, all from one seeded
stream of cameras (so the named objects' images are those of the dataset before the variants
were added).

Built once per (code, settings) on first use with a progress bar, then cached under
``<cache_dir>/shape_world/<fingerprint>/`` (an atomic rename of a finished folder, with the
umask's modes; a folder there without ``meta.json`` is a broken build and is replaced). Runs
started side by side on a fresh cache render it once: the first holds ``<fingerprint>.lock`` and
the others wait for its result. The fingerprint hashes the settings (in a canonical form, so
``[-10, 45]`` and ``(-10.0, 45.0)`` are the same dataset) and the source of everything that
draws the images (the shape world, the renderer, the cameras, the splat conversions), so a
changed object, sampler, renderer or setting builds a new one. The folder holds
``images.safetensors`` (uint8 RGB on the settings' background, grey by default; alpha; per-view
labels and angles) and ``meta.json`` (prompts, object names, canonical settings): the layout
``ClosedFormPrior.from_pretrained`` reads.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from core.errors import UserError
from core.runtime import cache_root, share_as_created

from ..cameras import Cameras, sample_orbit_cameras
from ..renderers import render
from ..scene import Splats
from .catalogue import prior_objects, prompts
from .categories import CategoryObject
from .world import ShapeObject, object_splats

try:
    import fcntl
except ImportError:  # not POSIX: parallel first runs each build, and the atomic rename keeps one
    fcntl = None

log = logging.getLogger(__name__)

# The code that turns the settings into images: packages (every .py file) and modules.
IMAGE_SOURCES = ("cfd.shapes", "cfd.renderers", "cfd.cameras", "cfd.scene.splats", "cfd.scene.sh")


@dataclass
class ShapeDatasetConfig:
    views_per_object: int = 300  # of each named object (``world.SHAPE_WORLD``)
    # of each category variant (``catalogue``): fewer than a named object's, because every image
    # adds to the cost of the prior's unconditional branch (BENCHMARKS.md, issue 19)
    views_per_variant: int = 64
    resolution: int = 64
    elevation_range: List[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: List[float] = field(default_factory=lambda: [-180.0, 180.0])
    distance_range: List[float] = field(default_factory=lambda: [2.4, 2.6])
    fov_range: List[float] = field(default_factory=lambda: [40.0, 40.0])
    # Grey, not white: white parts (a snowman) on a white background would leave their opacity
    # undetermined by the images.
    background: float = 0.5
    seed: int = 0
    cache_dir: Optional[str] = None


def image_source_files() -> List[Path]:
    """The source files of ``IMAGE_SOURCES``, in a fixed order."""
    files = []
    for name in IMAGE_SOURCES:
        path = Path(importlib.import_module(name).__file__)
        files += sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    return files


def canonical_settings(cfg: ShapeDatasetConfig) -> Dict[str, object]:
    """The settings that draw the images (all but ``cache_dir``), each in the type of its
    default: ranges as lists of floats, counts as ints, the background as a float."""
    defaults = ShapeDatasetConfig()
    settings: Dict[str, object] = {}
    for f in fields(cfg):
        if f.name == "cache_dir":
            continue
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if isinstance(default, list):
            value = [float(v) for v in value]
        elif isinstance(default, int):
            if float(value) != int(value):
                raise UserError(f"ShapeDatasetConfig.{f.name} must be a whole number, got "
                                f"{value!r}")
            value = int(value)
            if f.name.startswith("views_per_") and value < 1:
                raise UserError(f"ShapeDatasetConfig.{f.name} must be at least 1 (each object "
                                f"of the prior needs images), got {value}")
        else:
            value = float(value)
        settings[f.name] = value
    return settings


def dataset_fingerprint(cfg: ShapeDatasetConfig) -> str:
    """Hash of the canonical settings and the bytes of every image source file."""
    settings = sorted((k, repr(v)) for k, v in canonical_settings(cfg).items())
    return source_fingerprint(repr(settings).encode(), image_source_files())


def source_fingerprint(settings: bytes, files: List[Path]) -> str:
    """16 hex digits of sha256 over ``settings`` and each file's folder, name and bytes: a
    cache key that changes with the settings and with any code that draws the data."""
    h = hashlib.sha256(settings)
    for path in files:
        h.update(f"\n{path.parent.name}/{path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def dataset_dir(cfg: ShapeDatasetConfig) -> Path:
    """``<cache_dir>/shape_world/<fingerprint>``: where the dataset of ``cfg`` is cached."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
    return root / "shape_world" / dataset_fingerprint(cfg)


def build_shape_dataset(cfg: ShapeDatasetConfig, batch: int = 25) -> Path:
    """Render (or find in the cache) the dataset described by ``cfg``; returns its folder."""
    out_dir = dataset_dir(cfg)
    if (out_dir / "meta.json").is_file():
        return out_dir
    with build_lock(out_dir):
        if not (out_dir / "meta.json").is_file():  # the process we waited for built it
            _render_and_publish(cfg, out_dir, batch)
    return out_dir


@contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock on building ``out_dir``; released when the process ends, however.
    Any cached build (``relaxflow.training.data`` too) takes it around its build."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    # Read-only is enough for flock, so a lock file another user made still opens.
    lock = os.open(out_dir.parent / f"{out_dir.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process to finish rendering %s", out_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def dataset_cameras(cfg: ShapeDatasetConfig, n: int, generator: torch.Generator) -> Cameras:
    """``n`` cameras drawn from the settings' orbit ranges, ``cfg.resolution`` pixels square:
    the views of the dataset (and of ``render_views``)."""
    return sample_orbit_cameras(n, cfg.resolution, cfg.resolution, cfg.elevation_range,
                                cfg.azimuth_range, cfg.distance_range, cfg.fov_range,
                                generator=generator)


def _render_rgba(splats: Splats, cameras: Cameras, background: float, batch: int) -> Tensor:
    """Views of ``splats`` on a plain ``background``, ``batch`` cameras at a time: RGB
    composited over it and alpha, ``[V, H, W, 4]`` in [0, 1]."""
    rgba = []
    for i in range(0, len(cameras), batch):
        out = render(splats, cameras[i: i + batch], background=background)
        rgba.append(torch.cat([out.rgb, out.alpha], -1).clamp(0, 1))
    return torch.cat(rgba)


@torch.no_grad()
def render_views(obj: ShapeObject, n_views: int, resolution: int, seed: int,
                 batch: int = 25) -> Tuple[Tensor, Cameras]:
    """``n_views`` views of the object from cameras drawn (from ``seed``) in the prior dataset's
    orbit ranges, on its grey background, as it renders them.

    Returns ``(rgba [V, H, W, 4] in [0, 1], cameras)``: RGB composited over the background,
    alpha the splats' coverage.
    """
    cfg = ShapeDatasetConfig(resolution=resolution)
    cameras = dataset_cameras(cfg, n_views, torch.Generator().manual_seed(seed))
    return _render_rgba(object_splats(obj), cameras, cfg.background, batch), cameras


@torch.no_grad()
def _render_and_publish(cfg: ShapeDatasetConfig, out_dir: Path, batch: int) -> None:
    """Render every object of the shape world as ``cfg`` says and publish it at ``out_dir``."""
    from safetensors.torch import save_file

    names = prompts()
    objects = prior_objects()
    gen = torch.Generator().manual_seed(cfg.seed)
    keys = ("rgb", "alpha", "prompt_index", "object_index", "elevation", "azimuth", "distance",
            "fov")
    data = {k: [] for k in keys}
    # The named objects come first, each drawing its cameras from ``gen`` in turn as before the
    # categories' variants came after them: their images stay the same.
    views = [cfg.views_per_variant if isinstance(o, CategoryObject) else cfg.views_per_object
             for o in objects]
    bar = tqdm(total=sum(views), desc="rendering the shape world", unit="view")
    for obj_index, (obj, n) in enumerate(zip(objects, views)):
        cams = dataset_cameras(cfg, n, gen)
        rgba = _render_rgba(object_splats(obj), cams, cfg.background, batch)
        bar.update(n)
        data["rgb"].append((rgba[..., :3] * 255 + 0.5).to(torch.uint8))
        data["alpha"].append((rgba[..., 3:] * 255 + 0.5).to(torch.uint8))
        data["prompt_index"].append(torch.full((n,), names.index(obj.prompt)))
        data["object_index"].append(torch.full((n,), obj_index))
        data["elevation"].append(cams.elevation)
        data["azimuth"].append(cams.azimuth)
        data["distance"].append(cams.distance)
        fov = 2 * torch.rad2deg(torch.atan(0.5 * cfg.resolution / cams.Ks[:, 1, 1]))
        data["fov"].append(fov)
    bar.close()
    tensors = {k: torch.cat(v).contiguous() for k, v in data.items()}
    meta = {"prompts": names, "objects": [o.name for o in objects],
            "object_prompts": [o.prompt for o in objects],
            "settings": canonical_settings(cfg), "fingerprint": out_dir.name}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        save_file(tensors, str(tmp / "images.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for path in (tmp, *tmp.iterdir()):  # mkdtemp's and safetensors' own modes
            share_as_created(path)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out_dir: Path, attempts: int = 3) -> None:
    """Rename the finished folder ``tmp`` to ``out_dir`` (any cached build's last step).

    A complete dataset already there (with ``meta.json``) is another process's build of the same
    data: it is kept and ``tmp`` dropped. Anything else there is a broken build (interrupted, or
    from a writer that was not atomic); it is renamed aside in one step, so no reader sees it
    half-deleted, then deleted, and the rename retried.
    """
    for _ in range(attempts):
        try:
            os.rename(tmp, out_dir)
            return
        except OSError as error:
            failure = error
        if (out_dir / "meta.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".stale"))
        try:
            os.rename(out_dir, aside / out_dir.name)
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not move the built dataset {tmp} to {out_dir} "
                  f"({failure}); delete {out_dir} and run again") from failure
