#!/usr/bin/env bash
# Everything that needs a GPU, in one call: install flashcl, run the test suite on CUDA
# tensors, then benchmark against the peers. Results go to $OUT (the device tool's output
# folder) or benchmarks/results/. Peers travel as wheels in .whl/ (see README, "GPU"):
#   pip download --no-deps inf-cl open_clip_torch==3.3.0 -d .whl
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=/tmp/flashcl-site
shopt -s nullglob
wheels=(.whl/*.whl)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . "${wheels[@]}" || exit 1
export PYTHONPATH=$site
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git describe --always --dirty 2>/dev/null
    date -u +%FT%TZ
} > "$out/gpu_env.txt" 2>&1
cat "$out/gpu_env.txt"

# The suite on CUDA tensors, one Triton config so it compiles in minutes, not hours.
FLASHCL_TEST_DEVICE=cuda FLASHCL_TRITON_AUTOTUNE=0 FLASHCL_REQUIRE_PEERS=1 \
    python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -5
python3 benchmarks/bench_gpu.py --out "$out/clip_loss_gpu" "$@"
