#!/usr/bin/env bash
# The GPU checks behind the README's "On a GPU" section, for any CUDA box with pivotfuse installed:
# the tests of the GPU code paths (bf16, checkpointing, device_map, LoRA on a bf16 base), the
# training-step and extraction benches at a size where the GPU matters, and the demo end to end.
#     bash bench/gpu_check.sh [OUT_DIR]        (PYTHON=... to pick the interpreter)
# Each step's log lands in OUT_DIR (default runs/gpu-check); the summary is printed.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" || exit 1
step() {
    local name=$1; shift
    local t0=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name rc=$? wall=$(( $(date +%s) - t0 ))s"
    tail -n "${TAILN:-4}" "$OUT/$name.log"
}
step tests "$PY" -m pytest -q -m "slow or not slow" -k "not two_processes" tests/test_fuse_trainer.py \
    tests/test_extract.py tests/test_fuse_loss.py tests/test_eval_local.py tests/test_merge_models.py
TAILN=8 step fuse_step "$PY" bench/fuse_step.py --hidden 1024 --layers 4 --batch 8 --length 1024 --bf16 --steps 8
TAILN=8 step extract "$PY" bench/extract.py --n 64 --hidden 1024 --layers 8 --max-length 1024 --batch-size 16
TAILN=30 step demo "$PY" cli.py run recipes/demo.yaml --set out="$OUT/demo"
