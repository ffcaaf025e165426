"""The study's own metrics, computed from the scenes its runs saved (``scoring`` in the study
config, :class:`~study.config.ScoringConfig`), in two stages:

Per run, after it finished (:func:`score_runs`)
    The run's scene (``splats.ply``, or ``nerf.safetensors`` with its config) is loaded,
    brought into the world's frame by its method's ``scene_scale`` (a generator's box), and:

    * **geometry** (``scoring.geometry`` or ``scoring.diversity``): ``surface_points`` points on
      its surface (splats: drawn by opacity, each from its Gaussian; a NeRF: boundary cells of
      its density above the level its mesh is cut at, on a ``nerf_grid``^3 grid) are saved as
      ``study_surface.pt``; against the ground truth of an embedded-testbed prompt (the shape
      world's variants of the prompt, ``surface_points`` points drawn on each one's splats) the
      variant and turn about the up axis (``rotation_step_deg`` steps) nearest by Chamfer
      distance is found, and measured there: ``chamfer`` (the mean of the two directed mean
      nearest distances, world units), ``precision`` / ``recall`` / ``f_score`` at
      ``f_score_tau``, and ``gt_variant`` (the variant's name). Two independent draws of 5000
      points on one shape-world object are about 0.015 apart: a perfect result's Chamfer
      distance, where the mug's two variants are 0.035 apart.
    * **CLIP** (``scoring.clip_model``): ``views`` renders on an orbit (elevation 20 degrees,
      distance 2.5, 40 degree field of view, the distill job's evaluation orbit;
      ``view_resolution`` square, white background); ``clip_score`` = ``max(100 *
      mean_v cos(E_view, E_prompt), 0)``; ``clip_r_precision`` = the share of the views whose
      own prompt is the most similar among all the study's prompts (top 1).
    * **DINOv2** (``scoring.dinov2_model``): the CLS features of the same renders, saved as
      ``study_dinov2.pt`` for the report stage.
    * **GPTEval3D export** (``scoring.export_gpteval3d``): the scene rendered on threestudio's
      test orbit into ``<study>/gpteval3d/<method>/<prompt index>/<seed>/`` (prompt index:
      the prompt's place in the study's prompts, also written to ``gpteval3d/prompts.json``).

    The scores go to the run folder's ``study_scores.json`` with the settings that made them,
    and to the run's record in ``state.json``. A run whose ``study_scores.json`` holds the
    current settings is not scored again; changing a setting scores every run again. A run
    whose scene cannot be read is reported and tried again the next time.

Across runs, for the report (:func:`across_runs`)
    * **diversity** (``scoring.diversity``), per method and prompt over its seeds:
      ``variants_reached``, how many distinct ground-truth variants the runs' surfaces are
      nearest to (of how many the prompt has), and ``seed_chamfer``, the mean Chamfer distance
      over all pairs of seeds' surfaces, in the world frame (a result turned about the up axis
      counts as different; identical results give 0).
    * **Fréchet distance** (``scoring.dinov2_model``), per method, the TRELLIS protocol: a
      Gaussian fitted to the DINOv2 features of every render of every run of the method, one to
      those of the reference set, ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. The
      reference set on the embedded testbed is the ground truth: every variant of every study
      prompt rendered on the same orbit (so a prompt with more variants weighs more there).
      Runs of the empty (unconditional) prompt have no reference and are left out.

Every model path is checked before any run starts (:func:`check_scoring`): a missing one is a
:class:`~guidance.loading.ModelWeightsNotFound` naming the setting.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from cfd.cameras import fixed_orbit_cameras
from cfd.config import ConfigError
from cfd.evaluation import (ClipModels, chamfer_distance, clip_r_precision, clip_score,
                            dinov2_cls_features, export_gpteval3d, frechet_distance, load_clip,
                            load_dinov2, scene_surface_points)
from cfd.renderers import render
from cfd.scene import Splats
from cfd.shapes import object_splats, objects_for
from cfd.systems.ground_truth import geometry_against_shape_world, has_ground_truth
from cfd.systems.scenes import load_saved_scene
from core.errors import UserError
from core.runtime import write_json
from guidance.loading import resolve_model_path

from .config import ScoringConfig, StudyConfig
from .launch import RunSpec, RunStatus
from .state import StudyState

SCORES_NAME = "study_scores.json"
SURFACE_NAME = "study_surface.pt"
FEATURES_NAME = "study_dinov2.pt"
EXPORT_DIR = "gpteval3d"
# the distill job's evaluation orbit
VIEW_ELEVATION_DEG, VIEW_DISTANCE, VIEW_FOV_Y_DEG = 20.0, 2.5, 40.0
GEOMETRY_METRICS = ["chamfer", "f_score", "precision", "recall"]
CLIP_METRICS = ["clip_score", "clip_r_precision"]


def measures_geometry(cfg: ScoringConfig) -> bool:
    """Whether runs get surfaces and ground-truth geometry (diversity needs them too)."""
    return cfg.geometry or cfg.diversity


def scored_metrics(cfg: ScoringConfig) -> List[str]:
    """The numeric per-run scores the settings produce, in report order."""
    return ((GEOMETRY_METRICS if measures_geometry(cfg) else [])
            + (CLIP_METRICS if cfg.clip_model else []))


def scores_anything(cfg: ScoringConfig) -> bool:
    return measures_geometry(cfg) or bool(cfg.clip_model or cfg.dinov2_model
                                          or cfg.export_gpteval3d)


def check_scoring(cfg: StudyConfig, prompts: List[str]) -> None:
    """Refuse scoring settings that cannot work, before any run starts: counts, prompts without
    a ground truth where one is needed, seeds GPTEval3D cannot name, and model paths that hold
    no model."""
    scoring = cfg.scoring
    counts = {"surface_points": scoring.surface_points, "views": scoring.views,
              "view_resolution": scoring.view_resolution, "export_resolution":
              scoring.export_resolution}
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"scoring.{name} must be >= 1, got {value}")
    if scoring.nerf_grid < 2:
        raise ConfigError(f"scoring.nerf_grid must be >= 2 cells per axis, got "
                          f"{scoring.nerf_grid}")
    if scoring.export_views < 2:
        raise ConfigError(f"scoring.export_views must be >= 2 (threestudio's orbit spans 0 to "
                          f"360 degrees), got {scoring.export_views}")
    if not scoring.f_score_tau > 0:
        raise ConfigError(f"scoring.f_score_tau must be > 0 (world units), got "
                          f"{scoring.f_score_tau}")
    if not 0 < scoring.rotation_step_deg <= 360:
        raise ConfigError(f"scoring.rotation_step_deg must be in (0, 360], got "
                          f"{scoring.rotation_step_deg}")
    needs_truth = [name for name, on in (("geometry", scoring.geometry),
                                         ("diversity", scoring.diversity),
                                         ("dinov2_model", scoring.dinov2_model)) if on]
    if needs_truth:
        for prompt in prompts:
            try:
                has_ground_truth(prompt)
            except UserError as err:
                raise UserError(f"scoring.{needs_truth[0]} compares the runs with the ground "
                                "truth of the embedded testbed's prompts (turn it off for "
                                f"other prompts): {err}") from None
    if scoring.dinov2_model and not any(has_ground_truth(p) for p in prompts):
        raise UserError("scoring.dinov2_model measures renders against the ground truth of the "
                        "study's prompts, and the empty (unconditional) prompt has none: add "
                        "an embedded-testbed prompt or turn it off")
    if scoring.export_gpteval3d and any(seed < 0 for seed in cfg.seeds):
        raise ConfigError(f"scoring.export_gpteval3d names seed folders by seeds >= 0, got "
                          f"seeds {list(cfg.seeds)}")
    for option, model in (("scoring.clip_model", scoring.clip_model),
                          ("scoring.dinov2_model", scoring.dinov2_model)):
        if model:
            resolve_model_path(model, index_file="config.json", option=option)


@dataclass
class Scorers:
    """The models scoring uses, loaded once per study stage (None: not configured)."""

    clip: Optional[ClipModels] = None
    dinov2: Optional[torch.nn.Module] = None

    @classmethod
    def load(cls, cfg: ScoringConfig, clip: bool = True, dinov2: bool = True) -> "Scorers":
        return cls(
            load_clip(cfg.clip_model, cfg.device, "scoring.clip_model")
            if clip and cfg.clip_model else None,
            load_dinov2(cfg.dinov2_model, cfg.device, "scoring.dinov2_model")
            if dinov2 and cfg.dinov2_model else None)


def score_settings(cfg: ScoringConfig, spec: RunSpec) -> Dict[str, object]:
    """The settings a run's scores depend on (not where they were computed)."""
    settings = asdict(cfg)
    del settings["device"]
    return {**settings, "scene_scale": spec.scene_scale}


@torch.no_grad()
def orbit_renders(scene, render_options: dict, cfg: ScoringConfig) -> Tensor:
    """``views`` renders of a scene (splats or a NeRF) on the scoring orbit, one view at a
    time (bounded memory). ``[V,H,W,3]`` in [0, 1]."""
    cameras = fixed_orbit_cameras(cfg.views, cfg.view_resolution, cfg.view_resolution,
                                  VIEW_ELEVATION_DEG, VIEW_DISTANCE, VIEW_FOV_Y_DEG,
                                  device=cfg.device)
    return torch.cat([render(scene, cameras[i:i + 1], background=1.0, **render_options).rgb
                      for i in range(len(cameras))]).clamp(0, 1)


def world_scene(run_dir: Path, scene_scale: float, device: str) -> Tuple[object, dict]:
    """A finished run's saved scene in the world's frame (its method's ``scene_scale``) and
    its render options."""
    scene, render_options = load_saved_scene(run_dir, device)
    if scene_scale == 1.0:
        return scene, render_options
    if not isinstance(scene, Splats):
        raise UserError(f"{run_dir} saved a NeRF, which the study cannot rescale: leave its "
                        f"method's scene_scale at 1 (got {scene_scale})")
    return scene.scaled(scene_scale), render_options


def score_run(cfg: ScoringConfig, scorers: Scorers, spec: RunSpec, run_dir: Path,
              prompts: List[str], export_dir: Path) -> Dict[str, object]:
    """Score one finished run (module docstring); its scores, its surface and features written
    into ``run_dir``."""
    scene, render_options = world_scene(run_dir, spec.scene_scale, cfg.device)
    scores: Dict[str, object] = {}
    if measures_geometry(cfg):
        # not the ground truth's seed (0): a draw on a run that is the ground truth then
        # misses it by the sampling floor, as a turned one does, not by exactly 0
        generator = torch.Generator(device=cfg.device).manual_seed(1)
        points = scene_surface_points(scene, cfg.surface_points, generator, cfg.nerf_grid).cpu()
        torch.save(points, run_dir / SURFACE_NAME)
        if has_ground_truth(spec.prompt):
            scores.update(geometry_against_shape_world(points, spec.prompt, cfg.f_score_tau,
                                                       cfg.surface_points,
                                                       cfg.rotation_step_deg))
    if scorers.clip is not None or scorers.dinov2 is not None:
        views = orbit_renders(scene, render_options, cfg)
        if scorers.clip is not None:
            scores["clip_score"] = clip_score(scorers.clip, views, spec.prompt)
            scores["clip_r_precision"] = clip_r_precision(scorers.clip, [views], [spec.prompt],
                                                          prompts)
        if scorers.dinov2 is not None:
            torch.save(dinov2_cls_features(scorers.dinov2, views).cpu(),
                       run_dir / FEATURES_NAME)
    if cfg.export_gpteval3d:
        export_gpteval3d(scene, export_dir / spec.method, prompts.index(spec.prompt), spec.seed,
                         cfg.export_views, cfg.export_resolution, render_options=render_options)
    return scores


def saved_scores(run_dir: Path, settings: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The run's scores if it was scored with ``settings``, else None."""
    path = run_dir / SCORES_NAME
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["scores"] if saved.get("settings") == settings else None


def score_runs(cfg: StudyConfig, specs: List[RunSpec], state: StudyState,
               prompts: List[str]) -> None:
    """Score every finished run not yet scored with the current settings, recording each in
    the state file as it is done (a study stopped while scoring continues where it was)."""
    scoring = cfg.scoring
    if not scores_anything(scoring):
        return
    todo = []
    for spec in specs:
        record = state.record(spec)
        if record.status != RunStatus.done.value:
            continue
        scores = saved_scores(Path(record.run_dir), score_settings(scoring, spec))
        if scores is None:
            todo.append(spec)
        elif record.scores != scores:  # a state file older than the scores
            record.scores = scores
            state.save()
    if not todo:
        return
    export_dir = cfg.study_dir() / EXPORT_DIR
    if scoring.export_gpteval3d:
        write_json(export_dir / "prompts.json", prompts)
    scorers = Scorers.load(scoring)
    for spec in tqdm(todo, desc=f"{cfg.name} scoring", unit="run", dynamic_ncols=True):
        record = state.record(spec)
        run_dir = Path(record.run_dir)
        try:
            scores = score_run(scoring, scorers, spec, run_dir, prompts, export_dir)
        except (UserError, ValueError) as err:  # an unreadable scene: the study goes on
            tqdm.write(f"run {spec.key} not scored: {err}")
            continue
        write_json(run_dir / SCORES_NAME, {"settings": score_settings(scoring, spec),
                                           "scores": scores})
        record.scores = scores
        state.save()


# -- across runs ----------------------------------------------------------------------------------
@dataclass
class DiversityRow:
    """A method's runs of one prompt, compared across seeds. ``variants``: how many the prompt
    has (None without ground truth); ``seed_chamfer``: None for fewer than two surfaces."""

    method: str
    prompt: str
    runs: int
    variants_reached: Optional[int]
    variants: Optional[int]
    seed_chamfer: Optional[float]


@dataclass
class FrechetRow:
    """A method's Fréchet distance to the reference renders (None for fewer than two of its
    renders)."""

    method: str
    runs: int
    renders: int
    reference_renders: int
    frechet_distance: Optional[float]


@dataclass
class AcrossRuns:
    """The report's tables over several runs (empty when not configured)."""

    diversity: List[DiversityRow]
    frechet: List[FrechetRow]


def scored_run_dirs(cfg: ScoringConfig, specs: List[RunSpec], state: StudyState,
                    name: str) -> Dict[str, Path]:
    """The folders of the runs scored with the current settings that hold the scoring's file
    ``name``, by run key."""
    found = {}
    for spec in specs:
        record = state.record(spec)
        if record.status == RunStatus.done.value:
            run_dir = Path(record.run_dir)
            if saved_scores(run_dir, score_settings(cfg, spec)) is not None and \
                    (run_dir / name).is_file():
                found[spec.key] = run_dir
    return found


def surface_distance(a: Tensor, b: Tensor) -> float:
    """Chamfer distance of two results' surface points ``[N,3]``, ``[M,3]``: 0 for two empty
    results (the same nothing), ``inf`` for one."""
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else float("inf")
    return chamfer_distance(a, b)


def diversity_rows(cfg: ScoringConfig, specs: List[RunSpec],
                   state: StudyState) -> List[DiversityRow]:
    """Per method and prompt (in the study's order), the diversity over its seeds."""
    surfaces = scored_run_dirs(cfg, specs, state, SURFACE_NAME)
    groups: Dict[tuple, List[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.method, spec.prompt), []).append(spec)
    rows = []
    for (method, prompt), members in groups.items():
        scored = [s for s in members if s.key in surfaces]
        points = [torch.load(surfaces[s.key] / SURFACE_NAME) for s in scored]
        truth = has_ground_truth(prompt)
        reached = {(state.record(s).scores or {}).get("gt_variant") for s in scored} - {None}
        distances = [surface_distance(a, b) for a, b in itertools.combinations(points, 2)]
        rows.append(DiversityRow(
            method, prompt, len(scored), len(reached) if truth and scored else None,
            len(objects_for(prompt)) if truth else None,
            sum(distances) / len(distances) if distances else None))
    return rows


@torch.no_grad()
def reference_features(model: torch.nn.Module, cfg: ScoringConfig, prompts: List[str]) -> Tensor:
    """DINOv2 features of the reference set: every variant of every prompt with a ground truth,
    rendered on the scoring orbit. ``[R,C]``."""
    features = [dinov2_cls_features(model, orbit_renders(object_splats(obj).to(cfg.device), {},
                                                         cfg))
                for prompt in prompts if has_ground_truth(prompt)
                for obj in objects_for(prompt)]
    return torch.cat(features).cpu()


def frechet_rows(cfg: ScoringConfig, specs: List[RunSpec], state: StudyState,
                 prompts: List[str]) -> List[FrechetRow]:
    """Per method, the Fréchet distance of its runs' DINOv2 features to the reference's."""
    scored = scored_run_dirs(cfg, specs, state, FEATURES_NAME)
    reference = reference_features(Scorers.load(cfg, clip=False).dinov2, cfg, prompts)
    rows = []
    for method in dict.fromkeys(spec.method for spec in specs):
        runs = [scored[s.key] for s in specs if s.method == method and s.key in scored
                and has_ground_truth(s.prompt)]
        features = [torch.load(run_dir / FEATURES_NAME) for run_dir in runs]
        renders = sum(len(f) for f in features)
        distance = (frechet_distance(torch.cat(features), reference)
                    if renders >= 2 and len(reference) >= 2 else None)
        rows.append(FrechetRow(method, len(runs), renders, len(reference), distance))
    return rows


def across_runs(cfg: StudyConfig, specs: List[RunSpec], state: StudyState,
                prompts: List[str]) -> AcrossRuns:
    """The across-run metrics the study's settings ask for (module docstring)."""
    return AcrossRuns(
        diversity_rows(cfg.scoring, specs, state) if cfg.scoring.diversity else [],
        frechet_rows(cfg.scoring, specs, state, prompts) if cfg.scoring.dinov2_model else [])
