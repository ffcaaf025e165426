"""Devices and precisions: one vocabulary for every job, decided in one place.

``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:<index>``.
``precision`` of the models whose weights are half precision (TRELLIS's torsos, diffusers
pipelines): ``auto`` is float16 on CUDA and float32 on the CPU (CPU kernels for float16 are slow
or missing), or one of ``float16``, ``bfloat16``, ``float32`` explicitly.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional, Union

import torch

from .errors import UserError


class Precision(Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def resolve_device(name: Union[str, torch.device], key: str = "device") -> torch.device:
    """The torch device a ``device`` setting names, refused (naming ``key``) when this machine
    lacks it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"{key}={name!r} is not a device (auto, cpu, cuda, cuda:1): "
                        f"{err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but this machine has no usable CUDA device; set "
                        f"{key}=cpu or {key}=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s); pick one of them or set {key}=auto")
    return device


def half_dtype(device: Union[str, torch.device],
               precision: Union[Precision, str] = Precision.auto) -> torch.dtype:
    """The dtype half-precision weights run in on ``device``: see the module docstring."""
    precision = Precision(precision)
    if precision is Precision.auto:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, precision.value)


def model_dtype(device: Union[str, torch.device], half_precision: bool = True) -> torch.dtype:
    """A diffusers prior's dtype: ``half_dtype`` under ``auto`` when ``half_precision`` is set,
    float32 otherwise."""
    return half_dtype(device) if half_precision else torch.float32


def torso_dtype(device: Union[str, torch.device],
                precision: Union[Precision, str, None] = Precision.auto) -> Optional[torch.dtype]:
    """The dtype of a TRELLIS model's fp16-capable torso (its ``use_fp16`` blocks); None keeps
    them in float32."""
    dtype = half_dtype(device, precision or Precision.auto)
    return None if dtype == torch.float32 else dtype
