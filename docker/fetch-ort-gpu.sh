#!/usr/bin/env bash
# Fetches the CUDA 13 build of ONNX Runtime 1.31.1 (PyPI wheel onnxruntime-gpu) and
# extracts into DEST (default /opt/ort) the three libraries the target service needs:
# libonnxruntime.so.1.31.1 and the two provider libraries, which ONNX Runtime loads
# from the folder of libonnxruntime itself. Needs python3 with pip and access to PyPI.
# At run time they need the CUDA 13 runtime, cuBLAS, cuDNN 9, cuFFT and cuRAND on the
# loader path (the nvidia/cuda *-cudnn-runtime images have them).
# usage: docker/fetch-ort-gpu.sh [DEST]; then ORT_DYLIB_PATH=DEST/libonnxruntime.so.1.31.1
set -euo pipefail
VERSION=1.31.1
dest=${1:-/opt/ort}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$tmp" "onnxruntime-gpu==$VERSION"
python3 - "$dest" "$VERSION" "$tmp"/onnxruntime_gpu-*.whl <<'PY'
import os, sys, zipfile
dest, version, wheel = sys.argv[1:4]
names = [f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so",
         "libonnxruntime_providers_cuda.so"]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        path = os.path.join(dest, name)
        with open(path + ".part", "wb") as f:
            f.write(z.read("onnxruntime/capi/" + name))
        os.chmod(path + ".part", 0o755)
        os.replace(path + ".part", path)
PY
ln -sf "libonnxruntime.so.$VERSION" "$dest/libonnxruntime.so.1"
ln -sf "libonnxruntime.so.$VERSION" "$dest/libonnxruntime.so"
echo "fetched onnxruntime-gpu $VERSION into $dest" >&2
