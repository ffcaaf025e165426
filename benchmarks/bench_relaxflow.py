"""RelaxFlow costs, measured in one run.

1. One relaxed cross-attention at stage-1 sizes (16^3 queries, N prior images of 1374 DINOv2
   tokens, 16 heads of 64): the explicit blurred-logit reference against ours (blurred queries
   and keys inside ``scaled_dot_product_attention``).
2. A whole stage-1 sampling run: observation only against RelaxFlow with N priors, same model
   (tiny by default, ``--released`` for TRELLIS-image-large sizes with random weights).

    python benchmarks/bench_relaxflow.py
    python benchmarks/bench_relaxflow.py --released --device cuda --dtype float16
    python benchmarks/bench_relaxflow.py --released --blocks 2 --skip-attention  # CPU: released
        widths, so each block's cost splits as at full size, with 2 of the 24 blocks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_generate import RELEASED, TINY, random_model  # noqa: E402
from benchmarks.timing import peak_growth_mb, time_call  # noqa: E402
from relaxflow.dual_branch import RelaxFlowSampler, pool_priors  # noqa: E402
from relaxflow.models.layers import attention  # noqa: E402
from relaxflow.relaxation import AttentionRelaxation, KeyLayout  # noqa: E402
from relaxflow.sampler import FlowEulerSampler  # noqa: E402


def attention_costs(n_priors: int, device, dtype, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    heads, dim = 16, 64
    relax = AttentionRelaxation(2.5, 2.5, query_grid=(16, 16, 16),
                                keys=KeyLayout(n_images=n_priors))
    q = torch.randn(1, 4096, heads, dim, generator=g).to(device, dtype)
    k = torch.randn(1, relax.keys.length(), heads, dim, generator=g).to(device, dtype)
    v = torch.randn_like(k)

    def ours():
        return attention(*relax.apply(q, k), v)

    def explicit():
        logits = relax.blurred_logits(q.float(), k.float())
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v.float())

    diff = (ours().float() - explicit()).abs().max().item()
    t_ours, t_explicit = (time_call(f, repeats, device, warmup=0, reduce=min)
                          for f in (ours, explicit))
    m_ours, m_explicit = (peak_growth_mb(f, device) for f in (ours, explicit))
    print(f"\nrelaxed cross-attention, 4096 queries x {relax.keys.length()} keys "
          f"({n_priors} priors), {heads} heads, {device}, {dtype}; max |difference| {diff:.2e}")
    print("| method | s (best of %d) | peak memory growth MiB |\n|---|---|---|" % repeats)
    print(f"| explicit blurred logits (fp32) | {t_explicit:.3f} | {m_explicit:.0f} |")
    print(f"| blurred queries and keys + SDPA | {t_ours:.3f} | {m_ours:.0f} |")
    print(f"speed-up {t_explicit / t_ours:.1f}x")


def sampling_costs(sizes, n_priors: int, steps: int, device, dtype, repeats: int,
                   pooling: str = "concat") -> None:
    flow = random_model("SparseStructureFlowModel", sizes["ss_flow"], device, dtype)
    C = sizes["ss_flow"]["cond_channels"]
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(1, 1374, C, generator=g).to(device)
    priors = pool_priors(torch.randn(n_priors, 1374, C, generator=g).to(device), pooling)
    noise = torch.randn(1, 8, 16, 16, 16, generator=g).to(device)
    base = FlowEulerSampler(steps=steps, cfg_strength=7.5, cfg_interval=(0.5, 1.0), rescale_t=3.0)
    sampler = RelaxFlowSampler(base=base, relaxation=AttentionRelaxation(
        2.5, 2.5, query_grid=(16, 16, 16),
        keys=KeyLayout(n_images=n_priors if pooling == "concat" else 1)))
    runs = {"observation only": lambda: base.sample(flow, noise, obs, torch.zeros_like(obs)),
            "RelaxFlow": lambda: sampler.sample(flow, noise, (obs, torch.zeros_like(obs)),
                                                (priors, torch.zeros_like(priors)))}
    seconds = {k: time_call(f, repeats, device, warmup=0, reduce=min) for k, f in runs.items()}
    memory = {k: peak_growth_mb(f, device) for k, f in runs.items()}
    flow_size = sizes["ss_flow"]
    print(f"\nstage-1 sampling, flow of {flow_size['model_channels']} channels x "
          f"{flow_size['num_blocks']} blocks, {steps} steps, guidance on t in [0.5, 1], alpha > 0 "
          f"on {sum(a > 0 for a in sampler.alphas())} steps, {n_priors} priors ({pooling}), "
          f"{device}, {dtype}")
    print("| run | s (best of %d) | peak memory growth MiB |\n|---|---|---|" % repeats)
    for k in runs:
        print(f"| {k} | {seconds[k]:.2f} | {memory[k]:.0f} |")
    print(f"ratio {seconds['RelaxFlow'] / seconds['observation only']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--released", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--priors", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, help="override the flow model's number of blocks")
    parser.add_argument("--pooling", default="concat", choices=["concat", "mean"],
                        help="how the prior images' tokens are pooled (the sampling runs)")
    parser.add_argument("--skip-attention", action="store_true",
                        help="time only the sampling runs")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if not args.skip_attention:
        attention_costs(args.priors, device, dtype, args.repeats)
    sizes = dict(RELEASED if args.released else TINY)
    if args.blocks:
        sizes["ss_flow"] = {**sizes["ss_flow"], "num_blocks": args.blocks}
    sampling_costs(sizes, args.priors, args.steps, device, dtype, args.repeats, args.pooling)


if __name__ == "__main__":
    main()
