#!/usr/bin/env bash
# Prepares, on a machine with package registries, everything scripts/gpu-check.sh
# needs on a GPU machine that has none (see ../shared/gpu/README.md):
#   - target/release/duo built with --features cuda;
#   - .gpu/ort-gpu.part-NN: ONNX Runtime GPU 1.31.1 in parts of at most PART_MB MiB
#     (../shared/gpu/prepare-ort-gpu.sh), with assemble-ort-gpu.sh;
#   - .gpu/ort-python.tar.xz: the onnxruntime-gpu wheel's Python package without
#     its CUDA provider library (gpu-check.sh links the assembled one in), for the
#     Python IOBinding reference loop (for the GPU machine's Python version:
#     DUO_GPU_PYTHON_VERSION, default 3.12).
# usage: scripts/prepare-gpu-check.sh [PART_MB]   (keep .gpu/ in .git/info/exclude)
# Then, on the GPU machine, with the parts moved into one folder P:
#   DUO_ORT_PARTS=P DUO_ORT_PYTHON_TAR=.gpu/ort-python.tar.xz \
#   DUO_PYTHON=/opt/torch/.venv/bin/python scripts/gpu-check.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
part_mb=${1:-40}
shared=${DUO_SHARED_GPU:-../shared/gpu}
mkdir -p .gpu
grep -qx '.gpu/' .git/info/exclude 2>/dev/null || echo '.gpu/' >>.git/info/exclude
cargo build --release --bin duo --features cuda
ls .gpu/ort-gpu.part-* >/dev/null 2>&1 || bash "$shared/prepare-ort-gpu.sh" .gpu "$part_mb"
if [[ ! -f .gpu/ort-python.tar.xz ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${DUO_GPU_PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 -d "$tmp" onnxruntime-gpu==1.31.1
  python3 - "$tmp"/onnxruntime_gpu-*.whl .gpu/ort-python.tar.xz <<'PY'
import io, sys, tarfile, zipfile
wheel, dest = sys.argv[1:3]
skip = ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so")
with zipfile.ZipFile(wheel) as z, tarfile.open(dest, "w:xz", preset=6) as tar:
    for name in z.namelist():
        if not name.startswith("onnxruntime/") or name.endswith(skip):
            continue
        data = z.read(name)
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
PY
fi
ls -l .gpu target/release/duo
