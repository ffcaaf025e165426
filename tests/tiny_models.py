"""Tiny randomly initialised diffusers pipelines, saved to disk, for offline tests.

Every model here is a few hundred kilobytes: building one and running a forward pass takes a
fraction of a second on a CPU. They have the real architectures (UNet2DConditionModel, SD3
transformer, AutoencoderKL, CLIP text encoders) and are saved with ``save_pretrained``, so tests
load them through the same ``from_pretrained`` path as real weights.

The CLIP tokenizer is built here from a byte-level vocabulary (each of the 256 byte symbols, on
its own and with the end-of-word marker ``</w>``, plus the start/end tokens) and no merges, so
every character of a word is one token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

MAX_LENGTH = 77  # tokenizer model_max_length and CLIP position embeddings
TEXT_HIDDEN = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols():
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def make_tokenizer(folder: Union[str, Path], max_length: int = MAX_LENGTH):
    """Write ``vocab.json`` + ``merges.txt`` into ``folder`` and build a CLIPTokenizer from them."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=max_length)


def _clip_config(tokenizer, projection_dim: int = TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37,
        projection_dim=projection_dim, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _jitter(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised layers (output projections) are not inert."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def build_tiny_sd(folder: Union[str, Path], prediction_type: str = "epsilon",
                  seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline (UNet + 4-channel VAE + CLIP) saved into ``folder``."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = make_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        unet = _jitter(UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=(4, 8), norm_num_groups=32, use_linear_projection=True))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type=prediction_type,
                                  clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_sd3(folder: Union[str, Path], seed: int = 0, shift: float = 3.0) -> Path:
    """A tiny StableDiffusion3Pipeline (SD3 transformer, 16-channel VAE, two CLIPs, no T5)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = make_tokenizer(folder.parent / f"{folder.name}-tokenizer-source")
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
        transformer = _jitter(SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=2 * TEXT_HIDDEN,
            caption_projection_dim=32, pooled_projection_dim=2 * TEXT_HIDDEN,
            pos_embed_max_size=16))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=1.5305,
            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_dinov2(folder: Union[str, Path], seed: int = 0) -> Path:
    """DINOv2 with registers (4 of them, patch 14, 518 px like the released model), 32 wide."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=518,
                                       num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(str(folder))
    return Path(folder)


def build_tiny_clip_text(folder: Union[str, Path], seed: int = 0) -> Path:
    """A CLIP text encoder and its tokenizer, saved together like a hub text-model folder."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder)
    tokenizer.save_pretrained(str(folder))
    CLIPTextModel(_clip_config(tokenizer)).save_pretrained(str(folder))
    return Path(folder)


def _t5_config(vocab_size: int, d_model: int = TEXT_HIDDEN):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                    pad_token_id=0, eos_token_id=1)


def build_tiny_t5_encoder(folder: Union[str, Path], seed: int = 0,
                          wo_scale: float = 1.0) -> Path:
    """A T5EncoderModel (gated-gelu, as T5 v1.1 / T5-XXL) with its CLIP-style byte tokenizer,
    saved together in float32. ``wo_scale`` multiplies the feed-forward output layers (``wo``,
    which transformers keeps in float32 under float16) to make their outputs large."""
    from transformers import T5EncoderModel

    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = make_tokenizer(folder)
        model = T5EncoderModel(_t5_config(len(tokenizer)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("wo.weight"):
                    p.mul_(wo_scale)
    tokenizer.save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    return folder


def build_tiny_sd3_t5(folder: Union[str, Path], seed: int = 0, shift: float = 3.0) -> Path:
    """:func:`build_tiny_sd3` with a third, T5 text encoder (``text_encoder_3``; its tokenizer is
    the byte-level CLIP one, which the pipeline only asks for ids) of the transformer's
    joint-attention width."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    folder = Path(folder)
    build_tiny_sd3(folder, seed=seed, shift=shift)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None,
                                                    tokenizer_3=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        t5 = T5EncoderModel(_t5_config(len(pipe.tokenizer), d_model=2 * TEXT_HIDDEN))
    pipe.register_modules(text_encoder_3=t5, tokenizer_3=pipe.tokenizer)
    pipe.save_pretrained(str(folder))
    return folder
