#!/usr/bin/env bash
# flashcl's first contact with a GPU in one call of at most 9 minutes (the device tool's 15 include
# the machine's start): install flashcl with flashcl._C built for this GPU's architecture only, then
# benchmarks/gpu_check.py (the kernel checks, the headline points, autocast), each phase under its
# own timeout. One JSON lands in $OUT (the device tool's output folder) or benchmarks/results/.
#   bash benchmarks/gpu_check.sh            on the GPU machine (peers' wheels in .whl/, see README "GPU")
#   bash benchmarks/gpu_check.sh --dry-run  on a CPU: no build, tiny sizes, Triton interpreted (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if [[ ${1:-} == --dry-run ]]; then
    exec "$python" benchmarks/gpu_check.py --dry-run --out "$out/gpu_check_dry_run.json"
fi
site=/tmp/flashcl-site
export PYTHONPATH=$site PATH=$site/bin:$PATH
started=$(date +%s)
if ! "$python" -c "import flashcl, flashcl._C" 2>/dev/null; then
    arch=$(timeout 60 "$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
    shopt -s nullglob
    ninja=(.whl/ninja-*.whl)
    if [[ ${#ninja[@]} -gt 0 ]] && ! command -v ninja >/dev/null; then  # else torch builds serially
        "$python" -m pip install -q --no-index --no-deps --target "$site" "${ninja[@]}"
    fi
    wheels=(.whl/*.whl)
    FLASHCL_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) timeout 150 "$python" -m pip install -q \
        --no-index --no-deps --no-build-isolation --target "$site" . "${wheels[@]}" 2>&1 | tail -20
    "$python" -c "import flashcl._C" || echo "flashcl._C did not build: the CUDA family is skipped"
fi
echo "install: $(( $(date +%s) - started )) s"
timeout 400 "$python" benchmarks/gpu_check.py --out "$out/gpu_check.json"
status=$?
echo "gpu_check: exit $status, $(( $(date +%s) - started )) s in all"
exit $status
