"""The ``train-generator`` job: a TRELLIS-architecture generator trained on the shape world.

    python run.py train-generator --config configs/train-generator-structure.yaml
    python run.py train-generator --config configs/train-generator-slat.yaml \
        structure_pipeline=outputs/train-generator-structure/structure@<time>/pipeline
    python run.py --resume outputs/train-generator-structure/structure@<time>
    python run.py train-generator --config configs/train-generator-structure.yaml \
        init_from=<stage-1 run> vae.steps=0 flow.steps=3000 name=<new name>   (train on)

Stage 1 (``stage: structure``): the sparse-structure VAE, then the structure flow on its
latents (``relaxflow.training.structure``). Stage 2 (``stage: slat``, settings under ``slat:``):
the structured-latent VAE (voxel features -> Gaussians, trained through renders), then the
latent flow, conditioned on the stage-1 pipeline folder ``structure_pipeline``'s frozen
conditioner (``relaxflow.training.slat``); its export is that folder completed with stage 2.
The first run of a stage draws its dataset into the cache (``relaxflow.training.data``,
``slat_data``); later ones start at once.

``init_from`` starts a new run from another stage-1 run's last checkpoint, or from a pipeline
folder's stage 1 (``embedded``, the shipped generator; float16 weights cast to float32): its
models' weights (VAE, flow, conditioner), with fresh optimisers and data order; with
``vae.steps=0`` its VAE (its latent scale already folded in) is kept as it is and only the flow
trains on, so a flow that underfits gets more steps without redoing the VAE; ``init_flow=false``
takes only the VAE and conditioner and trains a fresh flow of ``flow_size``
(``configs/train-generator-structure-flow.yaml``). Stage 2 takes ``init_from`` the same way (a
stage-2 run, or a pipeline with stage 2 such as ``embedded``: its SLat encoder, Gaussian
decoder, flow and ``slat_normalization``), so ``slat.vae.steps=0`` trains its flow on
(``structure_pipeline=embedded``, whose conditioner the shipped flow was trained with). Ship
such a run after the ones it builds on: ``ship-generator <first run> <continued run>``, with
stage 2 trained on the first run ``ship-generator <first run> <stage-2 run> <continued run>``,
or over the shipped generator ``ship-generator relaxflow/embedded <continued run>`` (later files
win; a run that shares stage 2 keeps ``flow.train_conditioner=false``).

Writes ``config.yaml``, ``source.json`` (the commit of the code at each start and resume, for
the shipped generator's manifest: ``relaxflow.training.ship``), ``metrics.jsonl`` (every step; held-out metrics at each log step, marked
``held_out``), ``loss_curve.png`` (rewritten at each log step), ``ckpt/`` (atomic, verified
checkpoints: a killed run continues bit for bit on the CPU at the same thread count), and at the
end ``pipeline/`` (``pipeline.json``, ``ckpts/``, the conditioner ``dinov2_tiny_reg/``) and
``metrics.json``.

A resume is exact while the cached dataset it trained on is the one it reads again. A dataset
drawn again (the cache deleted, or the shapes code changed, which changes its fingerprint) has the
same occupancy grids, but its renders follow the renderer's float sums, whose order depends on
the thread count: a rebuild at 2 threads differed from one at 1 thread in 56 of 80 million
values, by 1/255, which moves the flow phase's condition tokens slightly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tqdm import tqdm

from cfd.config import load_config
from cfd.systems.checkpoint import load_checkpoint, save_checkpoint
from core.devices import resolve_device
from core.errors import UserError
from core.runtime import (RunInterrupted, TrainingStopped, atomic_write, interrupts_held,
                          log_records)
from jobs.skeleton import RunFolder, check_output, finished_run, typed
from relaxflow.conditioning import FRAMINGS
from relaxflow.loading import (EMBEDDED_PIPELINES, PIPELINE_FILE, PipelineSpec,
                               check_pipeline_files, model_args, read_pipeline,
                               resolve_pipeline_folder)
from relaxflow.training.data import build_structure_data, check_data_config
from relaxflow.training.plots import plot_losses
from relaxflow.training.ship import record_source
from relaxflow.training.sizes import (IMAGE_SIZE, conditioner_config, decoder_args,
                                      encoder_args, flow_args, latent_resolution,
                                      slat_decoder_args, slat_encoder_args, slat_flow_args)
from relaxflow.training.slat import SlatTrainer, SlatTraining
from relaxflow.training.slat_data import VOXEL_FEATURES, build_slat_data, check_slat_data
from relaxflow.training.structure import CONDITIONER_FOLDER, StructureTrainer, StructureTraining

log = logging.getLogger(__name__)

CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit source.json records


class Stage(Enum):
    structure = "structure"  # stage 1: the sparse-structure VAE, then its flow
    slat = "slat"  # stage 2: the structured-latent VAE, then its flow


@dataclass
class TrainGeneratorConfig(StructureTraining):
    """Stage 1's settings at the top level (``StructureTraining``), stage 2's under ``slat``;
    ``seed`` and ``grad_clip`` serve both."""

    job: str = "train-generator"
    name: str = "train-generator-structure"
    stage: Stage = Stage.structure
    # stage 2: the stage-1 pipeline folder (a structure run's pipeline/) whose conditioner
    # conditions the latent flow, frozen, and which the exported pipeline completes
    structure_pipeline: str = ""
    # where this run's weights start (see above): a run folder of the same stage (its last
    # checkpoint) or a pipeline folder with the stage (``embedded``: the shipped generator)
    init_from: str = ""
    # take init_from's flow too; false: only its VAE (and stage 1's conditioner), with a fresh
    # flow of flow_size (a new flow architecture trained on a shipped VAE and conditioner)
    init_flow: bool = True
    slat: SlatTraining = field(default_factory=SlatTraining)
    # core.devices: auto (CUDA when present, else the CPU), cpu, cuda:<i>. On CUDA the models
    # run under bfloat16 autocast (weights and optimiser in float32).
    device: str = "auto"
    output_dir: str = "outputs"
    checkpoint_every: int = 200
    log_every: int = 200


Config = TrainGeneratorConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _setting(c: Any, key: str) -> Any:
    for part in key.split("."):
        c = getattr(c, part)
    return c


def _check_phases(c: Any, prefix: str, vae_trained: bool = False) -> None:
    """The settings both stages have (``vae``, ``flow``, ``eval``), under ``prefix``."""
    for key in ("vae.batch_size", "flow.batch_size", "eval.batch_size", "eval.flow_samples",
                "eval.sampler.steps"):
        value = _setting(c, key)
        _require(value >= 1, f"{prefix}{key} must be >= 1, got {value}")
    vae, flow = c.vae.steps, c.flow.steps
    _require(vae >= 0 and flow >= 0 and vae + flow >= 1,
             f"{prefix}vae.steps={vae}, {prefix}flow.steps={flow}: both >= 0, not both 0")
    _require(vae >= 1 or flow == 0 or vae_trained,
             f"the flow trains on the VAE's latents: set {prefix}vae.steps >= 1 (or start from a "
             "trained one: init_from=<run of this stage>)")
    for key in ("vae.lr", "flow.lr"):
        _require(_setting(c, key) > 0, f"{prefix}{key} must be > 0, got {_setting(c, key)}")
        final = _setting(c, key + "_final")
        _require(final is None or 0 <= final <= _setting(c, key),
                 f"{prefix}{key}_final is where a cosine decay of {prefix}{key} ends: in [0, "
                 f"{prefix}{key}] (or null: no decay), got {final}")
    _require(0 <= c.flow.ema_decay < 1, f"{prefix}flow.ema_decay is a decay in [0, 1) (0: no "
             f"average), got {c.flow.ema_decay}")
    _require(0 <= c.flow.p_uncond < 1, f"{prefix}flow.p_uncond is a probability in [0, 1), "
             f"got {c.flow.p_uncond}")
    _require(len(c.eval.sampler.cfg_interval) == 2,
             f"{prefix}eval.sampler.cfg_interval is [low, high] in t")


def check(c: TrainGeneratorConfig) -> None:
    """Every setting, the device and the output folder, before any data or model."""
    for key in ("checkpoint_every", "log_every"):
        _require(_setting(c, key) >= 1, f"{key} must be >= 1, got {_setting(c, key)}")
    _require(c.grad_clip > 0, f"grad_clip must be > 0, got {c.grad_clip}")
    if c.stage is Stage.structure:
        check_structure(c)
    else:
        check_slat(c)
    resolve_device(c.device)
    check_output(c.output_dir, c.name)


def check_structure(c: TrainGeneratorConfig) -> None:
    """Stage 1's settings."""
    check_data_config(c.data)
    _require(c.image_framing in FRAMINGS,
             f"image_framing is {c.image_framing!r}: use one of {', '.join(FRAMINGS)} (object: "
             "TRELLIS's crop to the object; frame: the render as framed)")
    _check_phases(c, "", vae_trained=bool(c.init_from))
    if c.init_from:
        check_init_from(c)
    levels = len(c.vae_size.channels)
    _require(levels >= 2, f"vae_size.channels needs >= 2 levels, got {c.vae_size.channels}")
    _require(c.data.occupancy_resolution % 2 ** (levels - 1) == 0,
             f"data.occupancy_resolution={c.data.occupancy_resolution} must halve "
             f"{levels - 1} times (the VAE's levels): use a multiple of {2 ** (levels - 1)}")
    latent = c.data.occupancy_resolution // 2 ** (levels - 1)
    _require(latent % c.flow_size.patch_size == 0,
             f"flow_size.patch_size={c.flow_size.patch_size} must divide the latent's "
             f"{latent} cells a side")
    _require(c.flow_size.model_channels % c.flow_size.num_head_channels == 0,
             "flow_size.model_channels must be a multiple of flow_size.num_head_channels")
    cs = c.conditioner_size
    _require(cs.hidden_size % cs.num_attention_heads == 0,
             "conditioner_size.hidden_size must be a multiple of its num_attention_heads")
    _require(IMAGE_SIZE % cs.patch_size == 0,
             f"conditioner_size.patch_size must divide the {IMAGE_SIZE} px input (14, 37, ...)")


# the settings that decide the models' shapes, per stage: a run starts from another's weights
# only when they agree
SIZE_SETTINGS = {Stage.structure: ("data.occupancy_resolution", "vae_size", "flow_size",
                                   "conditioner_size"),
                 Stage.slat: ("slat.data.resolution", "slat.vae_size", "slat.flow_size")}


def init_pipeline(c: TrainGeneratorConfig) -> Optional[Path]:
    """The pipeline folder ``init_from`` names (a short id such as ``embedded``, or a folder
    holding ``pipeline.json``), or None when it names something else (a run folder)."""
    if c.init_from in EMBEDDED_PIPELINES or (Path(c.init_from) / PIPELINE_FILE).is_file():
        return resolve_pipeline_folder(c.init_from, option="init_from")
    return None


def check_init_from(c: TrainGeneratorConfig) -> None:
    """``init_from`` names a run of this stage with a checkpoint, or a pipeline folder with
    the stage, of the same model sizes (the flow's only with ``init_flow``)."""
    pipeline = init_pipeline(c)
    if pipeline is not None:
        if c.stage is Stage.structure:
            check_init_pipeline(c, pipeline)
        else:
            check_slat_init_pipeline(c, pipeline)
        return
    folder, stage = Path(c.init_from), c.stage.value
    _require((folder / "config.yaml").is_file() and (folder / "ckpt").is_dir(),
             f"init_from={folder} is not a train-generator run folder with a checkpoint (it "
             "needs config.yaml and ckpt/) nor a pipeline folder (pipeline.json): give the "
             f"folder a '{stage}' run printed, or a generator such as init_from=embedded")
    source = typed(load_config(TrainGeneratorConfig, folder / "config.yaml"))
    _require(source.stage is c.stage,
             f"init_from={folder} is a '{source.stage.value}' run: give a '{stage}' run")
    for key in SIZE_SETTINGS[c.stage]:
        flow = key.endswith("flow_size")
        if flow and not c.init_flow:
            continue
        _require(_setting(source, key) == _setting(c, key),
                 f"{key} is {_setting(c, key)} here but {_setting(source, key)} in init_from="
                 f"{folder}: the weights only fit the same sizes (drop the override"
                 f"{', or init_flow=false for a fresh flow' if flow else ''})")


def _check_model_args(c: TrainGeneratorConfig, spec: PipelineSpec, builds: Dict[str, Any],
                      keys: List[str]) -> None:
    """Each of the pipeline's models ``keys`` has the arguments this config builds
    (``builds``: key -> (setting, arguments))."""
    for key in keys:
        setting, args = builds[key]
        shipped = model_args(spec, key)
        differ = ", ".join(f"{name} (here {value}, there {shipped.get(name)})"
                           for name, value in args.items() if shipped.get(name) != value)
        fresh = ", or init_flow=false for a fresh flow" if setting.endswith("flow_size") else ""
        _require(not differ, f"init_from={c.init_from}: its {key} differs from what this config "
                 f"builds in {differ}: set {setting} to the pipeline's{fresh}")


def check_init_pipeline(c: TrainGeneratorConfig, folder: Path) -> None:
    """Pipeline ``folder`` has stage 1's models (the flow only with ``init_flow``) with the
    arguments this config builds, its conditioner's and its occupancy resolution (read from
    the json files and the conditioner's config.json; no weights loaded)."""
    spec = read_pipeline(folder)
    keys = ["sparse_structure_encoder", "sparse_structure_decoder"]
    keys += ["sparse_structure_flow_model"] if c.init_flow else []
    absent = [key for key in keys if key not in spec.models]
    _require(not absent, f"init_from={c.init_from}: its {PIPELINE_FILE} names no "
             f"{', '.join(absent)} (a released TRELLIS pipeline ships no structure encoder): "
             "give a pipeline this job exported, such as init_from=embedded")
    check_pipeline_files(folder, keys=keys)
    resolution = structure_resolution(folder)
    _require(resolution == c.data.occupancy_resolution,
             f"data.occupancy_resolution is {c.data.occupancy_resolution} here but init_from="
             f"{c.init_from} decodes {resolution}^3: set it to {resolution}")
    config_file = spec.root / str(spec.cond_model) / "config.json"
    _require(spec.condition == "image" and config_file.is_file(),
             f"init_from={c.init_from} has no image conditioner folder with a config.json (its "
             f"{PIPELINE_FILE}'s image_cond_model): give a stage-1 pipeline of this job")
    found, expected = (json.loads(config_file.read_text()),
                       conditioner_config(c.conditioner_size).to_dict())
    for name in (*asdict(c.conditioner_size), "image_size"):
        _require(found.get(name) == expected[name],
                 f"the conditioner's {name} is {expected[name]} here but {found.get(name)} in "
                 f"{config_file}: set conditioner_size to the pipeline's")
    latent = latent_resolution(c.data.occupancy_resolution, c.vae_size)
    builds = {"sparse_structure_encoder": ("vae_size", encoder_args(c.vae_size)),
              "sparse_structure_decoder": ("vae_size", decoder_args(c.vae_size)),
              "sparse_structure_flow_model": ("flow_size", flow_args(
                  c.flow_size, latent, c.vae_size.latent_channels,
                  c.conditioner_size.hidden_size))}
    _check_model_args(c, spec, builds, keys)


def check_slat_init_pipeline(c: TrainGeneratorConfig, folder: Path) -> None:
    """Pipeline ``folder`` has stage 2's encoder, decoder (and flow, with ``init_flow``) with
    the arguments this config builds, and its latent normalisation (json files only)."""
    spec = read_pipeline(folder)
    keys = ["slat_encoder", "slat_decoder_gs"] + (["slat_flow_model"] if c.init_flow else [])
    absent = [key for key in keys if key not in spec.models]
    _require(not absent and spec.slat_normalization is not None,
             f"init_from={c.init_from}: its {PIPELINE_FILE} names no "
             f"{', '.join(absent or ['slat_normalization'])} (a released TRELLIS pipeline ships "
             "no structured-latent encoder): give a pipeline this job exported with stage 2, "
             "such as init_from=embedded")
    check_pipeline_files(folder, keys=keys)
    s, cond = c.slat, conditioner_width(structure_folder(c))
    r = s.data.resolution
    builds = {"slat_encoder": ("slat.vae_size",
                               slat_encoder_args(s.vae_size, r, len(VOXEL_FEATURES))),
              "slat_decoder_gs": ("slat.vae_size", slat_decoder_args(s.vae_size, r)),
              "slat_flow_model": ("slat.flow_size", slat_flow_args(
                  s.flow_size, r, s.vae_size.latent_channels, cond))}
    _check_model_args(c, spec, builds, keys)


def structure_folder(c: TrainGeneratorConfig) -> Path:
    """The folder ``structure_pipeline`` names (a short id such as ``embedded``, or a path)."""
    if c.structure_pipeline in EMBEDDED_PIPELINES:
        return resolve_pipeline_folder(c.structure_pipeline, option="structure_pipeline")
    return Path(c.structure_pipeline)


def conditioner_width(folder: Path) -> int:
    """The hidden size of a pipeline folder's image conditioner (its config.json)."""
    spec = read_pipeline(folder)
    return json.loads((spec.root / str(spec.cond_model) / "config.json").read_text())[
        "hidden_size"]


def structure_resolution(folder: Path) -> int:
    """The occupancy resolution a stage-1 pipeline folder's structure decoder gives: its
    flow's latent resolution, doubled at each decoder level but the first."""
    spec = check_pipeline_files(folder)
    flow, decoder = (model_args(spec, key)
                     for key in ("sparse_structure_flow_model", "sparse_structure_decoder"))
    return flow["resolution"] * 2 ** (len(decoder["channels"]) - 1)


def check_slat(c: TrainGeneratorConfig) -> None:
    """Stage 2's settings and its stage-1 pipeline folder (files checked, not loaded)."""
    s, fix = c.slat, ("set structure_pipeline to a stage-1 pipeline folder: the pipeline/ of a "
                      "finished 'stage: structure' run of this job")
    _require(bool(c.structure_pipeline), f"stage: slat needs structure_pipeline: {fix}")
    folder = structure_folder(c)
    _require((folder / PIPELINE_FILE).is_file(),
             f"structure_pipeline={folder} is not a pipeline folder (no {folder / PIPELINE_FILE}"
             f"): {fix}")
    spec = check_pipeline_files(folder)
    _require(spec.condition == "image" and spec.cond_model is not None
             and (folder / str(spec.cond_model) / "config.json").is_file(),
             f"structure_pipeline={folder} has no image conditioner folder (its "
             f"{PIPELINE_FILE}'s image_cond_model, with a config.json): {fix}")
    resolution = structure_resolution(folder)
    _require(resolution == s.data.resolution,
             f"slat.data.resolution={s.data.resolution}, but structure_pipeline={folder} gives "
             f"{resolution}^3 structures: set slat.data.resolution: {resolution}")
    check_slat_data(s.data)
    _check_phases(s, "slat.", vae_trained=bool(c.init_from))
    for key in ("vae.views", "eval.views", "flow.condition_views"):
        value = _setting(s, key)
        _require(1 <= value <= s.data.views, f"slat.{key}={value} must be in 1..slat.data.views"
                 f"={s.data.views} (the renders each instance has)")
    v, f = s.vae_size, s.flow_size
    for key in ("vae_size.num_gaussians", "vae_size.window_size", "vae_size.num_blocks",
                "flow_size.num_blocks"):
        _require(_setting(s, key) >= 1, f"slat.{key} must be >= 1, got {_setting(s, key)}")
    _require(v.scaling_bias > 0, f"slat.vae_size.scaling_bias must be > 0, got {v.scaling_bias}")
    for key, size in (("vae_size", v), ("flow_size", f)):
        _require(size.model_channels % size.num_head_channels == 0,
                 f"slat.{key}.model_channels must be a multiple of its num_head_channels")
    patch = 2 ** len(f.io_block_channels)
    _require(s.data.resolution % patch == 0,
             f"slat.flow_size.io_block_channels: {len(f.io_block_channels)} levels halve the "
             f"grid {len(f.io_block_channels)} times, which must divide "
             f"slat.data.resolution={s.data.resolution}")
    if c.init_from:
        check_init_from(c)


def make_trainer(c: TrainGeneratorConfig) -> Union[StructureTrainer, SlatTrainer]:
    """The trainer of the configured stage, its dataset drawn or found in the cache."""
    device = resolve_device(c.device)
    if c.stage is Stage.structure:
        return StructureTrainer(c, build_structure_data(c.data), device)
    return SlatTrainer(c.slat, c.seed, c.grad_clip, structure_folder(c),
                       build_slat_data(c.slat.data), device)


def start_from(trainer: Union[StructureTrainer, SlatTrainer], c: TrainGeneratorConfig) -> None:
    """Give ``trainer`` the model weights ``init_from`` names: a run's last checkpoint or a
    pipeline folder's models of the stage (the flow's only with ``init_flow``)."""
    pipeline = init_pipeline(c)
    if pipeline is not None:
        state = trainer.pipeline_weights(pipeline, flow=c.init_flow)
    else:
        state = load_checkpoint(Path(c.init_from) / "ckpt")
        if state is None:
            raise UserError(f"init_from={c.init_from} has no checkpoint yet: train it first")
    trainer.load_weights(state, flow=c.init_flow)


def run(cfg) -> Dict[str, Any]:
    """Train the configured stage from scratch; returns the final metrics (with
    ``run_dir``)."""
    c: TrainGeneratorConfig = typed(cfg)
    check(c)
    trainer = make_trainer(c)
    if c.init_from:
        start_from(trainer, c)
    folder = RunFolder.create(c.output_dir, c.name, c.stage.value, cfg)
    record_source(folder.path, 0, CODE_ROOT)
    return _train(trainer, c, folder, checkpoint_step=None)


def resume(run_dir: Path) -> Dict[str, Any]:
    """Continue a stopped run from its checkpoint, as configured. A finished run (its
    metrics.json written) only says so and returns its metrics."""
    run_dir = Path(run_dir)
    finished = finished_run(run_dir)
    if finished is not None:
        return finished
    state = load_checkpoint(run_dir / "ckpt")  # a damaged one is refused before any work
    c: TrainGeneratorConfig = typed(load_config(TrainGeneratorConfig, run_dir / "config.yaml"))
    check(c)
    trainer = make_trainer(c)
    if state is not None:
        trainer.load_state_dict(state)
        log.info("resumed %s at step %d", run_dir, trainer.step)
    record_source(run_dir, trainer.step, CODE_ROOT)
    return _train(trainer, c, RunFolder(run_dir),
                  checkpoint_step=None if state is None else trainer.step)


def _metrics_log(run_dir: Path, keep_through: int) -> List[Dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to step ``keep_through`` (those a resumed run does
    not redo), the file rewritten atomically to hold only them (a torn last line dropped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [r for r in log_records(path) if r["step"] <= keep_through]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return records


def _summary(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items() if k not in ("step", "phase", "held_out"))


def _train(trainer: Union[StructureTrainer, SlatTrainer], c: TrainGeneratorConfig,
           folder: RunFolder, checkpoint_step: Optional[int]) -> Dict[str, Any]:
    """The step loop from ``trainer.step`` to the end, then the exported pipeline."""
    run_dir, total = folder.path, trainer.total_steps
    try:
        records = _metrics_log(run_dir, trainer.step)
        held_out: Dict[str, Any] = {}
        wall_before, start = trainer.wall_s, time.perf_counter()
        print(f"training on {len(trainer.train_set)} shapes "
              f"({len(trainer.train_set.categories)} categories), held out "
              f"{len(trainer.held_out)}; device {trainer.device}")
        bar = tqdm(total=total, initial=trainer.step, desc=trainer.phase.value,
                   dynamic_ncols=True)
        with open(run_dir / "metrics.jsonl", "a") as metrics_file:
            while trainer.step < total:
                record = trainer.train_step()
                if not math.isfinite(record["loss"]):
                    raise TrainingStopped(_diverged(record, run_dir, checkpoint_step))
                records.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                bar.set_description(record["phase"])
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                bar.update(1)
                step = trainer.step
                if step % c.log_every == 0 or step in (trainer.s.vae.steps, total):
                    held_out = {"step": step, "phase": record["phase"], "held_out": True,
                                **trainer.evaluate()}
                    records.append(held_out)
                    metrics_file.write(json.dumps(held_out) + "\n")
                    plot_losses(records, run_dir / "loss_curve.png")
                    bar.write(f"step {step}: held-out {_summary(held_out)}")
                if step % c.checkpoint_every == 0 or step == total:
                    metrics_file.flush()
                    trainer.wall_s = wall_before + time.perf_counter() - start
                    with interrupts_held():  # Ctrl-C lands after the save, with its step known
                        save_checkpoint(run_dir / "ckpt", trainer.state_dict())
                        checkpoint_step = step
        bar.close()
        with trainer.averaged():  # the flow's average, when it keeps one, is what ships
            pipeline = trainer.export_pipeline(run_dir / "pipeline")
    except KeyboardInterrupt:  # the last checkpoint is whole; a half-done step is not saved
        raise RunInterrupted(run_dir, trainer.step, checkpoint_step) from None
    wall_s = wall_before + time.perf_counter() - start
    result = {"steps": total, "wall_s": wall_s, "pipeline": str(pipeline),
              **{k: v for k, v in held_out.items() if k not in ("step", "phase", "held_out")}}
    return folder.finish(result, f"{total} steps in {wall_s:.1f} s; pipeline in {pipeline} "
                                 f"(conditioner: image_cond_model={pipeline / CONDITIONER_FOLDER})")


def _diverged(record: Dict[str, Any], run_dir: Path, checkpoint_step: Optional[int]) -> str:
    """Why a run stopped itself at a non-finite loss, and what to do."""
    saved = (f"the last good checkpoint (step {checkpoint_step}) is in {run_dir / 'ckpt'}"
             if checkpoint_step is not None else "no checkpoint was written yet")
    return (f"the {record['phase']} loss became {record['loss']} at step {record['step']}; "
            f"stopped ({saved}). Start a new run with a lower {record['phase']}.lr")
