"""The generator's two sampling stages and the decoding to splats.

Stage 1 samples the dense sparse-structure latent and decodes it to occupied voxels; stage 2
samples the structured latent on those voxels; the Gaussian decoder turns it into splats.
Initial noise is drawn on the CPU from the caller's generator, so a seed gives the same noise
on every device.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from cfd.scene import Splats

from .models.sparse import SparseTensor
from .sampler import FlowEulerSampler


@torch.no_grad()
def sample_structure(flow_model: nn.Module, decoder: nn.Module, sampler: FlowEulerSampler,
                     cond: Tensor, neg_cond: Tensor, generator: Optional[torch.Generator] = None,
                     progress: bool = False) -> Tuple[Tensor, Tensor]:
    """Occupied voxels for a batch of conditions.

    Args:
        cond, neg_cond: condition tokens ``[B, S, cond_channels]`` (TRELLIS: DINOv2 tokens and
            zeros, or CLIP tokens and the empty prompt's).
    Returns:
        ``latent [B, C, R, R, R]`` and ``coords [N, 4]`` int32 rows ``(batch, x, y, z)`` of the
        decoded grid's voxels with logit > 0.
    """
    shape = (cond.shape[0], flow_model.in_channels) + (flow_model.resolution,) * 3
    noise = torch.randn(shape, generator=generator).to(cond.device)
    latent = sampler.sample(flow_model, noise, cond, neg_cond, progress=progress)
    coords = torch.argwhere(decoder(latent) > 0)[:, [0, 2, 3, 4]].int()
    return latent, coords


def _sparse_velocity(model: nn.Module, coords: Tensor, batch_size: int):
    """The stage-2 model as a :data:`~relaxflow.sampler.VelocityModel` over voxel features;
    doubled guidance batches repeat the voxels as items ``B..2B-1``."""

    def velocity(feats: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        copies = feats.shape[0] // len(coords)
        tiled = coords.repeat(copies, 1)
        tiled[:, 0] += torch.arange(copies, device=coords.device,
                                    dtype=coords.dtype).repeat_interleave(len(coords)) * batch_size
        return model(SparseTensor(feats, tiled), t, cond).feats

    return velocity


@torch.no_grad()
def sample_latent(flow_model: nn.Module, sampler: FlowEulerSampler, coords: Tensor,
                  cond: Tensor, neg_cond: Tensor,
                  normalization: Optional[Dict[str, Sequence[float]]] = None,
                  generator: Optional[torch.Generator] = None,
                  progress: bool = False) -> SparseTensor:
    """The structured latent on ``coords [N, 4]`` (stage 1's output, grouped by item), undone
    from the training normalisation ``{"mean": [C], "std": [C]}`` when given."""
    counts = torch.bincount(coords[:, 0].long(), minlength=cond.shape[0])
    if len(counts) != cond.shape[0] or (counts == 0).any():
        raise ValueError(f"stage 1 left items without occupied voxels (voxels per item: "
                         f"{counts.tolist()}, conditions: {cond.shape[0]}); try another seed or "
                         "check the conditioning image")
    coords = coords[torch.argsort(coords[:, 0].long(), stable=True)]
    noise = torch.randn(len(coords), flow_model.in_channels, generator=generator).to(cond.device)
    velocity = _sparse_velocity(flow_model, coords.to(cond.device), cond.shape[0])
    feats = sampler.sample(velocity, noise, cond, neg_cond, progress=progress)
    if normalization is not None:
        feats = (feats * feats.new_tensor(normalization["std"])
                 + feats.new_tensor(normalization["mean"]))
    return SparseTensor(feats, coords.to(cond.device))


@torch.no_grad()
def decode_splats(decoder: nn.Module, latent: SparseTensor) -> List[Splats]:
    """One :class:`Splats` per item from the Gaussian decoder."""
    return decoder.to_splats(decoder(latent), latent.coords)
