#!/usr/bin/env bash
# Issue 14's GPU checks, prepared for a session that is lent a GPU machine (15 minutes of device time in all), in two
# calls of the device tool that each fit its 10-minute limit:
#
#   bash scripts/gpu_checks.sh tests   # pytest -m gpu, then bench_selection.py --device cuda (a few minutes)
#   bash scripts/gpu_checks.sh prune   # bench_gpu_prune.py: the Llama-3-8B-shaped prune (16 GB written, then pruned)
#
# It uses the machine's own python3 (PyTorch with CUDA, transformers, accelerate, safetensors and pytest are there;
# nothing is installed). Logs and result files go to $OUT (the device tool's folder that comes back; ./gpu_out
# elsewhere), at most 8 files per call. The SmolLM2 CLI test skips there: its GGUF weights do not travel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"
case "${1:-}" in
    tests)
        timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
        timeout 300 "$PY" benchmarks/bench_selection.py --device cuda --sizes 1536,4096,8192,14336 \
            --out-dir "$OUT" 2>&1 | tee "$OUT/selection.log"
        ;;
    prune)
        timeout 560 "$PY" benchmarks/bench_gpu_prune.py --results "$OUT" --work-dir /tmp 2>&1 | tee "$OUT/gpu_prune.log"
        ;;
    *)
        echo "usage: bash scripts/gpu_checks.sh tests|prune" >&2
        exit 2
        ;;
esac
