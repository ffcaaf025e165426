"""The jobs: one module per command, each a typed ``Config`` and a ``run(cfg)`` (a resumable one
also ``resume(run_folder)``). ``run.py`` dispatches from :data:`JOBS`; the libraries below
(``cfd/``, ``relaxflow/``, ``guidance/``, ``core/``) never import a job.

A job module is imported when its job runs, so a command loads only what it uses.
"""

from __future__ import annotations

import importlib
from types import ModuleType

JOBS = {
    "distill": "jobs.distill",  # CFD / SDS of a prompt into splats or a NeRF (resumable)
    "fit-splats": "jobs.fit_splats",  # a photometric fit of a known object (renderer demo)
    "generate": "jobs.generate",  # TRELLIS: an image or a prompt to splats
    "relaxflow": "jobs.relaxflow",  # RelaxFlow: complete an occluded object
    "refine": "jobs.refine",  # RelaxFlow, then CFD on its completion
    "study": "jobs.study",  # methods x prompts x seeds of the jobs above, and their report
    "train-generator": "jobs.train_generator",  # TRELLIS-architecture training (resumable)
}


def load(name: str) -> ModuleType:
    """The module of job ``name`` (a key of :data:`JOBS`)."""
    return importlib.import_module(JOBS[name])


def resumable(module: ModuleType) -> bool:
    return hasattr(module, "resume")
