#!/usr/bin/env bash
# Everything that needs a GPU, in phases that each fit one 10-minute device call:
#   bash benchmarks/gpu_suite.sh test      the test suite on CUDA tensors (Triton and the CUDA extension)
#   bash benchmarks/gpu_suite.sh bench     benchmarks/bench_gpu.py against the peers [its arguments], then SigLIP
#   bash benchmarks/gpu_suite.sh profile   Nsight Compute on flashcl's kernels at N = 16384, D = 768
#   bash benchmarks/gpu_suite.sh all       the three in turn (a long call)
# Each phase installs flashcl first if this machine lacks it (building flashcl._C for this
# GPU's architecture). Results go to $OUT (the device tool's output folder) or
# benchmarks/results/. Peers travel as wheels in .whl/ (README, "GPU", has the download line).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
shift || true
out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=/tmp/flashcl-site
export PYTHONPATH=$site

if ! python3 -c "import flashcl, flashcl._C" 2>/dev/null; then
    arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
    shopt -s nullglob
    ninja=(.whl/ninja-*.whl)
    if [[ ${#ninja[@]} -gt 0 ]] && ! command -v ninja >/dev/null; then  # else torch builds serially
        python3 -m pip install -q --no-index --no-deps --target "$site" "${ninja[@]}"
    fi
    export PATH=$site/bin:$PATH
    wheels=(.whl/*.whl)
    FLASHCL_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) python3 -m pip install -q --no-index \
        --no-deps --no-build-isolation --target "$site" . "${wheels[@]}" 2>&1 | tail -20
    python3 -c "import flashcl._C" || { echo "flashcl._C did not build"; exit 1; }
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git describe --always --dirty 2>/dev/null
    date -u +%FT%TZ
} > "$out/gpu_env.txt" 2>&1
cat "$out/gpu_env.txt"

if [[ $phase == test || $phase == all ]]; then
    # One Triton config per kernel (FLASHCL_TRITON_AUTOTUNE=0), so the suite compiles in minutes.
    # Eight workers compile kernels in parallel; a test that hangs (a lock never released) fails
    # alone; the whole run stops in time to leave the build and the report inside the call.
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 180")
    FLASHCL_TEST_DEVICE=cuda FLASHCL_TRITON_AUTOTUNE=0 FLASHCL_REQUIRE_PEERS=1 FLASHCL_REQUIRE_CUDA_EXTENSION=1 \
        timeout 420 python3 -m pytest -q -rfE -p no:cacheprovider $parallel $per_test tests > "$out/gpu_tests.log" 2>&1
    echo "pytest exit $?"
    tail -40 "$out/gpu_tests.log"
    # The suite pins one config; this runs the autotuner itself (every config, reset_to_zero between runs).
    FLASHCL_TEST_DEVICE=cuda FLASHCL_TRITON_AUTOTUNE=1 timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider \
        tests/test_compiled_backends.py -k test_autotuned_kernels_match > "$out/gpu_tests_autotuned.log" 2>&1
    echo "autotuned pytest exit $?"
    tail -5 "$out/gpu_tests_autotuned.log"
fi
if [[ $phase == bench || $phase == all ]]; then
    python3 benchmarks/bench_gpu.py --out "$out/clip_loss_gpu" "$@"
    # Issue 16's point: SigLIP at B = 65536, D = 768, bf16 (the siglip-kernel package claims 48.8 ms on H100).
    python3 benchmarks/bench_gpu.py --loss siglip --dims 768 --batch-sizes 16384 65536 --extra \
        --contenders triton cuda textbook open_clip siglip_kernel --out "$out/siglip_loss_gpu"
fi
if [[ $phase == profile || $phase == all ]]; then
    # A few launches of each kernel after warm-up and autotuning; the rest run unprofiled.
    ncu --kernel-name regex:"lse_forward|softplus_sums|weighted_products" --launch-skip 200 --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats \
        -f -o /tmp/flashcl_kernels python3 benchmarks/bench_gpu.py --dims 768 --batch-sizes 16384 --extra \
        --contenders triton cuda --out /tmp/profiled > "$out/ncu.log" 2>&1
    echo "ncu exit $?"
    ncu --import /tmp/flashcl_kernels.ncu-rep --csv --page details > "$out/ncu_kernels.csv"
    tail -5 "$out/ncu.log"
fi
