"""The trained generator's sizes, as the released classes' arguments, and how its models start.

Released stage 1 (``relaxflow_trellis.md`` B.2, B.3): a 64^3 occupancy, a 16^3 x 8 latent (three
VAE levels, channels 32/128/512), a 1024-wide, 24-block DiT over the latent conditioned on
1374 DINOv2-L tokens (1024 wide). Here every width and depth shrinks so a 2-core CPU trains it,
while the grid-to-latent ratio stays the released one (8 occupancy cells per latent value):
a 32^3 occupancy, three levels to an 8^3 x 8 latent, a 128-wide DiT over its 512 tokens, and a
64-wide DINOv2 with registers whose 37-px patches give 14 x 14 + 5 = 201 tokens at the released
518 px input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

IMAGE_SIZE = 518  # the conditioner's input, as relaxflow.conditioning preprocesses any image


@dataclass
class VaeSize:
    """``SparseStructureEncoder`` / ``SparseStructureDecoder`` (the decoder's channels are the
    encoder's reversed)."""

    channels: List[int] = field(default_factory=lambda: [8, 32, 64])  # released [32, 128, 512]
    latent_channels: int = 8
    num_res_blocks: int = 1  # released 2
    num_res_blocks_middle: int = 1  # released 2


@dataclass
class FlowSize:
    """``SparseStructureFlowModel`` (its resolution and condition width follow from the VAE and
    the conditioner)."""

    model_channels: int = 128  # released 1024
    num_blocks: int = 4  # released 24
    num_head_channels: int = 32  # released 64
    mlp_ratio: float = 4.0
    patch_size: int = 1


@dataclass
class ConditionerSize:
    """A ``Dinov2WithRegistersModel`` (random, frozen) at the released 518 px input."""

    hidden_size: int = 64  # released 1024
    num_hidden_layers: int = 2  # released 24
    num_attention_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 37  # 518 / 37 = 14 patches a side (released: 14 px, 37 a side)
    num_register_tokens: int = 4


def latent_resolution(occupancy_resolution: int, vae: VaeSize) -> int:
    """Cells per side of the latent: the occupancy's, halved at each VAE level but the first."""
    return occupancy_resolution // 2 ** (len(vae.channels) - 1)


def encoder_args(vae: VaeSize) -> Dict[str, Any]:
    return {"in_channels": 1, "latent_channels": vae.latent_channels,
            "num_res_blocks": vae.num_res_blocks, "channels": list(vae.channels),
            "num_res_blocks_middle": vae.num_res_blocks_middle, "norm_type": "layer",
            "use_fp16": False}


def decoder_args(vae: VaeSize) -> Dict[str, Any]:
    return {"out_channels": 1, "latent_channels": vae.latent_channels,
            "num_res_blocks": vae.num_res_blocks, "channels": list(reversed(vae.channels)),
            "num_res_blocks_middle": vae.num_res_blocks_middle, "norm_type": "layer",
            "use_fp16": False}


def flow_args(flow: FlowSize, resolution: int, latent_channels: int,
              cond_channels: int) -> Dict[str, Any]:
    return {"resolution": resolution, "in_channels": latent_channels,
            "out_channels": latent_channels, "model_channels": flow.model_channels,
            "cond_channels": cond_channels, "num_blocks": flow.num_blocks,
            "num_head_channels": flow.num_head_channels, "mlp_ratio": flow.mlp_ratio,
            "patch_size": flow.patch_size, "pe_mode": "ape", "qk_rms_norm": True,
            "use_fp16": False}


def conditioner_config(size: ConditionerSize):
    """The transformers config of the conditioner."""
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(
        hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, intermediate_size=size.intermediate_size,
        patch_size=size.patch_size, image_size=IMAGE_SIZE,
        num_register_tokens=size.num_register_tokens)


def condition_tokens_count(size: ConditionerSize) -> int:
    """Tokens per image: class, registers, patches."""
    return 1 + size.num_register_tokens + (IMAGE_SIZE // size.patch_size) ** 2


def build_conditioner_model(size: ConditionerSize, seed: int) -> nn.Module:
    """The random conditioner, the same for a seed (its own RNG, the global one untouched)."""
    from transformers import Dinov2WithRegistersModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2WithRegistersModel(conditioner_config(size))
    return model.eval().requires_grad_(False)


def initialise_vae(model: nn.Module) -> None:
    """TRELLIS's start for the conv VAE: each residual block's last convolution at zero, so
    every block starts as its skip connection."""
    for block in model.modules():
        if hasattr(block, "conv2") and hasattr(block, "skip_connection"):
            nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(block.conv2.bias)


def initialise_encoder(model: nn.Module, logvar: float = -6.0) -> None:
    """:func:`initialise_vae`, and the posterior's log-variance starting at ``logvar`` (a
    standard deviation of 0.05): with TRELLIS's unit start the sampled latent is mostly noise,
    the decoder learns to ignore it and a short run stalls at the mean occupancy; starting
    almost deterministic, the decoder reads the latent from the first steps and the KL term
    widens the posterior as it trains."""
    initialise_vae(model)
    out = model.out_layer[-1]
    with torch.no_grad():
        out.bias[out.out_channels // 2:] = logvar


def initialise_flow(model: nn.Module) -> None:
    """TRELLIS's start for the DiT (adaLN-zero): Xavier-uniform linears with zero biases, the
    timestep MLP at N(0, 0.02), and every modulation and the output layer at zero, so each
    block starts as the identity and the model's first velocity is zero."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)


# -- stage 2 -------------------------------------------------------------------------------------
@dataclass
class SlatVaeSize:
    """``SLatEncoder`` and ``SLatGaussianDecoder`` (the same torso). Released: model 768, 12
    blocks, 12 heads (64 wide), window 8 on 64^3, latent 8, 32 Gaussians per voxel."""

    model_channels: int = 64  # released 768
    num_blocks: int = 4  # released 12
    num_head_channels: int = 32  # released 64
    # Released 8 on 64^3; 4 on 32^3 spans the same eighth of the box. (8 here, windows of up
    # to 512 voxels padded to the fullest, made the attention 2x the step's time.)
    window_size: int = 4
    latent_channels: int = 8
    # Released 32 per 1/64 voxel; few here, so the CPU rasteriser stays fast (its time grows
    # with the Gaussians it draws).
    num_gaussians: int = 8
    # The Gaussians' rest size (released 0.004 with 32 per 1/64 voxel): about half of a 1/32
    # voxel's side with 8 (2 a side) per voxel.
    scaling_bias: float = 0.008


@dataclass
class SlatFlowSize:
    """``SLatFlowModel`` (its resolution and condition width follow from the data and the
    stage-1 conditioner). Released: model 1024, 24 blocks, 16 heads, patch 2 with io blocks
    [128], 2 io residual blocks a level."""

    model_channels: int = 128
    num_blocks: int = 4
    num_head_channels: int = 32
    mlp_ratio: float = 4.0
    io_block_channels: List[int] = field(default_factory=lambda: [32])  # patch 2 ** len
    num_io_res_blocks: int = 1


def slat_representation(size: SlatVaeSize) -> Dict[str, Any]:
    """The decoder's ``representation_config``: the released one's, with this size's Gaussians
    per voxel and rest size."""
    return {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0,
                   "_rotation": 0.1},
            "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": size.num_gaussians,
            "2d_filter_kernel_size": 0.1, "3d_filter_kernel_size": 9e-4,
            "scaling_bias": size.scaling_bias, "opacity_bias": 0.1,
            "scaling_activation": "softplus"}


def slat_encoder_args(size: SlatVaeSize, resolution: int, in_channels: int) -> Dict[str, Any]:
    return {"resolution": resolution, "in_channels": in_channels,
            "model_channels": size.model_channels, "latent_channels": size.latent_channels,
            "num_blocks": size.num_blocks, "num_head_channels": size.num_head_channels,
            "mlp_ratio": 4.0, "attn_mode": "swin", "window_size": size.window_size,
            "pe_mode": "ape", "use_fp16": False, "use_checkpoint": False, "qk_rms_norm": False}


def slat_decoder_args(size: SlatVaeSize, resolution: int) -> Dict[str, Any]:
    return {"resolution": resolution, "model_channels": size.model_channels,
            "latent_channels": size.latent_channels, "num_blocks": size.num_blocks,
            "num_head_channels": size.num_head_channels, "mlp_ratio": 4.0, "attn_mode": "swin",
            "window_size": size.window_size, "pe_mode": "ape", "use_fp16": False,
            "use_checkpoint": False, "qk_rms_norm": False,
            "representation_config": slat_representation(size)}


def slat_flow_args(size: SlatFlowSize, resolution: int, latent_channels: int,
                   cond_channels: int) -> Dict[str, Any]:
    return {"resolution": resolution, "in_channels": latent_channels,
            "out_channels": latent_channels, "model_channels": size.model_channels,
            "cond_channels": cond_channels, "num_blocks": size.num_blocks,
            "num_head_channels": size.num_head_channels, "mlp_ratio": size.mlp_ratio,
            "patch_size": 2 ** len(size.io_block_channels),
            "num_io_res_blocks": size.num_io_res_blocks,
            "io_block_channels": list(size.io_block_channels), "pe_mode": "ape",
            "qk_rms_norm": True, "use_fp16": False}


def initialise_slat_vae(model: nn.Module, logvar: Optional[float] = None) -> None:
    """TRELLIS's start for the SLat VAE's transformers: Xavier-uniform linears with zero biases
    and the output layer at zero (the decoder's Gaussians start at rest: at their voxel's
    perturbation points, rest size, opacity 0.1, grey). ``logvar``: the encoder's posterior
    log-variance starts there instead of at 0 (see :func:`initialise_encoder`: near
    deterministic, so the decoder reads the latent from the first steps)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    nn.init.zeros_(model.out_layer.weight)
    nn.init.zeros_(model.out_layer.bias)
    if logvar is not None:
        with torch.no_grad():
            model.out_layer.bias[model.out_layer.out_features // 2:] = logvar


def initialise_slat_encoder(model: nn.Module, logvar: float = -6.0) -> None:
    """:func:`initialise_slat_vae` with the posterior's log-variance at ``logvar``, and each
    transformer block's output projections (attention's ``to_out``, the MLP's last linear) at
    zero, so every block starts as the identity: the torso's output is then a layer-normed
    linear map of the voxel features and positions, which
    :func:`relaxflow.training.slat.fit_latent_readout` reads the latent from. (With TRELLIS's
    start the latent carries nothing for the decoder to read and a short run learns only the
    mean colour: 150 steps at the stage-2 config's sizes on 34 shapes gave a held-out PSNR of
    20.9 dB (mask IoU 0.91), every shape in the dataset's average colours; with this start and
    the readout 24.0 dB (0.92), each shape's colours appearing; with the features themselves
    as the latent, 25.2 dB.)"""
    initialise_slat_vae(model, logvar)
    for block in model.blocks:
        for layer in (block.attn.to_out, block.mlp.mlp[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


def initialise_slat_flow(model: nn.Module) -> None:
    """:func:`initialise_flow`, and the io residual blocks' last convolutions at zero (each
    starts as its skip connection, TRELLIS's start)."""
    initialise_flow(model)
    for block in [*model.input_blocks, *model.out_blocks]:
        nn.init.zeros_(block.conv2.conv.weight)
        nn.init.zeros_(block.conv2.conv.bias)
