"""TRELLIS-compatible models in plain PyTorch, built from a checkpoint json's ``name`` and ``args``.

    model = build("SparseStructureFlowModel", args, device="meta")   # full size, instantly

Class names and argument names are the released ones, so ``ckpts/<model>.json`` builds the model
that ``ckpts/<model>.safetensors`` loads into with strict key matching.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from core.devices import torso_dtype

from .gaussian_decoder import SLatGaussianDecoder
from .sparse_structure_flow import SparseStructureFlowModel
from .sparse_structure_vae import SparseStructureDecoder, SparseStructureEncoder
from .structured_latent_encoder import SLatEncoder
from .structured_latent_flow import SLatFlowModel

MODELS: Dict[str, type] = {
    "SparseStructureFlowModel": SparseStructureFlowModel,
    "SparseStructureDecoder": SparseStructureDecoder,
    "SparseStructureEncoder": SparseStructureEncoder,
    "SLatFlowModel": SLatFlowModel,
    "ElasticSLatFlowModel": SLatFlowModel,  # its elasticity is a training-time memory option
    "SLatGaussianDecoder": SLatGaussianDecoder,
    "ElasticSLatGaussianDecoder": SLatGaussianDecoder,
    "SLatEncoder": SLatEncoder,
    "ElasticSLatEncoder": SLatEncoder,
}


def build(name: str, args: Dict[str, Any], device: Union[str, torch.device] = "cpu",
          half_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model class ``name`` with ``args``, its parameters created on ``device``.

    ``half_dtype`` (float16 or bfloat16) runs the torso of a model whose args say ``use_fp16``
    in that precision; by default ``core.devices.torso_dtype(device)``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model class {name!r}; known: {', '.join(sorted(MODELS))}")
    device = torch.device(device)
    with device:
        model = MODELS[name](**args)
    half_dtype = half_dtype or torso_dtype(device)
    if args.get("use_fp16") and half_dtype is not None:
        model.set_torso_dtype(half_dtype)
    return model.eval()


__all__ = ["MODELS", "build", "SparseStructureFlowModel", "SparseStructureDecoder",
           "SparseStructureEncoder", "SLatEncoder", "SLatFlowModel", "SLatGaussianDecoder"]
