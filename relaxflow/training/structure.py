"""Stage 1 of the generator, the sparse structure: a conv VAE of occupancy grids, then a
rectified-flow DiT over its latents conditioned on image tokens.

Phase ``vae`` trains ``SparseStructureEncoder`` + ``SparseStructureDecoder``: occupancy
``[B, 1, R, R, R]`` -> latent mean and log-variance ``[B, 8, r, r, r]`` -> a sample -> logits;
loss = BCE + ``dice_weight`` dice + ``kl_weight`` KL. Its last step folds a per-channel scale
into their weights so the training latents have unit RMS (:func:`fold_latent_scale`). Phase
``flow`` freezes them, encodes every
training grid once (the mean, as TRELLIS's latents are), and trains
``SparseStructureFlowModel`` with TRELLIS's objective (``relaxflow.sampler``'s convention):
``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``, target ``(1 - sigma_min) eps - x_0``,
input time ``1000 t``, ``t = sigmoid(N(1, 1))`` (more time near the noise), the condition
replaced by the negative (zeros, ``ImageConditioner.negative``) for ``p_uncond`` of the items so
classifier-free guidance has an unconditional model.

The conditioner is a DINOv2 with registers, randomly initialised from the seed. Its input
embeddings (a random linear map of each 37 px patch, with the class and register tokens and the
positions) stay frozen, so those of every training render are computed once; with
``flow.train_conditioner`` its transformer layers train with the flow, by the flow's loss and
optimiser (the ``generate`` job runs the exported model through ``ImageConditioner`` as any
DINOv2). Why trained: frozen, its tokens were read only weakly (3 categories, a 64-wide 2-block
flow, 750 steps: IoU 0.31-0.34 from the object's own held-out render against 0.25-0.29 from
another instance's, ``flow_iou_other_render``, the control every held-out evaluation logs).

Every random draw of training (batch order, views, posterior samples, times, noise, dropout)
comes from one generator whose state the checkpoint holds, so a resumed run continues bit for
bit on the CPU at the same thread count.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.runtime import replacing_folder
from relaxflow.conditioning import ImageConditioner, preprocess_image
from relaxflow.loading import PIPELINE_FILE, PipelineSpec, load_model, read_pipeline, save_model
from relaxflow.models import build
from relaxflow.sampler import FlowEulerSampler
from relaxflow.stages import guided, sample_structure

from .data import StructureDataConfig, load_shape_set
from .sizes import (ConditionerSize, FlowSize, VaeSize, build_conditioner_model, decoder_args,
                    encoder_args, flow_args, initialise_encoder, initialise_flow, initialise_vae,
                    latent_resolution)

CONDITIONER_FOLDER = "dinov2_tiny_reg"  # the exported conditioner, inside the pipeline folder


class Phase(Enum):
    vae = "vae"
    flow = "flow"


@dataclass
class VaeTraining:
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    lr_final: Optional[float] = None  # None: lr throughout; a value: cosine decay to it
    kl_weight: float = 1e-3  # of the mean KL per latent value (TRELLIS's SS VAE: 1e-3)
    dice_weight: float = 1.0  # occupancy is 1-7% of the cells: dice keeps thin parts


@dataclass
class FlowTraining:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 3e-4
    # None: lr throughout; a value: cosine decay from lr to it over the phase's steps (a flow
    # that has reached its loss floor at lr settles lower as the step shrinks)
    lr_final: Optional[float] = None
    p_uncond: float = 0.1  # condition dropout, for classifier-free guidance (TRELLIS: 0.1)
    sigma_min: float = 1e-5
    t_logit_mean: float = 1.0  # t = sigmoid(N(mean, std)), TRELLIS's logit-normal
    t_logit_std: float = 1.0
    # Train the conditioner's transformer layers with the flow (its input embeddings stay as
    # initialised); false keeps it frozen and random.
    train_conditioner: bool = True
    # Decay of the exponential moving average of what the flow phase trains (ParameterAverage):
    # held-out metrics and the exported pipeline use the average. 0: none, the last weights.
    ema_decay: float = 0.0


@dataclass
class SamplerSettings:
    """The structure sampler of held-out metrics, written to ``pipeline.json`` as a
    ``FlowEulerGuidanceIntervalSampler`` (TRELLIS's examples: 12 steps, guidance 7.5)."""

    steps: int = 12
    cfg_strength: float = 3.0
    cfg_interval: List[float] = field(default_factory=lambda: [0.5, 1.0])
    rescale_t: float = 3.0


def sampler_entry(sampler: SamplerSettings, sigma_min: float) -> Dict[str, Any]:
    """``pipeline.json``'s entry of a stage's sampler."""
    return {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": sigma_min},
            "params": {"steps": sampler.steps, "cfg_strength": sampler.cfg_strength,
                       "cfg_interval": list(sampler.cfg_interval),
                       "rescale_t": sampler.rescale_t}}


@dataclass
class Evaluation:
    flow_samples: int = 4  # held-out instances sampled from one render each, per log step
    batch_size: int = 16  # of the held-out reconstructions
    sampler: SamplerSettings = field(default_factory=SamplerSettings)


@dataclass
class StructureTraining:
    """Everything that decides the trained models (the job adds its plumbing)."""

    seed: int = 0
    data: StructureDataConfig = field(default_factory=StructureDataConfig)
    vae_size: VaeSize = field(default_factory=VaeSize)
    flow_size: FlowSize = field(default_factory=FlowSize)
    conditioner_size: ConditionerSize = field(default_factory=ConditionerSize)
    # how a render is cut before the conditioner sees it (relaxflow.conditioning.FRAMINGS),
    # written to the exported pipeline.json for every job that conditions on it: "object" is
    # TRELLIS's crop to the object, "frame" keeps the render's framing and with it the
    # object's size in the grid
    image_framing: str = "object"
    vae: VaeTraining = field(default_factory=VaeTraining)
    flow: FlowTraining = field(default_factory=FlowTraining)
    eval: Evaluation = field(default_factory=Evaluation)
    grad_clip: float = 1.0


# -- losses and metrics --------------------------------------------------------------------------
def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """``1 - 2 |p y| / (|p| + |y|)`` per item with soft ``p = sigmoid(logits)``, averaged.
    ``logits``, ``target`` ``[B, ...]``."""
    p, y = torch.sigmoid(logits.float()).flatten(1), target.float().flatten(1)
    return (1 - (2 * (p * y).sum(1) + eps) / (p.sum(1) + y.sum(1) + eps)).mean()


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent value, averaged."""
    return 0.5 * (mean.square() + logvar.exp() - logvar - 1).mean()


def occupancy_iou(pred: Tensor, truth: Tensor) -> Tensor:
    """Intersection over union of bool grids ``[B, ...]`` -> ``[B]`` (1 when both are empty)."""
    pred, truth = pred.flatten(1), truth.flatten(1)
    union = (pred | truth).sum(1)
    return torch.where(union > 0, (pred & truth).sum(1) / union.clamp(min=1), 1.0)


def logit_normal_times(n: int, mean: float, std: float, generator: torch.Generator) -> Tensor:
    """``[n]`` times in (0, 1): ``sigmoid(N(mean, std))``."""
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)


def noisy_latent(x0: Tensor, eps: Tensor, t: Tensor, sigma_min: float) -> Tuple[Tensor, Tensor]:
    """``(x_t, v)`` of the rectified flow: ``x0``, ``eps`` ``[B, ...]``, ``t [B]``."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    x_t = (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * eps
    return x_t, (1 - sigma_min) * eps - x0


def autocast(device: torch.device) -> ContextManager:
    """bfloat16 autocast on CUDA (float32 weights and optimiser), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def condition_embeddings(conditioner: ImageConditioner, rgba: Tensor, framing: str,
                         batch: int = 32) -> Tensor:
    """Renders ``[M, H, W, 4]`` uint8 -> the conditioner's input embeddings ``[M, S, C]`` float32
    on the CPU (``ImageConditioner.embed``), through the preprocessing a user's image takes
    (cut by ``framing``, 518 px)."""
    embeddings = []
    for start in range(0, len(rgba), batch):
        images = torch.stack([preprocess_image(image.numpy(), source="a training render",
                                               framing=framing)
                              for image in rgba[start:start + batch]])
        embeddings.append(conditioner.embed(images).float().cpu())
    return torch.cat(embeddings)


@torch.no_grad()
def fold_latent_scale(encoder: nn.Module, decoder: nn.Module, scale: Tensor) -> None:
    """Rescale the latent by ``1 / scale [C]`` per channel inside the weights: the encoder's
    mean (and log-variance) outputs shrink, the decoder's first convolution grows, so
    ``decoder(encoder(x))`` is unchanged while the latents the flow learns have unit RMS, the
    noise's scale. (pipeline.json has no normalisation for stage 1, and a shift of the mean
    would not fold exactly: the decoder pads its input with zeros.)"""
    out, first = encoder.out_layer[-1], decoder.input_layer
    channels = len(scale)
    scale = scale.to(out.weight.device, out.weight.dtype)
    out.weight[:channels] /= scale.view(-1, 1, 1, 1, 1)
    out.bias[:channels] /= scale
    out.bias[channels:] -= 2 * scale.log()
    first.weight *= scale.view(1, -1, 1, 1, 1)


def phase_learning_rate(lr: float, lr_final: Optional[float], done: int, steps: int) -> float:
    """The learning rate of a phase's step after ``done`` of its ``steps``: ``lr`` throughout
    when ``lr_final`` is None, else a cosine from ``lr`` (first step) to ``lr_final`` (last).
    A function of the step alone, so a resumed run continues it exactly."""
    if lr_final is None or steps <= 1:
        return lr
    progress = min(done / (steps - 1), 1.0)
    return lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))


def optimise(loss: Tensor, optimizer: torch.optim.Optimizer, params: List[nn.Parameter],
             grad_clip: float) -> float:
    """Backward, clip the gradient norm at ``grad_clip``, step; returns the norm before
    clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(norm)


class ParameterAverage:
    """An exponential moving average of parameters, the weights a flow is evaluated and shipped
    with (TRELLIS keeps one at 0.9999 over a million steps; short runs want less). The decay
    warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps'
    weights do not linger.

    Owns its state (``state_dict``): the average ``[same shapes as the parameters]`` and the
    update count, so a resumed run continues it exactly."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the parameters (after an optimiser step)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The parameters hold the average inside the block, their own values again after."""
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own):
                    p.copy_(o)

    def state_dict(self) -> Dict[str, Any]:
        return {"average": [a.clone() for a in self.average], "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.average = [a.to(p.device, p.dtype) for a, p in zip(state["average"], self.params)]
        self.updates = state["updates"]


# -- the data order ------------------------------------------------------------------------------
class EpochOrder:
    """Indices ``0..n-1`` in a fresh random order every epoch, taken a batch at a time."""

    def __init__(self, n: int):
        self.n, self.perm, self.cursor = n, torch.arange(0), 0

    def take(self, k: int, generator: torch.Generator) -> Tensor:
        """The next ``k`` indices ``[k]`` (an epoch's end starts the next one)."""
        parts, needed = [], k
        while needed:
            if self.cursor == len(self.perm):
                self.perm, self.cursor = torch.randperm(self.n, generator=generator), 0
            part = self.perm[self.cursor:self.cursor + needed]
            self.cursor += len(part)
            needed -= len(part)
            parts.append(part)
        return torch.cat(parts)

    def state_dict(self) -> Dict[str, Any]:
        return {"perm": self.perm.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.perm, self.cursor = state["perm"], state["cursor"]


# -- the trainer ---------------------------------------------------------------------------------
@dataclass
class FlowData:
    """What the flow trains on, computed once from the frozen VAE and the conditioner's frozen
    input embeddings."""

    latents: Tensor  # [N, C, r, r, r]: the encoder's means of the training grids
    embeddings: Tensor  # [N, V, S, C_cond]: each training render's conditioner input embeddings


class TwoPhaseTrainer:
    """What a stage's trainer shares: a VAE phase (``s.vae.steps``), then a flow phase
    (``s.flow.steps``), counted by ``step``; subclasses give ``_vae_step`` and ``_flow_step``."""

    s: Any
    step: int
    encoder: nn.Module
    decoder: nn.Module
    flow: nn.Module
    vae_optimizer: torch.optim.Optimizer
    flow_optimizer: torch.optim.Optimizer
    flow_average: Optional[ParameterAverage] = None  # made at the flow phase's first step

    @property
    def total_steps(self) -> int:
        return self.s.vae.steps + self.s.flow.steps

    @property
    def phase(self) -> Phase:
        """The phase the next step belongs to."""
        return Phase.vae if self.step < self.s.vae.steps else Phase.flow

    def train_step(self) -> Dict[str, Any]:
        """One optimiser step of the current phase; its record ``{step, phase, loss, ...}``
        (``step``: steps done, this one included)."""
        phase = self.phase
        if phase is Phase.vae:
            settings, optimizer, done = self.s.vae, self.vae_optimizer, self.step
        else:
            settings, optimizer, done = self.s.flow, self.flow_optimizer, \
                self.step - self.s.vae.steps
        lr = phase_learning_rate(settings.lr, settings.lr_final, done, settings.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record = self._vae_step() if phase is Phase.vae else self._flow_step()
        self.step += 1
        return {"step": self.step, "phase": phase.value, **record, "lr": lr}

    def flow_parameters(self) -> List[nn.Parameter]:
        """What the flow phase trains (and averages): the flow's parameters."""
        return list(self.flow.parameters())

    # -- weights from another run or a pipeline folder (init_from) ----------------------------
    def pipeline_models(self) -> Dict[str, Tuple[str, nn.Module, str]]:
        """``{pipeline.json key: (class name, model, key of self.args)}`` of the stage's
        encoder, decoder and flow."""
        raise NotImplementedError

    def pipeline_weights(self, folder: Path, flow: bool = True) -> Dict[str, Any]:
        """The stage's weights in a pipeline folder (an export, or a shipped generator in
        float16: cast to these models' float32), keyed as :meth:`load_weights` reads them;
        ``flow=False`` leaves the flow out. Its models must have this trainer's arguments
        (``jobs.train_generator`` checks before any run)."""
        spec = read_pipeline(folder)
        state = {args: load_model(spec.root, spec.models[key]).state_dict()
                 for key, (_, _, args) in self.pipeline_models().items()
                 if flow or args != "flow"}
        return {**state, **self.companion_weights(spec)}

    def companion_weights(self, spec: PipelineSpec) -> Dict[str, Any]:
        """What the stage's models need with them from a pipeline (see subclasses)."""
        raise NotImplementedError

    def load_weights(self, state: Dict[str, Any], flow: bool = True) -> None:
        """The models' weights from a checkpoint's or :meth:`pipeline_weights`' ``state``
        (nothing else of it); ``flow=False`` keeps this trainer's own (fresh) flow."""
        for name in ("encoder", "decoder", "flow") if flow else ("encoder", "decoder"):
            getattr(self, name).load_state_dict(state[name])
        self.load_companions(state)
        self.flow_data = None

    def load_companions(self, state: Dict[str, Any]) -> None:
        """The part of ``state`` :meth:`companion_weights` gives (see subclasses)."""
        raise NotImplementedError

    def average_state(self) -> Optional[Dict[str, Any]]:
        """The flow phase's average for a checkpoint (None before the phase, or without one)."""
        return None if self.flow_average is None else self.flow_average.state_dict()

    def load_average(self, state: Dict[str, Any]) -> None:
        """The flow phase's average from a checkpoint's ``state`` (none before the phase)."""
        self.flow_average = None
        if state.get("flow_average") is not None:
            self.flow_average = ParameterAverage(self.flow_parameters(), self.s.flow.ema_decay)
            self.flow_average.load_state_dict(state["flow_average"])

    def average_flow(self) -> None:
        """Update the flow phase's average (``s.flow.ema_decay`` > 0), made at the phase's
        first step (so ``init_from``'s weights, not a fresh start, are what it begins from)."""
        if self.s.flow.ema_decay <= 0:
            return
        if self.flow_average is None:
            self.flow_average = ParameterAverage(self.flow_parameters(), self.s.flow.ema_decay)
        self.flow_average.update()

    def averaged(self) -> ContextManager:
        """The flow phase's models hold their average inside the block (when there is one)."""
        return nullcontext() if self.flow_average is None else self.flow_average.applied()

    def flow_sampler(self) -> FlowEulerSampler:
        """The sampler of held-out metrics (``s.eval.sampler``, the flow's ``sigma_min``)."""
        e = self.s.eval.sampler
        return FlowEulerSampler(sigma_min=self.s.flow.sigma_min, steps=e.steps,
                                cfg_strength=e.cfg_strength,
                                cfg_interval=tuple(e.cfg_interval), rescale_t=e.rescale_t)

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Held-out metrics of the phase just trained (``_evaluate_vae`` or ``_evaluate_flow``),
        with the VAE (``encoder``, ``decoder``) and ``flow`` in eval mode meanwhile."""
        models = (self.encoder, self.decoder, self.flow)
        was_training = [m.training for m in models]
        for model in models:
            model.eval()
        try:
            if self.step <= self.s.vae.steps:
                return self._evaluate_vae()
            with self.averaged():
                return self._evaluate_flow()
        finally:
            for model, training in zip(models, was_training):
                model.train(training)


class StructureTrainer(TwoPhaseTrainer):
    """The models, optimisers, data and random state of a stage-1 training run."""

    def __init__(self, s: StructureTraining, data_folder: Path, device: torch.device):
        self.s, self.device = s, device
        self.train_set = load_shape_set(data_folder, "train")
        self.held_out = load_shape_set(data_folder, "held_out")
        self.resolution = latent_resolution(s.data.occupancy_resolution, s.vae_size)
        self.args = {
            "encoder": encoder_args(s.vae_size), "decoder": decoder_args(s.vae_size),
            "flow": flow_args(s.flow_size, self.resolution, s.vae_size.latent_channels,
                              s.conditioner_size.hidden_size)}
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed alone
            torch.manual_seed(s.seed)
            self.encoder = build("SparseStructureEncoder", self.args["encoder"])
            self.decoder = build("SparseStructureDecoder", self.args["decoder"])
            self.flow = build("SparseStructureFlowModel", self.args["flow"])
            initialise_encoder(self.encoder)
            initialise_vae(self.decoder)
            initialise_flow(self.flow)
        for model in (self.encoder, self.decoder, self.flow):
            model.to(device).train()
        self.conditioner = ImageConditioner(build_conditioner_model(s.conditioner_size, s.seed),
                                            device)
        self.conditioner.model.encoder.requires_grad_(s.flow.train_conditioner)
        self.vae_optimizer = torch.optim.AdamW(
            [*self.encoder.parameters(), *self.decoder.parameters()], lr=s.vae.lr)
        self.flow_optimizer = torch.optim.AdamW(self.flow_parameters(), lr=s.flow.lr)
        self.rng = torch.Generator().manual_seed(s.seed)
        self.orders = {phase: EpochOrder(len(self.train_set)) for phase in Phase}
        self.step, self.wall_s = 0, 0.0
        self.flow_data: Optional[FlowData] = None

    def flow_parameters(self) -> List[nn.Parameter]:
        """What the flow phase trains: the flow, and the conditioner's layers when trained."""
        trained = self.conditioner.model.encoder.parameters() if self.s.flow.train_conditioner \
            else []
        return [*self.flow.parameters(), *trained]


    def _vae_step(self) -> Dict[str, float]:
        c = self.s.vae
        index = self.orders[Phase.vae].take(c.batch_size, self.rng)
        occupancy = self.train_set.occupancy[index][:, None].float().to(self.device)
        with autocast(self.device):
            mean, logvar = self.encoder(occupancy, return_logvar=True)
            noise = torch.randn(mean.shape, generator=self.rng).to(self.device)
            logits = self.decoder(mean + (0.5 * logvar).exp() * noise)
        bce = F.binary_cross_entropy_with_logits(logits.float(), occupancy)
        dice = dice_loss(logits, occupancy)
        kl = gaussian_kl(mean.float(), logvar.float())
        loss = bce + c.dice_weight * dice + c.kl_weight * kl
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        grad_norm = optimise(loss, self.vae_optimizer, params, self.s.grad_clip)
        record = {"loss": loss.item(), "bce": bce.item(), "dice": dice.item(), "kl": kl.item(),
                  "grad_norm": grad_norm}
        if self.step + 1 == c.steps:  # the VAE's last step: its latents get unit scale
            rms = self.encode_training_set().square().mean((0, 2, 3, 4)).sqrt()
            fold_latent_scale(self.encoder, self.decoder, rms)
            record["latent_rms"] = rms.tolist()
        return record

    @torch.no_grad()
    def encode_training_set(self) -> Tensor:
        """The encoder's means of every training grid, ``[N, C, r, r, r]`` on the CPU."""
        self.encoder.eval()
        latents = []
        with autocast(self.device):
            for start in range(0, len(self.train_set), self.s.eval.batch_size):
                grids = self.train_set.occupancy[start:start + self.s.eval.batch_size]
                latents.append(self.encoder(grids[:, None].float().to(self.device)).float().cpu())
        return torch.cat(latents)

    def prepare_flow_data(self) -> FlowData:
        """Encode every training grid and embed every training render (once; again after a
        resume, from the checkpoint's weights, so the same)."""
        if self.flow_data is None:
            rgba = self.train_set.rgba
            embeddings = condition_embeddings(self.conditioner, rgba.flatten(0, 1),
                                              self.s.image_framing)
            self.flow_data = FlowData(self.encode_training_set(),
                                      embeddings.view(*rgba.shape[:2], *embeddings.shape[1:]))
        return self.flow_data

    def _flow_step(self) -> Dict[str, float]:
        c = self.s.flow
        data = self.prepare_flow_data()
        index = self.orders[Phase.flow].take(c.batch_size, self.rng)
        views = torch.randint(data.embeddings.shape[1], (len(index),), generator=self.rng)
        x0 = data.latents[index]
        dropped = torch.rand(len(index), generator=self.rng) < c.p_uncond
        t = logit_normal_times(len(index), c.t_logit_mean, c.t_logit_std, self.rng)
        eps = torch.randn(x0.shape, generator=self.rng)
        x_t, target = noisy_latent(x0, eps, t, c.sigma_min)
        with autocast(self.device), torch.set_grad_enabled(c.train_conditioner):
            cond = self.conditioner.encode(data.embeddings[index, views].to(self.device))
        cond = torch.where(dropped[:, None, None].to(self.device),
                           ImageConditioner.negative(cond), cond)
        with autocast(self.device):
            velocity = self.flow(x_t.to(self.device), 1000 * t.to(self.device), cond)
        loss = F.mse_loss(velocity.float(), target.to(self.device))
        grad_norm = optimise(loss, self.flow_optimizer, self.flow_parameters(), self.s.grad_clip)
        self.average_flow()
        return {"loss": loss.item(), "t_mean": t.mean().item(), "grad_norm": grad_norm}

    # -- held-out metrics (TwoPhaseTrainer.evaluate) --------------------------------------------
    # the VAE's reconstruction IoU, or the IoU of structures sampled from held-out renders (and,
    # as a control, from the render of another held-out instance: the gap is what the condition
    # tells the flow)
    def _evaluate_vae(self) -> Dict[str, float]:
        ious = []
        for start in range(0, len(self.held_out), self.s.eval.batch_size):
            truth = self.held_out.occupancy[start:start + self.s.eval.batch_size]
            with autocast(self.device):
                logits = self.decoder(self.encoder(truth[:, None].float().to(self.device)))
            ious.append(occupancy_iou(logits[:, 0].float().cpu() > 0, truth))
        iou = torch.cat(ious)
        per_category = {name: float(iou[self.held_out.category == i].mean())
                        for i, name in enumerate(self.held_out.categories)}
        worst = min(per_category, key=per_category.get)
        return {"vae_iou": float(iou.mean()), "vae_iou_worst": per_category[worst],
                "vae_iou_worst_category": worst}

    def _evaluate_flow(self) -> Dict[str, float]:
        n = min(self.s.eval.flow_samples, len(self.held_out))
        # spread over the held-out set, which runs category by category
        index = torch.linspace(0, len(self.held_out) - 1, n).round().long()
        embeddings = condition_embeddings(self.conditioner, self.held_out.rgba[index, 0],
                                          self.s.image_framing)
        tokens = self.conditioner.encode(embeddings.to(self.device))
        truth = self.held_out.occupancy[index]
        result = {}
        for name, cond in (("flow_iou", tokens), ("flow_iou_other_render", tokens.roll(1, 0))):
            generator = torch.Generator().manual_seed(self.s.seed)  # the same noise each time
            integrate = guided(self.flow_sampler(), cond, ImageConditioner.negative(cond))
            with autocast(self.device):
                _, coords = sample_structure(self.flow, self.decoder, integrate, n, generator,
                                             self.device)
            pred = torch.zeros_like(truth)
            coords = coords.long().cpu()
            pred[coords[:, 0], coords[:, 1], coords[:, 2], coords[:, 3]] = True
            result[name] = float(occupancy_iou(pred, truth).mean())
        latents = self.prepare_flow_data().latents
        result["latent_std"] = float(latents.std())
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "wall_s": self.wall_s,
                "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                "flow": self.flow.state_dict(),
                "conditioner": self.conditioner.model.state_dict(),
                "vae_optimizer": self.vae_optimizer.state_dict(),
                "flow_optimizer": self.flow_optimizer.state_dict(),
                "rng": self.rng.get_state(),
                "orders": {phase.value: order.state_dict() for phase, order in self.orders.items()},
                "flow_average": self.average_state()}

    def load_companions(self, state: Dict[str, Any]) -> None:
        """The conditioner, trained with the flow (or as shipped)."""
        self.conditioner.model.load_state_dict(state["conditioner"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.wall_s = state["step"], state["wall_s"]
        self.load_weights(state)
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.flow_optimizer.load_state_dict(state["flow_optimizer"])
        self.rng.set_state(state["rng"])
        for phase, order in self.orders.items():
            order.load_state_dict(state["orders"][phase.value])
        self.load_average(state)
        self.flow_data = None

    # -- the released layout -------------------------------------------------------------------
    def pipeline_models(self) -> Dict[str, Tuple[str, nn.Module, str]]:
        """``{pipeline.json key: (class name, model, key of self.args)}`` of stage 1's models."""
        return {"sparse_structure_encoder": ("SparseStructureEncoder", self.encoder, "encoder"),
                "sparse_structure_decoder": ("SparseStructureDecoder", self.decoder, "decoder"),
                "sparse_structure_flow_model": ("SparseStructureFlowModel", self.flow, "flow")}

    def companion_weights(self, spec: PipelineSpec) -> Dict[str, Any]:
        """The pipeline's conditioner (float32), which stage 1's flow reads."""
        from transformers import Dinov2WithRegistersModel

        conditioner = Dinov2WithRegistersModel.from_pretrained(
            str(spec.root / str(spec.cond_model)), local_files_only=True,
            torch_dtype=torch.float32)
        return {"conditioner": conditioner.state_dict()}

    def export_pipeline(self, folder: Path) -> Path:
        """Write the trained stage 1 as a released-layout pipeline folder (replacing one there):
        ``pipeline.json``, ``ckpts/<model>.json`` + ``.safetensors`` and the conditioner as a
        transformers folder (``image_cond_model=<folder>/dinov2_tiny_reg``). Stage 2's models
        are not in it yet."""
        folder = Path(folder)
        r, c = self.resolution, self.s.vae_size.latent_channels
        refs = {"sparse_structure_encoder": f"ckpts/ss_enc_conv3d_{r}l{c}",
                "sparse_structure_decoder": f"ckpts/ss_dec_conv3d_{r}l{c}",
                "sparse_structure_flow_model": f"ckpts/ss_flow_img_dit_tiny_{r}l{c}"}
        models = self.pipeline_models()
        spec = {"name": "TrellisImageTo3DPipeline", "args": {
            "models": refs,
            "sparse_structure_sampler": sampler_entry(self.s.eval.sampler, self.s.flow.sigma_min),
            "image_cond_model": CONDITIONER_FOLDER, "image_framing": self.s.image_framing}}
        with replacing_folder(folder) as tmp:  # over an export a killed run left, or an older one
            for key, (name, model, args) in models.items():
                save_model(copy.deepcopy(model).cpu(), name, self.args[args], tmp, refs[key])
            self.conditioner.model.save_pretrained(str(tmp / CONDITIONER_FOLDER))
            (tmp / PIPELINE_FILE).write_text(json.dumps(spec, indent=2))
        return folder
