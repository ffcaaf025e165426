"""Meshes from a density field: marching cubes, vertex colours, ``.obj`` and ``.glb`` files.

The threshold defaults to one read off the field itself: each grid cell's opacity
``1 - exp(-density * cell size)`` splits into empty and occupied cells, and Otsu's rule (the
split that maximises the between-class variance of the opacity histogram) picks the level. A
fixed density threshold suits one scene scale and not the next; this one follows the field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from core.errors import UserError
from core.runtime import atomic_write


@dataclass
class Mesh:
    vertices: np.ndarray  # [V,3] float32, world
    faces: np.ndarray  # [F,3] int64, counter-clockwise seen from outside
    colours: Optional[np.ndarray] = None  # [V,3] float32 in [0,1]


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """The level that best splits ``values`` in [0, 1] into two classes (Otsu)."""
    hist = torch.histc(values.float().clamp(0, 1), bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) / bins
    weight_low = hist.cumsum(0)
    weight_high = hist.sum() - weight_low
    mean_low = (hist * centres).cumsum(0) / weight_low.clamp(min=1e-12)
    mean_high = ((hist * centres).sum() - (hist * centres).cumsum(0)) / weight_high.clamp(min=1e-12)
    between = (weight_low * weight_high * (mean_low - mean_high) ** 2)[:-1]
    # Empty bins between the classes make a plateau of equal splits: take its middle, not its
    # first bin, so the level sits between the classes rather than against the empty one.
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).squeeze(1)
    return float((best[len(best) // 2] + 1) / bins)


def in_chunks(fn: Callable[[Tensor], Tensor], points: Tensor, chunk: int = 65536) -> Tensor:
    """``fn`` over ``points [N,3]`` a chunk at a time, concatenated (bounded temporaries)."""
    return torch.cat([fn(points[i:i + chunk]) for i in range(0, len(points), chunk)])


@torch.no_grad()
def density_grid(density_fn: Callable[[Tensor], Tensor], radius: float, resolution: int,
                 device="cpu", chunk: int = 65536) -> Tensor:
    """``density_fn`` sampled on ``resolution^3`` points spanning ``[-radius, radius]^3``,
    ``[R,R,R]`` indexed (x, y, z), ``chunk`` points at a time.

    Each chunk's points are made from their flat indices, so beside the grid itself memory
    holds one chunk, not all ``R^3`` points (12 bytes each: 200 MB at R = 256)."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    n = resolution ** 3
    values = None
    for start in range(0, n, chunk):
        index = torch.arange(start, min(start + chunk, n), device=device)
        ijk = torch.stack([index // resolution ** 2, index // resolution % resolution,
                           index % resolution], -1)
        density = density_fn(axis[ijk])
        if values is None:  # the field's dtype, known once it answers
            values = density.new_empty(n)
        values[start:start + len(index)] = density
    return values.reshape(resolution, resolution, resolution)


def surface_density(grid: Tensor, cell: float) -> float:
    """The density where a field's surface lies, read off the field (module docstring): Otsu's
    level of the cells' opacities ``1 - exp(-density * cell)``, as a density.

    Args:
        grid: densities ``[R,R,R]`` (finite) sampled ``cell`` world units apart.
    """
    level = otsu_threshold((1 - torch.exp(-grid * cell)).flatten())
    return -math.log(1 - min(level, 1 - 1e-6)) / cell


def extract_mesh(field, resolution: int = 128, threshold: Optional[float] = None) -> Mesh:
    """Iso-surface of a field's density (``field.query``, ``field.cfg.radius``) on a
    ``resolution^3`` grid (at least 2 per axis).

    ``threshold``: a density; None picks it from the opacity distribution (module docstring).
    The grid is padded with empty cells so the surface closes at the box. A density of NaN
    anywhere, or no surface at the threshold, is a ``ValueError``.
    """
    import mcubes

    check_mesh_resolution(resolution)
    radius = field.cfg.radius
    grid = density_grid(lambda p: field.query(p)[0], radius, resolution, field.device)
    nan = int(torch.isnan(grid).sum())
    if nan:
        raise ValueError(f"the field's density is NaN at {nan} of {grid.numel()} grid points, "
                         "so it has no surface to mesh; the field diverged (lower the learning "
                         "rates)")
    # An infinite density is an overflowed, very large one; marching cubes would interpolate
    # NaN vertices from it, and the largest finite value puts the surface where inf would.
    grid = torch.nan_to_num(grid)
    cell = 2 * radius / (resolution - 1)
    if threshold is None:
        threshold = surface_density(grid, cell)
    padded = np.pad(grid.cpu().numpy().astype(np.float64), 1, constant_values=0.0)
    vertices, faces = mcubes.marching_cubes(padded, float(threshold))
    if not len(faces):
        raise ValueError(f"no surface at density threshold {threshold:.4g}: nothing to mesh, "
                         f"as the density on the {resolution}^3 grid spans "
                         f"[{grid.min().item():.4g}, {grid.max().item():.4g}] (and 0 outside "
                         "the box); set mesh_threshold inside that range, or train longer")
    vertices = ((vertices - 1) * cell - radius).astype(np.float32)
    faces = faces.astype(np.int64)  # counter-clockwise seen from the low-density side
    with torch.no_grad():
        points = torch.from_numpy(vertices).to(field.device)
        colours = in_chunks(lambda p: field.query(p)[1], points)
    return Mesh(vertices, faces, colours.float().cpu().numpy())


def check_mesh_resolution(resolution: int) -> None:
    """Refuse a marching-cubes grid of fewer than 2 points per axis (``mesh_resolution``)."""
    if resolution < 2:
        raise UserError(f"mesh_resolution must be >= 2, got {resolution}: marching cubes needs "
                        "at least 2 grid points per axis (the default is 128)")


def srgb_to_linear(colours: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (the inverse sRGB transfer function)."""
    return np.where(colours <= 0.04045, colours / 12.92, ((colours + 0.055) / 1.055) ** 2.4)


def write_obj(mesh: Mesh, path) -> None:
    """Wavefront OBJ with per-vertex colours (``v x y z r g b``), 1-based faces.

    The colours are written as rendered, sRGB-encoded: OBJ's vertex colours are an informal
    extension that viewers (MeshLab, Blender) show as stored, with no conversion."""
    lines = []
    for i, v in enumerate(mesh.vertices):
        c = "" if mesh.colours is None else " %.4f %.4f %.4f" % tuple(mesh.colours[i])
        lines.append("v %.6f %.6f %.6f%s" % (v[0], v[1], v[2], c))
    lines += ["f %d %d %d" % tuple(f + 1) for f in mesh.faces]
    data = ("\n".join(lines) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


def write_glb(mesh: Mesh, path) -> None:
    """Binary glTF 2.0: one mesh with POSITION, COLOR_0 (when coloured) and uint32 indices.
    glTF is y-up; the engine is z-up, so points are turned (x, y, z) -> (x, z, -y). The
    colours (sRGB, as rendered) are stored linear, as glTF defines COLOR_0, so a viewer shows
    the rendered colours. An empty mesh, or NaN/Inf in it, is a ``ValueError`` (glTF has no
    form for either)."""
    if not len(mesh.vertices) or not len(mesh.faces):
        raise ValueError(f"cannot write an empty mesh ({len(mesh.vertices)} vertices, "
                         f"{len(mesh.faces)} faces) to {path}: glTF accessors hold at least one "
                         "element")
    for name, values in (("vertices", mesh.vertices), ("colours", mesh.colours)):
        if values is not None and not np.isfinite(values).all():
            raise ValueError(f"the mesh's {name} hold NaN or Inf, which glTF cannot store; "
                             "mesh a field with a finite density and colour")
    positions = np.stack([mesh.vertices[:, 0], mesh.vertices[:, 2], -mesh.vertices[:, 1]], -1)
    blobs = [positions.astype("<f4").tobytes()]
    if mesh.colours is not None:
        blobs.append(srgb_to_linear(mesh.colours.clip(0, 1)).astype("<f4").tobytes())
    blobs.append(mesh.faces.astype("<u4").tobytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    views = [{"buffer": 0, "byteOffset": offsets[i], "byteLength": len(b)}
             for i, b in enumerate(blobs)]
    accessors = [{"bufferView": 0, "componentType": 5126, "count": len(positions),
                  "type": "VEC3", "min": positions.min(0).tolist(),
                  "max": positions.max(0).tolist()}]
    attributes = {"POSITION": 0}
    if mesh.colours is not None:
        accessors.append({"bufferView": 1, "componentType": 5126, "count": len(positions),
                          "type": "VEC3"})
        attributes["COLOR_0"] = 1
    accessors.append({"bufferView": len(blobs) - 1, "componentType": 5125,
                      "count": int(mesh.faces.size), "type": "SCALAR"})
    gltf = {"asset": {"version": "2.0", "generator": "cfd3d"}, "scene": 0,
            "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
            "meshes": [{"primitives": [{"attributes": attributes,
                                        "indices": len(accessors) - 1}]}],
            "accessors": accessors, "bufferViews": views,
            "buffers": [{"byteLength": offsets[-1]}]}
    text = json.dumps(gltf, allow_nan=False).encode()
    text += b" " * (-len(text) % 4)
    binary = b"".join(blobs)
    binary += b"\0" * (-len(binary) % 4)
    chunks = (struct.pack("<II", len(text), 0x4E4F534A) + text
              + struct.pack("<II", len(binary), 0x004E4942) + binary)
    data = struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks
    atomic_write(Path(path), lambda f: f.write(data))


def read_glb(path) -> Tuple[dict, bytes]:
    """The JSON and binary chunks of a ``.glb`` (for checks and tools)."""
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != 0x46546C67 or version != 2 or length != len(data):
        raise ValueError(f"{path} is not a glTF 2.0 binary")
    json_len, _ = struct.unpack_from("<II", data, 12)
    gltf = json.loads(data[20:20 + json_len])
    bin_len, _ = struct.unpack_from("<II", data, 20 + json_len)
    return gltf, data[28 + json_len:28 + json_len + bin_len]
