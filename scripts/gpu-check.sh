#!/usr/bin/env bash
# The one command to run when a machine with an NVIDIA GPU is at hand: it
# measures the target runtime where it is meant to run and writes one JSON.
#
#   scripts/gpu-check.sh [--cpu] [OUT_DIR]      (OUT_DIR default: $OUT, else target/gpu-check)
#
# GPU mode (the default; budget: one run of at most 8 minutes):
#   - ONNX Runtime GPU 1.31.1 from the parts made by ../shared/gpu/prepare-ort-gpu.sh,
#     found in $DUO_ORT_PARTS (default .gpu/), assembled into $DUO_ORT_GPU
#     (default /tmp/ort-gpu), unless ORT_DYLIB_PATH already names a GPU build;
#   - a realistic random Llama made on the spot by models/onnx_llama.py (hidden
#     2048, 16 layers, GQA 32/8, FFN 5632, vocabulary 32000, fp16, context 4352
#     so that a 4096-token past still takes an 8-token block;
#     ~0.8B parameters) and a small random draft with the same vocabulary, on CPU;
#   - `duo bench-runtime --contexts`: ms per forward of 1 and 8 new tokens at
#     contexts 128/1k/2k/4k on the GPU, host bytes per step, cache-edit costs;
#   - the same forwards through a plain Python onnxruntime IOBinding loop
#     (scripts/ort_iobinding_loop.py) on the same file, when a Python
#     onnxruntime with the CUDA provider is available ($DUO_ORT_PYTHON_TAR, a
#     tarball of the onnxruntime-gpu wheel's package, is unpacked if needed);
#   - `duo bench`: tokens/s of AR, SpS and DuoDecoding (target on the GPU, draft
#     on CPU) and whether the three modes' greedy outputs are identical.
# CPU mode (--cpu, run by CI in tests/device.rs): the same steps with small
# shapes on CPU, so the script itself is proven without a GPU.
#
# Needs: the `duo` binary ($DUO_BIN, default target/release/duo; built with
# --features cuda for GPU mode) and a Python with onnx + numpy (+ onnxruntime
# for the reference loop): $DUO_PYTHON, default python3.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
if [[ ${1:-} == --cpu ]]; then
  mode=cpu
  shift
fi
out=${1:-${OUT:-target/gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${DUO_GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$work"
duo=${DUO_BIN:-target/release/duo}
python=${DUO_PYTHON:-python3}
t0=$(date +%s)
log() { echo "[gpu-check +$(($(date +%s) - t0))s] $*" >&2; }
[[ -x $duo ]] || { echo "gpu-check: no duo binary at $duo (cargo build --release --features cuda, or set DUO_BIN)" >&2; exit 1; }
"$python" -c "import onnx, numpy" || { echo "gpu-check: $python lacks onnx/numpy (pip install -r models/requirements-onnx.txt)" >&2; exit 1; }

if [[ $mode == gpu ]]; then
  device=cuda
  target_shape=(--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --ffn 5632 --vocab 32000 --context 4352 --dtype f16)
  draft_shape=(--hidden 256 --layers 2 --heads 4 --kv-heads 4 --ffn 704 --vocab 32000 --context 4352 --dtype f32)
  contexts=128,1024,2048,4096
  prompts_per_category=2
  new_tokens=64
  if [[ ${ORT_DYLIB_PATH:-} != *ort-gpu* ]]; then
    parts=${DUO_ORT_PARTS:-.gpu}
    dest=${DUO_ORT_GPU:-/tmp/ort-gpu}
    log "assembling ONNX Runtime GPU from $parts into $dest"
    PYTHON=$python bash "$parts/assemble-ort-gpu.sh" "$parts" "$dest" >&2
    # shellcheck disable=SC1091
    source "$dest/env.sh"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$work/gpu.txt" 2>/dev/null || echo unknown >"$work/gpu.txt"
else
  device=cpu
  target_shape=(--hidden 256 --layers 4 --heads 8 --kv-heads 2 --ffn 704 --vocab 32000 --context 1024 --dtype f32)
  draft_shape=(--hidden 128 --layers 1 --heads 4 --kv-heads 4 --ffn 384 --vocab 32000 --context 1024 --dtype f32)
  contexts=128,512
  prompts_per_category=1
  new_tokens=16
  echo "none (--cpu)" >"$work/gpu.txt"
fi

log "making the random target and draft ($mode shapes)"
"$python" models/onnx_llama.py --random --seed 1 "${target_shape[@]}" --out "$work/target" >&2
"$python" models/onnx_llama.py --random --seed 2 "${draft_shape[@]}" --out "$work/draft" >&2
# The bundled tokenizer, padded with added tokens to the models' vocabulary
# (random models emit every id; each must decode).
"$python" - "$work/tokenizer.json" 32000 <<'PY'
import json, sys
dest, vocab = sys.argv[1], int(sys.argv[2])
tok = json.load(open("models/tokenizer.json"))
base = len(tok["model"]["vocab"])
tok["added_tokens"] += [
    {"id": i, "content": f"<|tok{i}|>", "single_word": False, "lstrip": False,
     "rstrip": False, "normalized": False, "special": False}
    for i in range(base, vocab)
]
json.dump(tok, open(dest, "w"))
PY

log "Rust runtime: forwards vs context on $device"
"$duo" bench-runtime --target "$work/target" --device "$device" --contexts "$contexts" \
  --reps 20 >"$work/rust.txt"
tail -n 1 "$work/rust.txt" >"$work/rust.json"

log "Python onnxruntime IOBinding loop on the same file"
py_ort=$python
if [[ $device == cuda ]] && ! "$python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  if [[ -n ${DUO_ORT_PYTHON_TAR:-} && -f $DUO_ORT_PYTHON_TAR ]]; then
    mkdir -p "$work/pyort"
    tar -xf "$DUO_ORT_PYTHON_TAR" -C "$work/pyort"
    ln -sf "$(dirname "$ORT_DYLIB_PATH")"/libonnxruntime_providers_*.so "$work/pyort/onnxruntime/capi/"
    export PYTHONPATH=$work/pyort${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if "$py_ort" scripts/ort_iobinding_loop.py "$work/target" --device "$device" --contexts "$contexts" \
  --reps 20 >"$work/python.json" 2>"$work/python.err"; then
  :
else
  log "Python reference unavailable: $(tail -n 1 "$work/python.err")"
  "$python" -c "import json,sys; print(json.dumps({'unavailable': sys.argv[1]}))" "$(tail -n 1 "$work/python.err")" >"$work/python.json"
fi

log "AR / SpS / DuoDecoding tokens/s (target on $device, draft on CPU)"
"$duo" bench --target "$work/target" --draft "$work/draft" --tokenizer "$work/tokenizer.json" \
  --device "$device" --per-category "$prompts_per_category" --max-new-tokens "$new_tokens" \
  --no-ar2 --out "$work/modes.json" >/dev/null

"$python" - "$work" "$out/gpu-check.json" "$mode" "$(($(date +%s) - t0))" <<'PY'
import json, pathlib, sys
work, dest, mode, secs = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rust = json.loads((work / "rust.json").read_text())
python = json.loads((work / "python.json").read_text())
modes = json.loads((work / "modes.json").read_text())
ratios = {}
for ctx, row in rust.get("contexts", {}).items():
    ref = python.get("contexts", {}).get(ctx, {})
    ratios[ctx] = {k: round(v / ref[k], 3) for k, v in row.items() if k in ref and ref[k] > 0}
report = {
    "mode": mode,
    "gpu": (work / "gpu.txt").read_text().strip(),
    "seconds": secs,
    "target": json.loads((work / "target" / "config.json").read_text()),
    "rust_runtime": rust,
    "python_iobinding": python,
    "rust_over_python_ms": ratios,
    "modes": modes,
}
pathlib.Path(dest).write_text(json.dumps(report, indent=1))
print(json.dumps({"gpu_check": dest, "rust_over_python_ms": ratios,
                  "identical": modes.get("identical", modes.get("headline", {}).get("identical"))}))
PY
log "done: $out/gpu-check.json"
