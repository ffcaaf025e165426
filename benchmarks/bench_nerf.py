"""NeRF renderer throughput: rays per second, forward and forward+backward, measured in one run.

The pure-PyTorch hash grid (CPU default sizes and the official CFD sizes) under nerfacc's batched
volume rendering with a fixed number of samples per ray. On CUDA with tinycudann installed it
also times the tcnn grid and prints tcnn/torch ratios. Then, on the CPU default grid: what the
gradient budget (``max_grad_samples``) saves (bytes autograd keeps for the backward, and speed)
and what shading costs (analytic normals need a double backward).

    python benchmarks/bench_nerf.py
    python benchmarks/bench_nerf.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import time_call  # noqa: E402
from cfd.cameras import sample_orbit_cameras  # noqa: E402
from cfd.renderers import render  # noqa: E402
from cfd.scene import HashGridConfig, NeRFConfig, NeRFField  # noqa: E402
from cfd.scene.hash_grid import tcnn_available  # noqa: E402

GRIDS = {"cpu default": HashGridConfig(),
         "official CFD": HashGridConfig(n_levels=16, log2_hashmap_size=20, max_resolution=4096)}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs (each storage
    once): the memory a backward needs beyond the forward's outputs."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def budget_and_shading(cams, samples: int, repeats: int, device) -> None:
    from cfd.renderers.shading import Lighting

    field = NeRFField(NeRFConfig(grid=GRIDS["cpu default"]), device,
                      torch.Generator().manual_seed(0))
    B = len(cams)
    lighting = Lighting(torch.nn.functional.normalize(cams.centers, dim=-1),
                        torch.full((B,), 0.1, device=device), torch.full((B,), 0.9, device=device),
                        torch.zeros(B, dtype=torch.bool, device=device))
    total = B * cams.width * cams.height * samples
    rows = [("all samples", {}), ("budget 50%", {"max_grad_samples": total // 2}),
            ("budget 10%", {"max_grad_samples": total // 10}),
            ("shaded (normals)", {"lighting": lighting})]
    print("\n| cpu default grid | forward+backward rays/s | saved for backward (MB) | ratio |\n"
          "|---|---|---|---|")
    reference = None
    for name, options in rows:
        generator = torch.Generator().manual_seed(0)

        def step():
            render(field, cams, n_samples=samples, generator=generator,
                   **options).rgb.sum().backward()

        seconds = time_call(step, repeats, device)
        mb = saved_bytes(lambda: render(field, cams, n_samples=samples, generator=generator,
                                        **options)) / 2**20
        reference = reference or mb
        print(f"| {name} | {B * cams.width * cams.height / seconds:,.0f} | {mb:,.0f} | "
              f"{mb / reference:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="render width and height")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64, help="samples per ray")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    cams = sample_orbit_cameras(args.views, args.size, args.size, distance_range=(2.4, 2.6),
                                generator=torch.Generator().manual_seed(0)).to(device)
    rays = args.views * args.size * args.size
    print(f"{args.views} views of {args.size}x{args.size} = {rays} rays, {args.samples} samples "
          f"each, {device}, {torch.get_num_threads()} threads")
    print("| grid | backend | forward rays/s | forward+backward rays/s |\n|---|---|---|---|")
    backends = ["torch"] + (["tcnn"] if device.type == "cuda" and tcnn_available() else [])
    for name, grid in GRIDS.items():
        speeds = {}
        for backend in backends:
            field = NeRFField(NeRFConfig(grid=replace(grid, backend=backend)), device,
                              torch.Generator().manual_seed(0))

            def forward():
                with torch.no_grad():
                    return render(field, cams, n_samples=args.samples)

            def forward_backward():
                render(field, cams, n_samples=args.samples).rgb.sum().backward()

            fwd = time_call(forward, args.repeats, device)
            both = time_call(forward_backward, args.repeats, device)
            speeds[backend] = both
            print(f"| {name} | {backend} | {rays / fwd:,.0f} | {rays / both:,.0f} |")
        if "tcnn" in speeds:
            print(f"tcnn / torch forward+backward speed-up ({name}): "
                  f"{speeds['torch'] / speeds['tcnn']:.1f}x")
    budget_and_shading(cams, args.samples, args.repeats, device)


if __name__ == "__main__":
    main()
