#!/usr/bin/env bash
# The GPU checks of issue 16 in one command (about 10 minutes on one GPU): the fusion training step
# against TRL's SFT step at 32k and 152k vocabularies (bench/fuse_step.py, bf16), extraction against
# a bare forward pass (bench/extract.py), the CPU-side preparation of a 10^6-token corpus
# (bench/prep.py, one run per process count), and the tests of the GPU code paths.
# With a GPU the stores of bench/prep.py are extracted by the tiny models (--extract).
#     bash bench/gpu_check.sh [OUT_DIR]        (PYTHON=... to pick the interpreter; DEMO=1 adds the demo run)
# Without CUDA it runs the same steps at CPU sizes (a check that the script and the benches work;
# their figures are not GPU figures) and says so. Each step's log lands in OUT_DIR (default
# runs/gpu-check); the RESULT lines are printed at the end.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)"; then
    STEP="--hidden 1024 --layers 4 --batch 8 --length 1024 --bf16 --steps 8"
    EXTRACT="--n 64 --hidden 1024 --layers 8 --max-length 1024 --batch-size 16"
    PREP="--tokens 1000000 --repeats 1 --no-reference --extract --work $OUT/prep"
else
    echo "no CUDA device: CPU sizes, to check the steps run (the figures are not GPU figures)"
    CPU_SIZES=1
    STEP="--hidden 64 --layers 1 --batch 2 --length 128 --steps 3"
    EXTRACT="--n 16 --hidden 64 --layers 2 --max-length 256 --batch-size 4 --repeats 1"
    PREP="--tokens 100000 --repeats 1 --no-reference --no-memory --work $OUT/prep"
fi
step() {
    local name=$1; shift
    local t0=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name rc=$? wall=$(( $(date +%s) - t0 ))s"
    tail -n "${TAILN:-4}" "$OUT/$name.log"
}
# shellcheck disable=SC2086  # the size flags are word lists
TAILN=8 step fuse_step_32k "$PY" bench/fuse_step.py $STEP --vocab 32000
TAILN=8 step fuse_step_152k "$PY" bench/fuse_step.py $STEP --vocab 151936
TAILN=8 step extract "$PY" bench/extract.py $EXTRACT
TAILN=14 step prep "$PY" bench/prep.py $PREP
if [ -z "${CPU_SIZES:-}" ]; then  # on CPU these tests are the ordinary suite's
    step tests "$PY" -m pytest -q -m "slow or not slow" -k "not two_processes" tests/test_fuse_trainer.py \
        tests/test_fuse_loss.py tests/test_extract.py
fi
if [ "${DEMO:-0}" = 1 ]; then TAILN=30 step demo "$PY" cli.py run recipes/demo.yaml --set out="$OUT/demo"; fi
echo "=== RESULT lines"
grep -h "^RESULT" "$OUT"/*.log
