"""The TRELLIS stage runner the ``generate`` and ``relaxflow`` jobs share.

Each function runs one stage of a :class:`TrellisPipeline` for one or several *branches* (named
integrators: plain TRELLIS sampling, or RelaxFlow's and its two single branches), holding that
stage's models only inside it, timing each branch with a :class:`Stopwatch`. Each branch draws
its noise from its own generator through both stages, so branches started from one seed share
their noise.

    coords, resolution = sample_structures(pipe, lambda flow: {"plain": integrate}, gens, dev, clock)
    latents = sample_latents(pipe, {"plain": integrate}, coords, gens, clock)
    splats, per_voxel = decode(pipe, latents)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from cfd.scene import Splats
from cfd.utils.media import save_image
from core.errors import UserError

from .models.sparse import SparseTensor
from .pipeline import Stopwatch, TrellisPipeline
from .stages import Integrator, decode_splats, group_by_item, sample_latent, sample_structure

Branches = Dict[str, Integrator]


def sample_structures(pipe: TrellisPipeline, branches: Callable[[nn.Module], Branches],
                      generators: Dict[str, torch.Generator], device: torch.device,
                      clock: Stopwatch) -> Tuple[Dict[str, Tensor], int]:
    """Stage 1 of each branch: its occupied voxels ``[N, 4]`` (item, x, y, z) and the grid's
    resolution. ``branches(flow_model)`` makes the integrators (a relaxation needs the flow
    model's token grid)."""
    with pipe.stage("structure") as m:
        flow, decoder = m["sparse_structure_flow_model"], m["sparse_structure_decoder"]
        coords = {}
        for name, integrate in branches(flow).items():
            with clock.time(f"structure_{name}"):
                voxels = sample_structure(flow, decoder, integrate, 1, generators[name],
                                          device)[1]
                coords[name] = group_by_item(voxels, 1)
        return coords, flow.resolution * decoder.upsample_factor


def sample_latents(pipe: TrellisPipeline, branches: Branches, coords: Dict[str, Tensor],
                   generators: Dict[str, torch.Generator],
                   clock: Stopwatch) -> Dict[str, SparseTensor]:
    """Stage 2 of each branch on its own voxels."""
    with pipe.stage("latent") as m:
        latents = {}
        for name, integrate in branches.items():
            with clock.time(f"latent_{name}"):
                latents[name] = sample_latent(m["slat_flow_model"], integrate, coords[name], 1,
                                              pipe.spec.slat_normalization, generators[name])
        return latents


def decode(pipe: TrellisPipeline,
           latents: Dict[str, SparseTensor]) -> Tuple[Dict[str, Splats], int]:
    """Each branch's splats, and the decoder's splats per voxel (they come in voxel order)."""
    with pipe.stage("decode") as m:
        decoder = m["slat_decoder_gs"]
        return ({name: decode_splats(decoder, latent)[0] for name, latent in latents.items()},
                decoder.num_gaussians)


def save_voxels(run_dir: Path, coords: Tensor, resolution: int,
                visibility: Optional[Tensor] = None) -> None:
    """``occupancy.npz`` (``coords [N, 3]`` int16 at ``resolution``, and each voxel's
    ``visibility`` when given) and a picture: ``occupancy.png``, or ``visibility.png`` with
    the visibilities; three axis-aligned projections side by side."""
    cells = coords[:, 1:].cpu().numpy().astype(np.int16)
    arrays = {"coords": cells, "resolution": resolution}
    values = None
    if visibility is not None:
        values = arrays["visibility"] = visibility.cpu().numpy()
    np.savez_compressed(run_dir / "occupancy.npz", **arrays)
    save_image(voxel_projections(cells, resolution, values),
               run_dir / ("occupancy.png" if values is None else "visibility.png"))


def load_voxels(path: Path, resolution: int) -> Tensor:
    """The voxels ``[N, 4]`` int32 (item 0, x, y, z; sorted, no repeats, as stage 1 gives them)
    of an ``occupancy.npz`` as :func:`save_voxels` writes it, checked against the
    ``resolution`` of the pipeline that will fill them."""
    if not path.is_file():
        raise UserError(f"structure: {path} does not exist; give the occupancy.npz of a "
                        "generate run (or any file with coords [N, 3] and resolution)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"structure: {path} is not a NumPy .npz archive; give the occupancy.npz "
                        "of a generate run")
    with data:
        missing = [key for key in ("coords", "resolution") if key not in data.files]
        if missing:
            raise UserError(f"structure: {path} has no {' and no '.join(missing)}; an "
                            "occupancy.npz holds coords [N, 3] and resolution")
        cells, saved = np.asarray(data["coords"]), int(data["resolution"])
    if saved != resolution:
        raise UserError(f"structure: {path} is at resolution {saved}, the pipeline's grid is "
                        f"{resolution}; give voxels at {resolution}")
    if cells.ndim != 2 or cells.shape[1] != 3 or len(cells) == 0:
        raise UserError(f"structure: {path} holds coords of shape {list(cells.shape)}, not a "
                        "non-empty [N, 3]")
    if cells.min() < 0 or cells.max() >= resolution:
        raise UserError(f"structure: {path} has cells outside [0, {resolution})")
    cells = torch.from_numpy(np.unique(cells.astype(np.int64), axis=0))
    return torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells], dim=1).int()


def voxel_projections(cells, resolution: int, values=None) -> Tensor:
    """A picture of voxels ``cells [N, 3]`` (cells at ``resolution``; ``values [N]`` in [0, 1],
    default 1): the grid's maximum along x, y and z side by side, ``[R, 3R, 3]`` float."""
    cells = np.asarray(cells, dtype=np.int64)
    grid = np.zeros((resolution,) * 3, dtype=np.float32)
    grid[tuple(cells.T)] = 1.0 if values is None else values
    views = [grid.max(axis=a) for a in (0, 1, 2)]
    return torch.from_numpy(np.concatenate(views, axis=1))[..., None].expand(-1, -1, 3)
