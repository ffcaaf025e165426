"""Stable Diffusion guidance timing: one distillation call at SD 2.1-base size, on CUDA.

Builds a UNet2DConditionModel and an AutoencoderKL with the Stable Diffusion 2.1-base
architecture (random weights: timing does not depend on them, and nothing is downloaded), wraps
them in ``StableDiffusionGuidance`` and times, for a batch of 512 px renders with classifier-free
guidance (conditional and unconditional branches in one UNet batch) in fp16:

* ``encode``: renders -> VAE latents (forward);
* ``unet``: one UNet forward on the CFG batch (2 x batch);
* ``call``: the whole guidance call (encode + noise + CFG UNet + surrogate loss);
* ``call+backward``: the call and the backward pass through the VAE encoder to the renders.

Each line is the median over ``--repeats`` timed runs after ``--warmup`` runs.

    python benchmarks/bench_guidance_sd.py              # needs a GPU; on CPU it says so, exits 0
    python benchmarks/bench_guidance_sd.py --batch 8 --repeats 20
    python benchmarks/bench_guidance_sd.py --smoke      # tiny models, any device: checks the script
    python benchmarks/bench_guidance_sd.py --save-pipeline /tmp/sd21-random
        # writes that architecture as a diffusers folder, for bench_step.py's whole-step timing:
        # bench_step.py --config configs/cfd-splats-sd21.yaml guidance.model_id=/tmp/sd21-random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import time_call  # noqa: E402
from guidance.stable_diffusion import StableDiffusionConfig, StableDiffusionGuidance  # noqa: E402

# Architecture of stable-diffusion-2-1-base (unet/config.json and vae/config.json values).
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    dual_cross_attention=False, upcast_attention=False,
)
SD21_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    norm_num_groups=32, scaling_factor=0.18215,
)
TEXT_TOKENS, TEXT_DIM = 77, 1024  # OpenCLIP ViT-H/14 hidden states, as SD 2.1 sees them

# --smoke: the same code path on tiny models.
TINY_UNET = dict(SD21_BASE_UNET, block_out_channels=(32, 32, 64, 64),
                 attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32, layers_per_block=1)
TINY_VAE = dict(SD21_BASE_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                norm_num_groups=8)


class FixedPrompt:
    """Stands in for a PromptProcessor: random text states, the same for every view."""

    def __init__(self, device, dtype, tokens: int, dim: int, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.cond = torch.randn(1, tokens, dim, generator=g).to(device, dtype)
        self.uncond = torch.randn(1, tokens, dim, generator=g).to(device, dtype)

    def __call__(self, elevation, azimuth):
        B = elevation.shape[0]
        return ({"encoder_hidden_states": self.cond.expand(B, -1, -1)},
                {"encoder_hidden_states": self.uncond.expand(B, -1, -1)})


def random_models(device, smoke: bool):
    """The SD 2.1-base UNet, VAE and noise schedule with random weights (``smoke``: tiny)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device (fast on a GPU)
        unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD21_BASE_UNET))
        vae = AutoencoderKL(**(TINY_VAE if smoke else SD21_BASE_VAE))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon",
                              clip_sample=False, steps_offset=1)
    return unet, vae, scheduler


def build_guidance(device, dtype, smoke: bool, resolution: int) -> StableDiffusionGuidance:
    unet, vae, scheduler = random_models(device, smoke)
    cfg = StableDiffusionConfig(model_id="random:sd-2-1-base-architecture", resolution=resolution,
                                half_precision=dtype == torch.float16)
    return StableDiffusionGuidance(unet, vae, None, None, scheduler, cfg, device=device,
                                   dtype=dtype)


def save_random_pipeline(folder: Path, smoke: bool) -> Path:
    """The SD 2.1-base UNet and VAE (random weights) as a StableDiffusionPipeline folder that
    ``guidance.model_id`` loads. The text encoder is a one-layer CLIP of the real width (1024):
    it runs once per prompt, so its size does not matter to a step's time."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_models import make_tokenizer

    unet, vae, scheduler = random_models("cuda" if torch.cuda.is_available() else "cpu", smoke)
    width = 32 if smoke else TEXT_DIM
    tokenizer = make_tokenizer(folder.parent / f"{folder.name}-tokenizer-source", TEXT_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=TEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512, help="render and model size, px")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--fp32", action="store_true", help="float32 instead of float16")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 64 px, any device (checks the script, not the speed)")
    parser.add_argument("--save-pipeline", type=Path, metavar="DIR",
                        help="only write the random-weight pipeline folder (any device)")
    args = parser.parse_args(argv)

    if args.save_pipeline:
        print(f"wrote {save_random_pipeline(args.save_pipeline, args.smoke)}")
        return 0

    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.resolution, args.repeats, args.warmup = 64, 2, 1
    elif not torch.cuda.is_available():
        print("bench_guidance_sd: needs a CUDA GPU (SD 2.1-size UNet in fp16); skipping.")
        return 0
    else:
        device = torch.device("cuda")
    dtype = torch.float32 if (args.fp32 or device.type == "cpu") else torch.float16

    guidance = build_guidance(device, dtype, args.smoke, args.resolution)
    prompt = FixedPrompt(device, dtype, TEXT_TOKENS, 32 if args.smoke else TEXT_DIM)
    B, R = args.batch, args.resolution
    g = torch.Generator(device="cpu").manual_seed(1)
    rgb = torch.rand(B, R, R, 3, generator=g).to(device).requires_grad_()
    views = SimpleNamespace(elevation=torch.zeros(B), azimuth=torch.linspace(-180, 180, B + 1)[:-1])
    noise = torch.randn(B, *guidance.latent_shape(R, R), generator=g).to(device)
    t = torch.rand(B, generator=g) * 0.96 + 0.02
    cond, uncond = prompt(views.elevation, views.azimuth)
    both = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"],
                                                uncond["encoder_hidden_states"]])}
    x_cfg = torch.randn(2 * B, *noise.shape[1:], generator=g).to(device)
    t_cfg = torch.cat([t, t])

    def encode():
        with torch.no_grad():
            guidance.encode(rgb)

    def unet():
        with torch.no_grad():
            guidance.model_output(x_cfg, t_cfg, both)

    def call():
        guidance(rgb, views, prompt, t, noise, guidance_scale=args.guidance_scale)

    def call_backward():
        rgb.grad = None
        guidance(rgb, views, prompt, t, noise, guidance_scale=args.guidance_scale)[
            "loss_sds"].backward()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"SD guidance{' (SMOKE: tiny models)' if args.smoke else ''}: batch {B}, {R} px renders, "
          f"latents {tuple(noise.shape[1:])}, CFG batch {2 * B}, {str(dtype).split('.')[-1]}, "
          f"{name}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for label, fn in (("encode", encode), ("unet forward (CFG)", unet), ("call", call),
                      ("call+backward", call_backward)):
        seconds = time_call(fn, args.repeats, device, warmup=args.warmup)
        print(f"  {label:<20s} {seconds:8.4f} s  (median of {args.repeats})")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  peak GPU memory      {peak:8.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
