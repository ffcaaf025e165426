"""Stage 2 of the generator, the structured latent: a sparse transformer VAE from voxel
features to 3D Gaussians trained through rendering, then a rectified-flow model of its latents
on the voxels, conditioned on stage 1's (frozen) image conditioner.

Phase ``vae`` trains ``SLatEncoder`` + ``SLatGaussianDecoder`` (TRELLIS's
``SLatVaeGaussianTrainer``): an instance's voxel features (``slat_data``) -> per voxel the
latent's mean and log-variance ``[N, 8]`` -> a sample -> ``num_gaussians`` Gaussians per voxel
-> renders from ``vae.views`` of its ground-truth cameras by our rasteriser, on the dataset's
grey background. Loss per view = L1(RGB) + ``ssim_weight`` (1 - SSIM(RGB)) + ``alpha_weight``
L1(alpha) (TRELLIS: L1 + 0.2 D-SSIM + 0.2 LPIPS; no LPIPS here, which needs a pretrained VGG,
and an alpha term, since a grey part on the grey background leaves its coverage to it), plus
``kl_weight`` KL (TRELLIS: 1e-6). Its last step records the per-channel mean and standard
deviation of the training latents (the encoder's means), the released ``slat_normalization``.
The encoder starts with identity blocks and a least-squares readout of its input features
(``sizes.initialise_slat_encoder``, :func:`fit_latent_readout`), not TRELLIS's zero output:
a short run learns colours from the first steps.

Phase ``flow`` freezes the VAE, encodes every training instance once (means, normalised), and
trains ``SLatFlowModel`` on them with stage 1's objective (``structure``'s ``noisy_latent``,
logit-normal times, ``p_uncond`` condition dropout for classifier-free guidance), one time per
instance shared by its voxels (TRELLIS's), conditioned on the tokens of one of the instance's
first ``flow.condition_views`` renders through the stage-1 pipeline's conditioner, frozen
(its tokens are computed once).

Held-out metrics: the VAE's PSNR and mask IoU of renders of the decoded means against the
ground truth from ``eval.views`` cameras; the flow's the same of latents sampled on the true
voxels from one render's condition (and, as a control, from another instance's render).

Every random draw comes from one generator whose state the checkpoint holds, so a resumed run
continues bit for bit on the CPU at the same thread count.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfd.evaluation import mask_iou, psnr
from cfd.renderers import RenderOutput, rasterization
from cfd.shapes.dataset import ShapeDatasetConfig
from core.runtime import replacing_folder
from relaxflow.conditioning import ImageConditioner
from relaxflow.loading import PIPELINE_FILE, PipelineSpec, read_pipeline, save_model
from relaxflow.models import build
from relaxflow.models.gaussian_decoder import VoxelGaussians
from relaxflow.models.sparse import SparseTensor
from relaxflow.stages import guided, sample_latent

from .sizes import (SlatFlowSize, SlatVaeSize, initialise_slat_encoder, initialise_slat_flow,
                    initialise_slat_vae, slat_decoder_args, slat_encoder_args, slat_flow_args)
from .ship import MANIFEST
from .slat_data import VOXEL_FEATURES, SlatDataConfig, VoxelSet, load_voxel_set
from .structure import (EpochOrder, Phase, SamplerSettings, TwoPhaseTrainer, autocast,
                        condition_embeddings, gaussian_kl, logit_normal_times, noisy_latent,
                        optimise, sampler_entry)

BACKGROUND = ShapeDatasetConfig().background  # the ground-truth renders' grey
READOUT_INSTANCES = 8  # training instances whose voxels fit the encoder's initial readout


@dataclass
class SlatVaeTraining:
    steps: int = 800
    batch_size: int = 4  # instances a step
    views: int = 2  # of each instance's renders, drawn anew each step (TRELLIS: 1)
    # TRELLIS 1e-4 (batch 8 x 1 view, a million steps); 3e-3 learnt no faster in 100 steps
    lr: float = 1e-3
    lr_final: Optional[float] = None  # as stage 1's vae.lr_final
    kl_weight: float = 1e-6  # of the mean KL per latent value (TRELLIS's)
    ssim_weight: float = 0.2  # TRELLIS's
    alpha_weight: float = 1.0


@dataclass
class SlatFlowTraining:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-4
    lr_final: Optional[float] = None  # as stage 1's flow.lr_final
    p_uncond: float = 0.1
    sigma_min: float = 1e-5
    t_logit_mean: float = 1.0
    t_logit_std: float = 1.0
    condition_views: int = 2  # the first renders of each instance whose tokens condition it
    ema_decay: float = 0.0  # as stage 1's flow.ema_decay


@dataclass
class SlatEvaluation:
    views: int = 4  # ground-truth cameras each held-out instance is compared from
    flow_samples: int = 4  # held-out instances sampled from one render each, per log step
    batch_size: int = 8  # instances a decoder pass, in the VAE's metrics
    sampler: SamplerSettings = field(default_factory=SamplerSettings)


@dataclass
class SlatTraining:
    """Everything that decides stage 2's trained models (the job adds the stage-1 pipeline, the
    seed and its plumbing)."""

    data: SlatDataConfig = field(default_factory=SlatDataConfig)
    vae_size: SlatVaeSize = field(default_factory=SlatVaeSize)
    flow_size: SlatFlowSize = field(default_factory=SlatFlowSize)
    vae: SlatVaeTraining = field(default_factory=SlatVaeTraining)
    flow: SlatFlowTraining = field(default_factory=SlatFlowTraining)
    eval: SlatEvaluation = field(default_factory=SlatEvaluation)


# -- rendering and its losses --------------------------------------------------------------------
def render_gaussians(g: VoxelGaussians, rows: Tensor, viewmats: Tensor, Ks: Tensor,
                     size: int) -> RenderOutput:
    """The Gaussians of voxels ``rows [n]`` from cameras ``viewmats [V, 4, 4]``, ``Ks [V, 3, 3]``
    (the generator's box) on the grey background: ``rgb [V, S, S, 3]``, ``alpha [V, S, S, 1]``;
    differentiable."""
    return rasterization(
        g.means[rows].reshape(-1, 3), g.quats[rows].reshape(-1, 4),
        g.scales[rows].reshape(-1, 3), torch.sigmoid(g.opacity_logits[rows]).reshape(-1),
        g.features_dc[rows].reshape(-1, 1, 3), viewmats, Ks, size, size, sh_degree=0,
        backgrounds=torch.full((3,), BACKGROUND, device=viewmats.device), backend="torch")


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    return w[:, None] * w[None, :]


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Mean structural similarity of images ``[B, H, W, C]`` in [0, 1] (11 px Gaussian window,
    sigma 1.5, ``C1 = 0.01^2``, ``C2 = 0.03^2``; borders zero-padded, as 3DGS's loss)."""
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)
    channels = x.shape[1]
    window = _gaussian_window().to(x)[None, None].expand(channels, 1, -1, -1)

    def blur(image):
        return F.conv2d(image, window, padding=window.shape[-1] // 2, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)
            / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()


def ground_truth(rgba: Tensor) -> Tuple[Tensor, Tensor]:
    """uint8 renders ``[V, H, W, 4]`` -> ``rgb [V, H, W, 3]``, ``alpha [V, H, W, 1]`` in [0, 1]."""
    image = rgba.float() / 255
    return image[..., :3], image[..., 3:]


@torch.no_grad()
def fit_latent_readout(encoder: nn.Module, x: SparseTensor) -> None:
    """Set the encoder's mean output (the first half of ``out_layer``) to the least-squares
    linear map from its torso's features of the voxels ``x`` to the leading principal
    components of their input features (each standardised, then scaled to unit variance), so
    the latent carries the voxel features from the first step (see
    :func:`~relaxflow.training.sizes.initialise_slat_encoder`). ``x``: ``feats [M, F]``."""
    h = encoder.torso(x).feats.double()
    feats = x.feats.double()
    feats = (feats - feats.mean(0)) / feats.std(0).clamp(min=1e-6)
    channels = min(encoder.latent_channels, feats.shape[1], len(feats))
    _, _, directions = torch.linalg.svd(feats, full_matrices=False)
    target = feats @ directions[:channels].T
    target = target / target.std(0).clamp(min=1e-6)
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1)
    # singular directions of the torso's features below 1e-4 of the largest are dropped: a map
    # that fits through them has huge weights, and the first steps' changes blew the latent up
    solution = torch.linalg.lstsq(design.cpu(), target.cpu(), rcond=1e-4,
                                  driver="gelsd").solution.to(h.device)
    out = encoder.out_layer
    out.weight[:channels] = solution[:-1].T.to(out.weight.dtype)
    out.bias[:channels] = solution[-1].to(out.bias.dtype)


# -- the trainer ---------------------------------------------------------------------------------
@dataclass
class SlatFlowData:
    """What the flow trains on, computed once from the frozen encoder and conditioner."""

    latents: Tensor  # [M, C]: the encoder's means of every training voxel, normalised
    tokens: Tensor  # [N, condition_views, T, D]: the conditioner's tokens of each render


class SlatTrainer(TwoPhaseTrainer):
    """The models, optimisers, data and random state of a stage-2 training run.

    ``structure_pipeline``: the stage-1 pipeline folder whose conditioner conditions the flow
    and which the export completes."""

    def __init__(self, s: SlatTraining, seed: int, grad_clip: float, structure_pipeline: Path,
                 data_folder: Path, device: torch.device):
        self.s, self.seed, self.grad_clip, self.device = s, seed, grad_clip, device
        self.structure_pipeline = Path(structure_pipeline)
        self.train_set = load_voxel_set(data_folder, "train")
        self.held_out = load_voxel_set(data_folder, "held_out")
        spec = read_pipeline(self.structure_pipeline)
        self.conditioner = ImageConditioner.from_pretrained(
            str(self.structure_pipeline / spec.cond_model), device)
        self.image_framing = spec.image_framing  # the renders cut as stage 1's were
        cond_channels = self.conditioner.model.config.hidden_size
        resolution, latent = s.data.resolution, s.vae_size.latent_channels
        self.args = {
            "encoder": slat_encoder_args(s.vae_size, resolution, len(VOXEL_FEATURES)),
            "decoder": slat_decoder_args(s.vae_size, resolution),
            "flow": slat_flow_args(s.flow_size, resolution, latent, cond_channels)}
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed alone
            torch.manual_seed(seed)
            self.encoder = build("SLatEncoder", self.args["encoder"])
            self.decoder = build("SLatGaussianDecoder", self.args["decoder"])
            self.flow = build("SLatFlowModel", self.args["flow"])
            initialise_slat_encoder(self.encoder)
            initialise_slat_vae(self.decoder)
            initialise_slat_flow(self.flow)
        for model in (self.encoder, self.decoder, self.flow):
            model.to(device).train()
        fit_latent_readout(self.encoder, self._voxels(
            self.train_set, torch.arange(min(READOUT_INSTANCES, len(self.train_set)))))
        self.vae_optimizer = torch.optim.AdamW(
            [*self.encoder.parameters(), *self.decoder.parameters()], lr=s.vae.lr)
        self.flow_optimizer = torch.optim.AdamW(self.flow.parameters(), lr=s.flow.lr)
        self.rng = torch.Generator().manual_seed(seed)
        self.orders = {phase: EpochOrder(len(self.train_set)) for phase in Phase}
        self.step, self.wall_s = 0, 0.0
        self.normalization: Optional[Dict[str, Tensor]] = None  # {"mean", "std"}: [C] each
        self.flow_data: Optional[SlatFlowData] = None


    def _voxels(self, voxels: VoxelSet, index: Tensor) -> SparseTensor:
        """The encoder's input of instances ``index``: features at ``(item, x, y, z)``."""
        return SparseTensor(voxels.feats[voxels.rows(index)].to(self.device),
                            voxels.batch_coords(index).to(self.device))

    def _vae_step(self) -> Dict[str, float]:
        c = self.s.vae
        index = self.orders[Phase.vae].take(c.batch_size, self.rng)
        views = torch.stack([torch.randperm(self.s.data.views, generator=self.rng)[:c.views]
                             for _ in index])
        x = self._voxels(self.train_set, index)
        with autocast(self.device):
            mean, logvar = self.encoder(x)
            noise = torch.randn(mean.shape, generator=self.rng).to(self.device)
            raw = self.decoder(x.replace(mean + (0.5 * logvar).exp() * noise))
        g = self.decoder.gaussians(raw, x.coords)
        terms = {"l1": 0.0, "ssim": 0.0, "alpha_l1": 0.0}
        for item, (i, v) in enumerate(zip(index.tolist(), views)):
            out = render_gaussians(g, x.coords[:, 0] == item,
                                   self.train_set.viewmats[i, v].to(self.device),
                                   self.train_set.Ks[i, v].to(self.device),
                                   self.s.data.render_resolution)
            rgb, alpha = (t.to(self.device) for t in ground_truth(self.train_set.rgba[i, v]))
            terms["l1"] = terms["l1"] + F.l1_loss(out.rgb, rgb) / len(index)
            terms["ssim"] = terms["ssim"] + ssim(out.rgb, rgb) / len(index)
            terms["alpha_l1"] = terms["alpha_l1"] + F.l1_loss(out.alpha, alpha) / len(index)
        kl = gaussian_kl(mean.float(), logvar.float())
        loss = (terms["l1"] + c.ssim_weight * (1 - terms["ssim"])
                + c.alpha_weight * terms["alpha_l1"] + c.kl_weight * kl)
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        grad_norm = optimise(loss, self.vae_optimizer, params, self.grad_clip)
        record = {"loss": loss.item(), **{k: float(v.detach()) for k, v in terms.items()},
                  "kl": kl.item(), "grad_norm": grad_norm}
        if self.step + 1 == c.steps:  # the VAE's last step: the flow's normalisation
            latents = self.encode(self.train_set)
            self.normalization = {"mean": latents.mean(0), "std": latents.std(0)}
            record["latent_mean"] = self.normalization["mean"].tolist()
            record["latent_std"] = self.normalization["std"].tolist()
        return record

    @torch.no_grad()
    def encode(self, voxels: VoxelSet) -> Tensor:
        """The encoder's means of every voxel of ``voxels``, ``[M, C]`` on the CPU, in row
        order."""
        was_training = self.encoder.training
        self.encoder.eval()
        means = []
        with autocast(self.device):
            for start in range(0, len(voxels), self.s.eval.batch_size):
                index = torch.arange(start, min(start + self.s.eval.batch_size, len(voxels)))
                means.append(self.encoder(self._voxels(voxels, index))[0].float().cpu())
        self.encoder.train(was_training)
        return torch.cat(means)

    def prepare_flow_data(self) -> SlatFlowData:
        """Encode every training instance and every conditioning render (once; again after a
        resume, from the checkpoint's weights, so the same)."""
        if self.flow_data is None:
            n = self.normalization
            latents = (self.encode(self.train_set) - n["mean"]) / n["std"]
            rgba = self.train_set.rgba[:, :self.s.flow.condition_views]
            tokens = self.tokens(rgba.flatten(0, 1))
            self.flow_data = SlatFlowData(latents, tokens.view(*rgba.shape[:2],
                                                               *tokens.shape[1:]))
        return self.flow_data

    @torch.no_grad()
    def tokens(self, rgba: Tensor, batch: int = 32) -> Tensor:
        """The frozen conditioner's tokens of renders ``[M, H, W, 4]`` uint8: ``[M, T, D]``
        float32 on the CPU."""
        embeddings = condition_embeddings(self.conditioner, rgba, self.image_framing)
        return torch.cat([self.conditioner.encode(embeddings[i:i + batch].to(self.device))
                          .float().cpu() for i in range(0, len(embeddings), batch)])

    def _flow_step(self) -> Dict[str, float]:
        c = self.s.flow
        data = self.prepare_flow_data()
        index = self.orders[Phase.flow].take(c.batch_size, self.rng)
        views = torch.randint(c.condition_views, (len(index),), generator=self.rng)
        coords = self.train_set.batch_coords(index)
        x0 = data.latents[self.train_set.rows(index)]
        dropped = torch.rand(len(index), generator=self.rng) < c.p_uncond
        t = logit_normal_times(len(index), c.t_logit_mean, c.t_logit_std, self.rng)
        eps = torch.randn(x0.shape, generator=self.rng)
        x_t, target = noisy_latent(x0, eps, t[coords[:, 0].long()], c.sigma_min)
        cond = data.tokens[index, views]
        cond = torch.where(dropped[:, None, None], ImageConditioner.negative(cond), cond)
        with autocast(self.device):
            velocity = self.flow(SparseTensor(x_t.to(self.device), coords.to(self.device)),
                                 1000 * t.to(self.device), cond.to(self.device)).feats
        loss = F.mse_loss(velocity.float(), target.to(self.device))
        grad_norm = optimise(loss, self.flow_optimizer, self.flow_parameters(), self.grad_clip)
        self.average_flow()
        return {"loss": loss.item(), "t_mean": t.mean().item(), "grad_norm": grad_norm}

    # -- held-out metrics (TwoPhaseTrainer.evaluate; the module docstring) ----------------------
    def _image_metrics(self, latent: SparseTensor, index: Tensor) -> Tuple[float, float]:
        """Mean PSNR and mask IoU of the decoded ``latent`` (items ``0..b-1`` = held-out
        instances ``index``) against the ground truth from the first ``eval.views``
        cameras."""
        with autocast(self.device):
            raw = self.decoder(latent)
        g = self.decoder.gaussians(raw, latent.coords)
        views, psnrs, ious = slice(0, self.s.eval.views), [], []
        for item, i in enumerate(index.tolist()):
            out = render_gaussians(g, latent.coords[:, 0] == item,
                                   self.held_out.viewmats[i, views].to(self.device),
                                   self.held_out.Ks[i, views].to(self.device),
                                   self.s.data.render_resolution)
            rgb, alpha = ground_truth(self.held_out.rgba[i, views])
            psnrs.append(psnr(out.rgb.cpu(), rgb))
            ious.append(mask_iou(out.alpha.cpu(), alpha))
        return sum(psnrs) / len(psnrs), sum(ious) / len(ious)

    def _evaluate_vae(self) -> Dict[str, float]:
        psnrs, ious, counts = [], [], []
        for start in range(0, len(self.held_out), self.s.eval.batch_size):
            index = torch.arange(start, min(start + self.s.eval.batch_size, len(self.held_out)))
            x = self._voxels(self.held_out, index)
            with autocast(self.device):
                mean, _ = self.encoder(x)
            p, iou = self._image_metrics(x.replace(mean.float()), index)
            psnrs.append(p * len(index))
            ious.append(iou * len(index))
            counts.append(len(index))
        return {"vae_psnr": sum(psnrs) / sum(counts), "vae_mask_iou": sum(ious) / sum(counts)}

    def _evaluate_flow(self) -> Dict[str, float]:
        n = min(self.s.eval.flow_samples, len(self.held_out))
        index = torch.linspace(0, len(self.held_out) - 1, n).round().long()
        tokens = self.tokens(self.held_out.rgba[index, 0]).to(self.device)
        coords = self.held_out.batch_coords(index).to(self.device)
        normalization = {k: v.tolist() for k, v in self.normalization.items()}
        result = {}
        for name, cond in (("flow", tokens), ("flow_other_render", tokens.roll(1, 0))):
            generator = torch.Generator().manual_seed(self.seed)  # the same noise each time
            integrate = guided(self.flow_sampler(), cond, ImageConditioner.negative(cond))
            with autocast(self.device):
                latent = sample_latent(self.flow, integrate, coords, n, normalization, generator)
            result[f"{name}_psnr"], result[f"{name}_mask_iou"] = self._image_metrics(
                latent.replace(latent.feats.float()), index)
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "wall_s": self.wall_s,
                "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                "flow": self.flow.state_dict(),
                "vae_optimizer": self.vae_optimizer.state_dict(),
                "flow_optimizer": self.flow_optimizer.state_dict(),
                "rng": self.rng.get_state(), "normalization": self.normalization,
                "orders": {phase.value: order.state_dict()
                           for phase, order in self.orders.items()},
                "flow_average": self.average_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.wall_s = state["step"], state["wall_s"]
        self.load_weights(state)
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.flow_optimizer.load_state_dict(state["flow_optimizer"])
        self.rng.set_state(state["rng"])
        for phase, order in self.orders.items():
            order.load_state_dict(state["orders"][phase.value])
        self.load_average(state)

    def companion_weights(self, spec: PipelineSpec) -> Dict[str, Any]:
        """The pipeline's ``slat_normalization``: the flow's latents are the encoder's means
        normalised by it."""
        return {"normalization": {key: torch.tensor(values, dtype=torch.float32)
                                  for key, values in spec.slat_normalization.items()}}

    def load_companions(self, state: Dict[str, Any]) -> None:
        self.normalization = state["normalization"]

    # -- the released layout -------------------------------------------------------------------
    def pipeline_models(self) -> Dict[str, Tuple[str, nn.Module, str]]:
        return {"slat_encoder": ("SLatEncoder", self.encoder, "encoder"),
                "slat_decoder_gs": ("SLatGaussianDecoder", self.decoder, "decoder"),
                "slat_flow_model": ("SLatFlowModel", self.flow, "flow")}

    def export_pipeline(self, folder: Path) -> Path:
        """Write the stage-1 pipeline folder's contents completed with stage 2 (replacing a
        folder there): ``ckpts/`` gains the SLat encoder, Gaussian decoder and flow, and
        ``pipeline.json`` their entries, ``slat_sampler`` and ``slat_normalization``, in the
        released layout."""
        r, c = self.s.data.resolution, self.s.vae_size.latent_channels
        g = self.s.vae_size.num_gaussians
        patch = self.args["flow"]["patch_size"]
        refs = {"slat_encoder": f"ckpts/slat_enc_swin8_tiny_{r}l{c}",
                "slat_decoder_gs": f"ckpts/slat_dec_gs_swin8_tiny_{r}l{c}gs{g}",
                "slat_flow_model": f"ckpts/slat_flow_img_dit_tiny_{r}l{c}p{patch}"}
        spec = json.loads((self.structure_pipeline / PIPELINE_FILE).read_text())
        spec["args"]["models"].update(refs)
        spec["args"]["slat_sampler"] = sampler_entry(self.s.eval.sampler, self.s.flow.sigma_min)
        if self.normalization is not None:
            spec["args"]["slat_normalization"] = {
                k: v.tolist() for k, v in self.normalization.items()}

        with replacing_folder(Path(folder)) as tmp:
            # a shipped folder's manifest describes that folder, not this export
            shutil.copytree(self.structure_pipeline, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(MANIFEST))
            for key, (name, model, args) in self.pipeline_models().items():
                save_model(copy.deepcopy(model).cpu(), name, self.args[args], tmp, refs[key])
            (tmp / PIPELINE_FILE).write_text(json.dumps(spec, indent=2))
        return Path(folder)
