"""Generator stage timings and peak memory with random weights (no checkpoint needed).

Stage 1 samples the structure latent and decodes it; stage 2 samples the structured latent on a
fixed synthetic structure (a spherical shell of about ``--voxels`` voxels: random weights would
decode a random occupancy of a large part of the grid, unlike a trained decoder); the Gaussian
decoder turns it into splats.

    python benchmarks/bench_generate.py                         # tiny models, CPU
    python benchmarks/bench_generate.py --released --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import peak_memory_mb, reset_peak_memory, time_call  # noqa: E402
from relaxflow.models import build  # noqa: E402
from relaxflow.sampler import FlowEulerSampler  # noqa: E402
from relaxflow.stages import decode_splats, guided, sample_latent, sample_structure  # noqa: E402

REP = {"lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0,
              "_rotation": 0.1}, "perturb_offset": True, "voxel_size": 1.5, "num_gaussians": 32,
       "3d_filter_kernel_size": 9e-4, "scaling_bias": 4e-3, "opacity_bias": 0.1,
       "scaling_activation": "softplus"}
RELEASED = {  # TRELLIS-image-large
    "ss_flow": dict(resolution=16, in_channels=8, model_channels=1024, cond_channels=1024,
                    out_channels=8, num_blocks=24, num_heads=16, patch_size=1,
                    qk_rms_norm=True, use_fp16=True),
    "ss_dec": dict(out_channels=1, latent_channels=8, num_res_blocks=2, channels=[512, 128, 32],
                   use_fp16=True),
    "slat_flow": dict(resolution=64, in_channels=8, model_channels=1024, cond_channels=1024,
                      out_channels=8, num_blocks=24, num_heads=16, patch_size=2,
                      io_block_channels=[128], qk_rms_norm=True, use_fp16=True),
    "gs_dec": dict(resolution=64, model_channels=768, latent_channels=8, num_blocks=12,
                   num_heads=12, window_size=8, use_fp16=True, representation_config=REP),
    "cond_tokens": 1374,
}
TINY = {
    "ss_flow": {**RELEASED["ss_flow"], "model_channels": 64, "cond_channels": 64,
                "num_blocks": 2, "num_heads": 2},
    "ss_dec": {**RELEASED["ss_dec"], "channels": [32, 16, 8], "num_res_blocks": 1},
    "slat_flow": {**RELEASED["slat_flow"], "model_channels": 64, "cond_channels": 64,
                  "num_blocks": 2, "num_heads": 2, "io_block_channels": [16]},
    "gs_dec": {**RELEASED["gs_dec"], "model_channels": 48, "num_blocks": 2, "num_heads": 2},
    "cond_tokens": 1374,
}


def shell_coords(n_voxels: int, resolution: int = 64) -> torch.Tensor:
    """Voxels of a sphere shell with about ``n_voxels`` sites (thicker than one voxel when a
    thin shell that large does not fit the grid), ``[N, 4]``."""
    radius = min((n_voxels / (4 * torch.pi)) ** 0.5, 0.4 * resolution)
    thickness = max(1.0, n_voxels / (4 * torch.pi * radius ** 2))
    grid = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1)
    distance = (grid.float() - (resolution - 1) / 2).norm(dim=-1)
    xyz = torch.argwhere((distance - radius).abs() < thickness / 2)
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()


def random_model(name, args, device, dtype):
    model = build(name, args, device="meta", half_dtype=dtype if dtype != torch.float32 else None)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
        if hasattr(model, "pos_emb"):  # buffers are not random: rebuild them
            model.pos_emb.copy_(build(name, args).pos_emb.to(device))
        if hasattr(model, "offset_perturbation"):
            model.offset_perturbation.copy_(build(name, args).offset_perturbation.to(device))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--released", action="store_true", help="TRELLIS-image-large sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--voxels", type=int, default=20000)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = RELEASED if args.released else TINY
    cond = torch.randn(1, sizes["cond_tokens"], sizes["ss_flow"]["cond_channels"], device=device)
    neg = torch.zeros_like(cond)
    sampler = FlowEulerSampler(steps=args.steps, cfg_strength=5.0, cfg_interval=(0.5, 1.0),
                               rescale_t=3.0)
    g = torch.Generator().manual_seed(0)
    rows = []

    def timed(stage, fn):
        out = []
        reset_peak_memory(device)
        seconds = time_call(lambda: out.append(fn()), 1, device, warmup=0)
        rows.append((stage, seconds, peak_memory_mb(device) / 1024))
        return out[0]

    # One stage's models at a time, as the generate job holds them; building is not timed.
    def structure():
        flow = random_model("SparseStructureFlowModel", sizes["ss_flow"], device, dtype)
        decoder = random_model("SparseStructureDecoder", sizes["ss_dec"], device, dtype)
        return timed("structure (flow + decoder)", lambda: sample_structure(
            flow, decoder, guided(sampler, cond, neg), 1, g, device)[1])

    def latent(shell):
        flow = random_model("SLatFlowModel", sizes["slat_flow"], device, dtype)
        return timed(f"latent ({len(shell)} voxels)",
                     lambda: sample_latent(flow, guided(sampler, cond, neg), shell, 1, None, g))

    def gaussians(slat):
        decoder = random_model("SLatGaussianDecoder", sizes["gs_dec"], device, dtype)
        return timed("gaussian decoder", lambda: decode_splats(decoder, slat))

    coords = structure()
    (splats,) = gaussians(latent(shell_coords(args.voxels).to(device)))
    print(f"{'released' if args.released else 'tiny'} models, {device}, {args.dtype}, "
          f"{args.steps} + {args.steps} steps, cfg on [0.5, 1]; stage 1 decoded "
          f"{len(coords)} voxels (random weights); {len(splats)} splats")
    memory = "peak allocated GiB" if device.type == "cuda" else "peak RSS GiB (per stage)"
    print(f"| stage | s | {memory} |\n|---|---|---|")
    for stage, seconds, peak in rows:
        print(f"| {stage} | {seconds:.2f} | {peak:.2f} |")
    total = sum(r[1] for r in rows)
    print(f"| total | {total:.2f} | |")


if __name__ == "__main__":
    main()
