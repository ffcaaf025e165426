#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command: the gpu tests, the GPU benchmark rows of
# BENCHMARKS.md, and short runs of the GPU jobs with random-weight models of the real sizes.
#
#   bash benchmarks/gpu_suite.sh LOG_DIR [PART ...]
#
# PART is any of: tests render guidance step nerf generate relaxflow jobs (default: all, in that
# order). Each part writes LOG_DIR/<part>.log and prints its exit status and last line; a part
# that fails does not stop the others. gsplat and nerfacc compile their CUDA code on first use
# (minutes, cached under ~/.cache/torch_extensions), so `tests` goes first.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:?usage: gpu_suite.sh LOG_DIR [PART ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests render guidance step nerf generate relaxflow jobs)
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
sd21=${SD21_RANDOM:-/tmp/sd21-random}  # SD 2.1-base architecture, random weights
runs=$(mktemp -d)

sd21_pipeline() {
    [ -f "$sd21/model_index.json" ] || python benchmarks/bench_guidance_sd.py --save-pipeline "$sd21"
}

part() {
    case $1 in
    tests) python -m pytest -m gpu -q -rs ;;
    render) python benchmarks/bench_render.py ;;
    guidance) python benchmarks/bench_guidance_sd.py ;;
    step)
        sd21_pipeline && python benchmarks/bench_step.py --config configs/cfd-splats-sd21.yaml \
            guidance.model_id="$sd21" &&
            python benchmarks/bench_step.py --config configs/cfd-splats-embedded.yaml device=cuda ;;
    nerf) python benchmarks/bench_nerf.py --device cuda && \
        python benchmarks/bench_nerf.py --device cuda --size 256 ;;
    generate) python benchmarks/bench_generate.py --released --device cuda --dtype float16 ;;
    relaxflow) python benchmarks/bench_relaxflow.py --released --device cuda --dtype float16 ;;
    jobs)
        # The main job on the GPU (gsplat backend) must still pass its ground-truth check; the SD
        # jobs run a few hundred steps on random weights: they check the path, not the quality.
        sd21_pipeline &&
            python run.py --config configs/cfd-splats-embedded.yaml device=cuda output_dir="$runs" &&
            python run.py --config configs/cfd-splats-sd21.yaml guidance.model_id="$sd21" \
                steps=300 densify.refine_start_iter=100 densify.refine_stop_iter=250 \
                densify.refine_every=50 output_dir="$runs" &&
            python run.py --config configs/cfd-nerf-sd21.yaml guidance.model_id="$sd21" \
                steps=300 output_dir="$runs" ;;
    *) echo "unknown part $1"; return 2 ;;
    esac
}

for p in "${parts[@]}"; do
    start=$SECONDS
    part "$p" >"$logs/$p.log" 2>&1
    rc=$?
    echo "$p: rc=$rc in $((SECONDS - start)) s; $(tail -n 1 "$logs/$p.log")"
done
