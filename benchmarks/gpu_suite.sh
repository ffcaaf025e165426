#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command that fits a 10-minute device call: the gpu
# tests, the GPU benchmark rows of BENCHMARKS.md and short GPU runs of the jobs, with random
# weights of the real model sizes.
#
#   bash benchmarks/gpu_suite.sh LOG_DIR [PART ...]     # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run              # here, on the CPU: checks the plan
#
# Parts, budgets and wheels are in benchmarks/gpu_suite_plan.py (`... parts` lists them). They
# run in order of value: install (the carried wheels), build (gsplat's and nerfacc's CUDA JIT
# builds, sm_90 only), tests (pytest -m gpu), step (SD 2.1-base sized step against its floor),
# generate and relaxflow (released sizes, fp16), then render, guidance, nerf and jobs. Each part
# runs under `timeout` with its budget (they add up to <= 600 s; a deadline of SUITE_DEADLINE s,
# default 590, also stops the suite as a whole) and a failing part does not stop the others.
# Everything goes to two files in LOG_DIR as it happens, so a run cut off still reports what it
# finished: suite.log (every part's output, headed "=== part") and summary.tsv (one row per
# finished part: part, status ok/fail/timeout/skipped, rc, seconds, budget, last line). Two files
# only: a lent machine returns at most 8 from $OUT, so pass LOG_DIR=$OUT there:
#
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu_suite.sh $OUT
#
# The wheel folder (WHEELS, default .whl, ignored by git) holds what the GPU image lacks, made
# here on the CPU machine (it reaches PyPI) with
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata gsplat nerfacc \
#       omegaconf antlr4-python3-runtime plyfile PyMCubes
#
# What that gave on 2026-12-03: gsplat-1.5.3-py3-none-any (6.2 MiB) and nerfacc-0.5.3-py3-none-
# any (0.05 MiB) are pure-Python wheels holding their CUDA sources, which JIT-compile on first
# use (the `build` part; cached under ~/.cache/torch_extensions, gone with the machine);
# diffusers-0.42.1 (6.1 MiB), PyMCubes-0.1.6 cp312 manylinux (0.3 MiB), omegaconf-2.4.0,
# antlr4-python3-runtime-4.13.2, plyfile-1.1.5, importlib_metadata-10.2.0: 13.1 MiB in all.
# tiny-cuda-nn is not on PyPI and takes longer to build than the lease: its tests skip.
# `--dry-run` checks, without a GPU, that every wheel the suite needs is in WHEELS, one version
# each, for Python 3.12 (cp312, abi3 or py3-none-any) on x86-64 Linux, that the working tree plus
# the wheels stay under 64 MiB and that the budgets add up to <= 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export WHEELS=${WHEELS:-.whl}
if [ "${1:-}" = "--dry-run" ]; then
    exec python3 benchmarks/gpu_suite_plan.py check --wheels "$WHEELS" --script "$0"
fi
logs=${1:?usage: gpu_suite.sh LOG_DIR [PART ...] | gpu_suite.sh --dry-run}
shift
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
declare -A budget
order=()
while read -r name secs; do budget[$name]=$secs; order+=("$name"); done \
    < <(python3 benchmarks/gpu_suite_plan.py parts)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${order[@]}")

export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SD21=${SD21_RANDOM:-/tmp/sd21-random}  # SD 2.1-base architecture, random weights
export SITE=/tmp/gpu-suite-site RUNS=$(mktemp -d)
[ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
deadline=$((SECONDS + ${SUITE_DEADLINE:-590}))

part() {
    case $1 in
    install)
        ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: using what is installed"; return 0; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl && python3 -c "import diffusers, gsplat, nerfacc; print('installed')" ;;
    build)
        # Both JIT builds at once (gsplat has 20 CUDA files, nerfacc 4); each uses MAX_JOBS.
        python3 -c "from gsplat.cuda._backend import _C; assert _C is not None; print('gsplat built')" &
        g=$!
        python3 -c "from nerfacc.cuda._backend import _C; assert _C is not None; print('nerfacc built')"
        n=$?
        wait $g && [ $n -eq 0 ] ;;
    tests) python3 -m pytest -m gpu -q -rs -p no:cacheprovider ;;
    step)
        { [ -f "$SD21/model_index.json" ] || python3 benchmarks/bench_guidance_sd.py --save-pipeline "$SD21"; } &&
            python3 benchmarks/bench_step.py --steps 10 --config configs/cfd-splats-sd21.yaml \
                guidance.model_id="$SD21" ;;
    generate) python3 benchmarks/bench_generate.py --released --device cuda --dtype float16 --steps 6 ;;
    relaxflow) python3 benchmarks/bench_relaxflow.py --released --device cuda --dtype float16 --steps 6 --repeats 1 ;;
    render) python3 benchmarks/bench_render.py --repeats 3 ;;
    guidance) python3 benchmarks/bench_guidance_sd.py --repeats 5 --warmup 2 ;;
    nerf) python3 benchmarks/bench_nerf.py --device cuda --repeats 2 ;;
    jobs)
        # The main job on the GPU (gsplat backend), shortened: it checks the path, not quality.
        python3 run.py --config configs/cfd-splats-embedded.yaml device=cuda steps=100 \
            output_dir="$RUNS" ;;
    *) echo "unknown part $1"; return 2 ;;
    esac
}
export -f part

printf 'part\tstatus\trc\tseconds\tbudget\tlast line\n' >"$logs/summary.tsv"
for p in "${parts[@]}"; do
    b=${budget[$p]:-60}
    left=$((deadline - SECONDS))
    [ "$left" -lt "$b" ] && b=$left
    if [ "$b" -lt 5 ]; then
        status=skipped rc=- took=0 last="no time left before the suite's deadline"
    else
        echo "=== $p (budget ${b} s, $(date +%T))" >>"$logs/suite.log"
        start=$SECONDS
        timeout -k 5 "$b" bash -c 'part "$1"' _ "$p" >>"$logs/suite.log" 2>&1
        rc=$? took=$((SECONDS - start))
        case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=fail ;; esac
        last=$(tail -n 1 "$logs/suite.log" | tr '\t' ' ' | cut -c1-200)
    fi
    # The wheels land in $SITE during `install`: later parts import from there.
    [ "$p" = install ] && [ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$p" "$status" "$rc" "$took" "$b" "$last" >>"$logs/summary.tsv"
    echo "$p: $status (rc=$rc) in ${took} s of ${b} s; $last"
done
