"""Splat renderer timing: forward and forward+backward per (splats, image size).

Prints, per configuration, median seconds over repeats (after a warm-up), the number of
tile-splat intersections, the dense pixels x splats count for comparison, and the peak resident
memory growth during the timed calls. On CUDA it also times gsplat and prints torch/gsplat ratios.

    python benchmarks/bench_render.py                 # CPU, allocator tuned as run.py does
    python benchmarks/bench_render.py --no-malloc-tune  # glibc defaults, for comparison
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfd.cameras import sample_orbit_cameras  # noqa: E402
from cfd.renderers import rasterization  # noqa: E402
from core.runtime import tune_malloc  # noqa: E402
from benchmarks.timing import peak_memory_mb, reset_peak_memory, rss_mb, time_call  # noqa: E402

CONFIGS = [(5_000, 64), (20_000, 128), (100_000, 256)]
# Pure-PyTorch peers timed on this 2-core machine kind (shared/reference/cpu-performance.md):
# the faster one, 16 px tiles, forward+backward seconds.
PEER_FWD_BWD = {(5_000, 64): 0.121, (20_000, 128): 0.700}


def random_scene(n: int, device, seed: int = 0, log_scale: float = -4.0):
    """Uniform in a unit ball, random rotations, log-scales ~ N(log_scale, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = d * torch.rand(n, 1, generator=g) ** (1 / 3)
    tensors = [
        means, torch.randn(n, 4, generator=g),
        torch.randn(n, 3, generator=g) * 0.3 + log_scale,
        torch.randn(n, generator=g), torch.rand(n, 3, generator=g),
    ]
    return [t.to(device).requires_grad_() for t in tensors]


def bench(n: int, size: int, backend: str, device, repeats: int, log_scale: float):
    means, quats, log_scales, logit_opac, colors = random_scene(n, device, log_scale=log_scale)
    cams = sample_orbit_cameras(1, size, size, generator=torch.Generator().manual_seed(1),
                                device=device)
    info = {}

    def forward():
        out = rasterization(means, quats, log_scales.exp(), torch.sigmoid(logit_opac), colors,
                            cams.viewmats, cams.Ks, size, size, backend=backend)
        info["isect"] = out.info["n_intersections"]
        return out

    def forward_backward():
        out = forward()
        (out.rgb.sum() + out.alpha.sum() + out.depth.mean()).backward()

    t_fwd = time_call(lambda: forward(), repeats, device)
    host = torch.device("cpu")  # host memory on every device: the column is RSS growth
    base = rss_mb()
    reset_peak_memory(host)
    t_both = time_call(forward_backward, repeats, device)
    peak = peak_memory_mb(host) - base
    return t_fwd, t_both, info["isect"], peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-malloc-tune", action="store_true")
    parser.add_argument("--log-scale", type=float, default=-4.0,
                        help="mean log splat scale; -4 gives ~1 px splats at 128 px")
    args = parser.parse_args()
    tuned = False if args.no_malloc_tune else tune_malloc()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device} threads={torch.get_num_threads()} malloc_tuned={tuned} "
          f"torch={torch.__version__} log_scale={args.log_scale}")
    print("| splats | size | backend | forward s | fwd+bwd s | intersections | pixels x splats "
          "| peak RSS growth MB | peer fwd+bwd / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    backends = ["torch", "gsplat"] if device.type == "cuda" else ["torch"]
    for n, size in CONFIGS:
        results = {}
        for backend in backends:
            t_fwd, t_both, isect, peak = bench(n, size, backend, device, args.repeats,
                                               args.log_scale)
            results[backend] = t_both
            peer = PEER_FWD_BWD.get((n, size))
            ratio = f"{peer / t_both:.2f}x" if peer and device.type == "cpu" else "-"
            print(f"| {n} | {size} | {backend} | {t_fwd:.3f} | {t_both:.3f} | {isect} | "
                  f"{n * size * size:.2e} | {peak:.0f} | {ratio} |", flush=True)
        if len(results) == 2:
            print(f"torch/gsplat fwd+bwd ratio at ({n}, {size}): "
                  f"{results['torch'] / results['gsplat']:.1f}x")


if __name__ == "__main__":
    main()
