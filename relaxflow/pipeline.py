"""A TRELLIS pipeline folder's models, held one stage at a time.

    pipe = TrellisPipeline.from_pretrained("microsoft/TRELLIS-image-large", device="cuda")
    with pipe.stage("structure") as models:
        flow, decoder = models["sparse_structure_flow_model"], models["sparse_structure_decoder"]

``offload`` chooses what happens between stages:

* ``"reload"`` (default): a stage's models are read from disk when it starts and released when it
  ends: the least memory (one stage's weights), for single runs;
* ``"cpu"``: every model stays in CPU memory and moves to the device for its stage: for repeated
  runs on small GPUs (8-12 GB);
* ``"none"``: every model stays on the device after first use: the fastest repeated runs.

A folder whose ``pipeline.json`` names only stage 1's models (a generator whose later stages are
not trained yet) is a pipeline with that stage only: ``pipe.stages`` says which it has.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from enum import Enum
from typing import Dict, Iterator, Tuple, Union

import torch
from torch import nn

from core.devices import Precision, half_dtype
from core.errors import UserError, as_choice

from .loading import STAGES, PipelineSpec, check_pipeline_files, load_model


class Offload(Enum):
    reload = "reload"
    cpu = "cpu"
    none = "none"


class TrellisPipeline:
    """``precision``: of the models' fp16-capable torsos (``core.devices``: ``auto`` is float16
    on CUDA, float32 on the CPU)."""

    def __init__(self, spec: PipelineSpec, device: Union[str, torch.device] = "cpu",
                 precision: Union[Precision, str] = Precision.auto,
                 offload: Union[Offload, str] = Offload.reload):
        offload = as_choice(Offload, offload, "offload")
        for stage in spec.stages:
            for key in STAGES[stage]:
                if key not in spec.models:
                    raise UserError(f"{spec.root}/pipeline.json names no '{key}' model "
                                    f"(needed by the {stage} stage)")
        self.spec, self.device = spec, torch.device(device)
        self.half_dtype, self.offload = half_dtype(self.device, precision), offload
        self._held: Dict[str, nn.Module] = {}

    @classmethod
    def from_pretrained(cls, path_or_repo: Union[str, os.PathLike], **kwargs) -> "TrellisPipeline":
        """The pipeline of a folder or cached repo id, the files of every stage it has checked
        first (a missing or damaged one is an error now, not when its stage starts)."""
        return cls(check_pipeline_files(path_or_repo), **kwargs)

    @property
    def stages(self) -> Tuple[str, ...]:
        """The stages this pipeline has, in running order: ``("structure", "latent",
        "decode")`` for a released one, ``("structure",)`` for one with stage 1 only."""
        return self.spec.stages

    def sampler(self, stage: str):
        """``pipeline.json``'s sampler settings of ``"structure"`` or ``"latent"``."""
        return self.spec.samplers[{"structure": "sparse_structure_sampler",
                                   "latent": "slat_sampler"}[stage]]

    def _model(self, key: str) -> nn.Module:
        if key in self._held:
            return self._held[key].to(self.device)
        home = torch.device("cpu") if self.offload is Offload.cpu else self.device
        model = load_model(self.spec.root, self.spec.models[key], home, self.half_dtype)
        if self.offload is not Offload.reload:
            self._held[key] = model
        return model.to(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[Dict[str, nn.Module]]:
        """The models of stage ``name`` on the device, for the ``with`` block; a stage the
        pipeline does not have is a :class:`UserError` naming it and the folder."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        if name not in self.stages:
            raise self.spec.absent_stage(name)
        models = {key: self._model(key) for key in STAGES[name]}
        try:
            yield models
        finally:
            if self.offload is Offload.cpu:
                for model in models.values():
                    model.to("cpu")
            models.clear()
            if self.device.type == "cuda" and self.offload is not Offload.none:
                torch.cuda.empty_cache()


class Stopwatch:
    """Wall times of the named parts of a run, ``{"<name>_s": seconds}``. On CUDA it waits for
    the part's kernels before reading the clock, so each part is charged its own work."""

    def __init__(self, device: Union[str, torch.device]):
        self.device = torch.device(device)
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[f"{name}_s"] = time.perf_counter() - start
