#!/usr/bin/env bash
# Fetches the ONNX Runtime 1.31.1 shared library (CPU build) from the PyPI
# wheel into DEST (default: .ort/ at the repository root), checking the wheel's
# pinned sha256. Needs python3 with pip and access to PyPI. Idempotent.
set -euo pipefail
VERSION=1.31.1
WHEEL=onnxruntime-${VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
SHA256=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.ort}
lib=$dest/libonnxruntime.so.$VERSION
[ -f "$lib" ] && exit 0
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 "onnxruntime==$VERSION" -d "$tmp" >"$tmp/pip.log" 2>&1; then
  echo "error: could not download onnxruntime==$VERSION from PyPI (needs python3 -m pip and network access to PyPI); or set ORT_DYLIB_PATH to an existing libonnxruntime.so" >&2
  exit 1
fi
echo "$SHA256  $tmp/$WHEEL" | sha256sum -c --quiet - >&2 || {
  echo "error: checksum mismatch for $WHEEL (expected $SHA256)" >&2
  exit 1
}
python3 - "$tmp/$WHEEL" "$dest" "$VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    data = z.read(f"onnxruntime/capi/libonnxruntime.so.{version}")
tmp = dest / f".libonnxruntime.so.{version}.part"
tmp.write_bytes(data)
tmp.rename(dest / f"libonnxruntime.so.{version}")
PY
ln -sf "libonnxruntime.so.$VERSION" "$dest/libonnxruntime.so.1"
ln -sf "libonnxruntime.so.$VERSION" "$dest/libonnxruntime.so"
echo "fetched ONNX Runtime $VERSION into $dest" >&2
