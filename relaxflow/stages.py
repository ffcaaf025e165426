"""The generator's two sampling stages and the decoding to splats.

Stage 1 samples the dense sparse-structure latent and decodes it to occupied voxels; stage 2
samples the structured latent on those voxels; the Gaussian decoder turns it into splats.
Initial noise is drawn on the CPU from the caller's generator, so a seed gives the same noise
on every device.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from cfd.scene import Splats

from .models.sparse import SparseTensor
from .sampler import FlowEulerSampler

# (model, initial noise) -> sample: a configured sampler with its conditions bound, e.g.
# ``guided(FlowEulerSampler(...), cond, neg_cond)`` or a RelaxFlow sampler with both branches.
Integrator = Callable[[Callable, Tensor], Tensor]


def guided(sampler: FlowEulerSampler, cond: Tensor, neg_cond: Tensor,
           progress: bool = False) -> Integrator:
    """Plain TRELLIS sampling of conditions ``[B, S, C]`` against their negatives."""
    return lambda model, noise: sampler.sample(model, noise, cond, neg_cond, progress=progress)


@torch.no_grad()
def sample_structure(flow_model: nn.Module, decoder: nn.Module, integrate: Integrator,
                     batch_size: int, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu") -> Tuple[Tensor, Tensor]:
    """Occupied voxels for ``batch_size`` items.

    Returns:
        ``latent [B, C, R, R, R]`` and ``coords [N, 4]`` int32 rows ``(batch, x, y, z)`` of the
        decoded grid's voxels with logit > 0.
    """
    shape = (batch_size, flow_model.in_channels) + (flow_model.resolution,) * 3
    latent = integrate(flow_model, torch.randn(shape, generator=generator).to(device))
    coords = torch.argwhere(decoder(latent) > 0)[:, [0, 2, 3, 4]].int()
    return latent, coords


def sparse_velocity(model: nn.Module, coords: Tensor, batch_size: int) -> Callable:
    """The stage-2 model as a :data:`~relaxflow.sampler.VelocityModel` over voxel features;
    guidance and branch batches repeat the voxels as items ``B..2B-1``, ``2B..3B-1``, ...;
    keyword arguments (``cond_mask``, ``relaxation``) go to the model."""

    tiles = {}  # copies -> (coords, cache): the same every step, so neighbour tables are reused

    def velocity(feats: Tensor, t: Tensor, cond: Tensor, **kwargs) -> Tensor:
        copies = feats.shape[0] // len(coords)
        if copies not in tiles:
            tiled = coords.repeat(copies, 1)
            tiled[:, 0] += torch.arange(copies, device=coords.device, dtype=coords.dtype
                                        ).repeat_interleave(len(coords)) * batch_size
            tiles[copies] = (tiled, {})
        tiled, cache = tiles[copies]
        return model(SparseTensor(feats, tiled, cache=cache), t, cond, **kwargs).feats

    return velocity


def group_by_item(coords: Tensor, batch_size: int) -> Tensor:
    """``coords [N, 4]`` sorted by item; every item must have a voxel."""
    counts = torch.bincount(coords[:, 0].long(), minlength=batch_size)
    if len(counts) != batch_size or (counts == 0).any():
        raise ValueError(f"stage 1 left items without occupied voxels (voxels per item: "
                         f"{counts.tolist()}, conditions: {batch_size}); try another seed or "
                         "check the conditioning image")
    return coords[torch.argsort(coords[:, 0].long(), stable=True)]


@torch.no_grad()
def sample_latent(flow_model: nn.Module, integrate: Integrator, coords: Tensor, batch_size: int,
                  normalization: Optional[Dict[str, Sequence[float]]] = None,
                  generator: Optional[torch.Generator] = None) -> SparseTensor:
    """The structured latent on ``coords [N, 4]`` (from stage 1, grouped by item with
    :func:`group_by_item`), undone from the training normalisation ``{"mean": [C], "std": [C]}``
    when given."""
    noise = torch.randn(len(coords), flow_model.in_channels, generator=generator)
    feats = integrate(sparse_velocity(flow_model, coords, batch_size), noise.to(coords.device))
    if normalization is not None:
        feats = (feats * feats.new_tensor(normalization["std"])
                 + feats.new_tensor(normalization["mean"]))
    return SparseTensor(feats, coords)


@torch.no_grad()
def decode_splats(decoder: nn.Module, latent: SparseTensor) -> List[Splats]:
    """One :class:`Splats` per item from the Gaussian decoder."""
    return decoder.to_splats(decoder(latent), latent.coords)
