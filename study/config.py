"""The typed configuration of a study: its methods, prompts, seeds, executor and metrics.

Load it like a job's config: ``cfd.config.load_config(StudyConfig, path, overrides)`` (strict
keys; ``executor`` is checked against :class:`ExecutorKind`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING


class ExecutorKind(Enum):
    """Where a study's runs execute."""

    local = "local"  # parallel subprocesses on this machine
    ray = "ray"  # one Ray task per run, each launching the run's subprocess on its node


@dataclass
class JobKeys:
    """Where a job's config takes the prompt, the seed and the output folder (dotted keys).
    The defaults are the distill job's."""

    prompt: str = "prompt_processor.prompt"
    seed: str = "seed"
    output_dir: str = "output_dir"


@dataclass
class MethodConfig:
    """One method of a study: a job config file (relative to ``workdir``) and overrides that
    every run of the method gets before its prompt, seed and output folder."""

    name: str = MISSING
    config: str = MISSING
    overrides: List[str] = field(default_factory=list)
    job_keys: JobKeys = field(default_factory=JobKeys)
    # What the study's scoring multiplies the run's saved splats by (about the origin) to bring
    # them into the frame of the ground truth and of the other methods: 1 for the distill and
    # refine jobs, whose scenes are the world's; the embedded generator's box is the world
    # scaled by cfd.shapes.GENERATOR_SCALE, so its generate runs take 1 / 0.625 = 1.6.
    scene_scale: float = 1.0


@dataclass
class RayConfig:
    """The Ray executor. ``address``: ``auto`` (the cluster this node belongs to), a
    ``ray://host:10001`` client address, a ``host:port`` GCS address, or null to start a local
    cluster in the driver (a process that already called ``ray.init`` keeps its connection).
    ``num_cpus`` (null: ``threads_per_run``) and ``num_gpus`` are what each run's task reserves;
    ``max_retries``: how often Ray reruns a task whose worker died (the rerun resumes the run
    from its checkpoint)."""

    address: Optional[str] = None
    num_cpus: Optional[float] = None
    num_gpus: float = 0.0
    max_retries: int = 3


@dataclass
class ScoringConfig:
    """Metrics the study computes itself from each finished run's saved scene (``splats.ply`` or
    ``nerf.safetensors``), beside the ``metrics`` its runs report (``study.scoring``).

    ``geometry``: the Chamfer distance and F-score at ``f_score_tau`` (world units; the shape
    world's objects span about 1.6) of ``surface_points`` points on the run's surface against
    the same number on its prompt's ground truth, the variant and turn about the up axis (in
    ``rotation_step_deg`` steps) that is nearest; embedded-testbed prompts only. A NeRF's
    surface is the boundary of its density thresholded on a ``nerf_grid``^3 grid.
    ``diversity``: per method and prompt, over the seeds, how many of the prompt's variants the
    runs reached (each run's nearest one) and the mean Chamfer distance between two seeds'
    surfaces (implies the geometry scoring).
    ``clip_model`` / ``dinov2_model``: local folders (or hub ids already in the cache; nothing
    is downloaded) of a CLIP and a DINOv2 model; with CLIP, each run's CLIP score and CLIP
    R-precision (among the study's prompts) over ``views`` renders on an orbit at
    ``view_resolution``; with DINOv2, per method, the Fréchet distance between the DINOv2
    features of all its runs' renders and those of the ground truth's renders (every variant of
    every study prompt, same orbit). ``export_gpteval3d``: also write each run's renders in
    GPTEval3D's layout into ``<study>/gpteval3d/<method>/<prompt index>/<seed>/``
    (``export_views`` views at ``export_resolution``; GPTEval3D's own are 120 at 512).
    ``device``: where scoring renders and runs the models.
    """

    geometry: bool = False
    diversity: bool = False
    surface_points: int = 5000
    f_score_tau: float = 0.05
    rotation_step_deg: float = 10.0
    nerf_grid: int = 96
    clip_model: Optional[str] = None
    dinov2_model: Optional[str] = None
    views: int = 8
    view_resolution: int = 128
    export_gpteval3d: bool = False
    export_views: int = 120
    export_resolution: int = 512
    device: str = "cpu"


@dataclass
class StudyConfig:
    """A study: one run per (method, prompt, seed), in ``<output_dir>/<name>/runs/<method>/
    <prompt slug>/seed<k>/``, then ``results.csv``, ``report.md``, ``report.html`` and ``plots/``
    in ``<output_dir>/<name>/``.

    Give the prompts as ``prompts`` (a list) or ``prompts_file`` (one prompt a line; blank lines
    and lines starting with ``#`` are skipped), not both. ``metrics``: the fields of each run's
    ``metrics.json`` that the report collects. ``command``: the program that runs a job, called
    as ``<command> --config <file> <overrides>`` and ``<command> --resume <run folder>`` in
    ``workdir`` (null: the current folder); a first item ``python`` is the interpreter running
    the study. ``threads_per_run`` sets OMP_NUM_THREADS and MKL_NUM_THREADS of every run;
    ``max_parallel`` (local executor; null: CPU cores // threads_per_run) caps the runs at once.
    ``retry_failed``: whether running the study again retries runs that failed before.
    ``scoring``: the metrics the study computes from the runs' scenes (:class:`ScoringConfig`).
    ``output_dir`` and ``prompts_file`` are relative to the current folder, method configs to
    ``workdir``.
    """

    job: str = "study"
    name: str = "study"
    output_dir: str = "studies"
    methods: List[MethodConfig] = field(default_factory=list)
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None
    seeds: List[int] = field(default_factory=lambda: [0])
    metrics: List[str] = field(default_factory=lambda: ["psnr", "mask_iou", "wall_s"])
    command: List[str] = field(default_factory=lambda: ["python", "run.py"])
    workdir: Optional[str] = None
    executor: ExecutorKind = ExecutorKind.local
    threads_per_run: int = 1
    max_parallel: Optional[int] = None
    retry_failed: bool = True
    ray: RayConfig = field(default_factory=RayConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def study_dir(self) -> Path:
        """The study's folder (absolute: runs on other nodes write into it)."""
        return (Path(self.output_dir) / self.name).resolve()
