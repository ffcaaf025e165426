"""``.ply`` files in the standard 3D Gaussian Splatting layout.

One vertex element with float32 properties, in this order: ``x y z nx ny nz f_dc_0..2
f_rest_0..(3*(K-1)-1) opacity scale_0..2 rot_0..3``. Values are pre-activation (log-scales,
opacity logits, raw wxyz quaternions). ``f_rest`` is channel-major: all coefficients of red, then
green, then blue. Splat viewers (SuperSplat, the Inria viewer, gsplat's exporter) read this layout.
Extra per-splat float properties (a RelaxFlow completion's ``visibility``) follow the standard
ones; viewers ignore them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from core.errors import InputFileError, UserError
from core.runtime import atomic_write


def ply_property_names(sh_degree: int) -> list[str]:
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def write_ply(params: Dict[str, torch.Tensor], sh_degree: int, path,
              extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write splat parameters (pre-activation, under gsplat's keys: ``means [N,3]``,
    ``scales [N,3]``, ``quats [N,4]``, ``opacities [N]``, ``sh0 [N,1,3]``, ``shN [N,K-1,3]``)
    atomically (a temporary file renamed into place), with ``extra`` per-splat values
    ``{name: [N]}`` as additional properties."""
    p = {k: v.detach().cpu().float() for k, v in params.items()}
    N = p["means"].shape[0]
    extra = extra or {}
    names = ply_property_names(sh_degree)
    for name, values in extra.items():
        if name in names or values.shape != (N,):
            raise ValueError(f"extra ply property {name!r} must be a new name with one value "
                             f"per splat ({N}), got shape {tuple(values.shape)}")
    n_rest = p["shN"].shape[1]
    f_rest = p["shN"].transpose(1, 2).reshape(N, 3 * n_rest)  # [N, 3*(K-1)], channel-major
    columns = torch.cat(
        [p["means"], torch.zeros(N, 3), p["sh0"].reshape(N, 3), f_rest,
         p["opacities"][:, None], p["scales"], p["quats"]],
        dim=1,
    ).numpy()
    vertices = np.empty(N, dtype=[(name, "f4") for name in names + list(extra)])
    for i, name in enumerate(names):
        vertices[name] = columns[:, i]
    for name, values in extra.items():
        vertices[name] = values.detach().cpu().float().numpy()
    atomic_write(path, PlyData([PlyElement.describe(vertices, "vertex")]).write)


def read_ply(path) -> Tuple[Dict[str, torch.Tensor], int]:
    """A 3DGS-layout ``.ply``'s splat parameters (as :func:`write_ply` takes them) and SH degree,
    which follows from the number of ``f_rest`` fields."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"no .ply file at {path}")
    try:
        data = PlyData.read(str(path))
        vertex = data["vertex"]
    except Exception as err:
        raise UserError(f"{path} is not a readable .ply with a 'vertex' element: {err}") from err
    names = [prop.name for prop in vertex.properties]
    n_rest = sum(name.startswith("f_rest_") for name in names)
    degree = int(round(((n_rest // 3) + 1) ** 0.5)) - 1
    if n_rest % 3 or (degree + 1) ** 2 - 1 != n_rest // 3 or not 0 <= degree <= 3:
        raise UserError(f"{path}: {n_rest} f_rest fields do not match an SH degree 0..3")
    missing = [n for n in ply_property_names(degree) if n not in names and not n.startswith("n")]
    if missing:
        raise UserError(f"{path} is not in the 3D Gaussian Splatting layout; missing {missing}")

    def cols(keys):
        return torch.from_numpy(np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], 1))

    N = len(vertex.data)
    shN = torch.zeros(N, 0, 3)
    if n_rest:  # channel-major on file: [N, 3, K-1]
        rest = cols([f"f_rest_{i}" for i in range(n_rest)])
        shN = rest.reshape(N, 3, n_rest // 3).transpose(1, 2)
    params = {
        "means": cols(["x", "y", "z"]),
        "sh0": cols([f"f_dc_{i}" for i in range(3)]).reshape(N, 1, 3),
        "shN": shN,
        "opacities": cols(["opacity"])[:, 0],
        "scales": cols([f"scale_{i}" for i in range(3)]),
        "quats": cols([f"rot_{i}" for i in range(4)]),
    }
    return params, degree


def read_ply_property(path, name: str) -> torch.Tensor:
    """One per-splat property of a ``.ply`` (e.g. ``visibility``), ``[N]`` float32."""

    vertex = PlyData.read(str(path))["vertex"]
    names = [prop.name for prop in vertex.properties]
    if name not in names:
        raise UserError(f"{path} has no per-splat {name!r} property; it has {names}")
    return torch.from_numpy(np.asarray(vertex[name], dtype=np.float32))
