#!/usr/bin/env bash
# Builds the CPU image `duo:cpu` offline, from the release binary built on
# this host (target/release/duo) and a base image made from Debian's
# package archive (scripts/docker-base.sh): for engines that cannot pull,
# like the project's machines and CI. With a registry, build
# docker/Dockerfile.cpu instead (docs/deploy.md).
#
#   cargo build --release --bin duo && bash scripts/docker-images.sh [TAG]
#
# DUO_BIN names another binary (tests/compose.rs passes the one cargo test
# built).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-duo:cpu}
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
base=duo-base:$codename
bin=${DUO_BIN:-target/release/duo}
[[ -x $bin ]] || { echo "no $bin: run cargo build --release --bin duo first" >&2; exit 1; }
ort=${ORT_DYLIB_PATH:-.ort/libonnxruntime.so.1.31.1}
[[ -f $ort ]] || { echo "no ONNX Runtime library at $ort: build once (cargo build fetches it) or set ORT_DYLIB_PATH" >&2; exit 1; }
bash scripts/docker-base.sh "$base"
ctx=target/docker-context
rm -rf "$ctx" && mkdir -p "$ctx/ort" "$ctx/models/target" "$ctx/models/draft"
cp "$bin" "$ctx/duo" && strip "$ctx/duo"
cp "$ort" "$ctx/ort/libonnxruntime.so.1.31.1"
cp models/tokenizer.json "$ctx/models/"
cp models/target/model.onnx models/target/config.json "$ctx/models/target/"
cp models/draft/model.onnx models/draft/config.json "$ctx/models/draft/"
DOCKER_BUILDKIT=0 docker build -q -f docker/Dockerfile.prebuilt \
  --build-arg RUNTIME_IMAGE="$base" -t "$tag" "$ctx" >/dev/null
echo "built $tag from $bin on $base"
