#!/usr/bin/env bash
# Validates the compose files: compose.yaml alone and with the CPU override
# compose.cpu.yaml, with `docker compose config` (Compose v2) or `docker-compose
# config` (v1). Needs no Docker engine and builds no image. When neither is
# present, installs Debian's docker-compose (1.29) with apt (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
unset COMPOSE_FILE COMPOSE_PROFILES

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "check-compose: installing docker-compose with apt" >&2
  sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp)
  if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends docker-compose; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "check-compose: ERROR: could not install docker-compose" >&2
    exit 1
  fi
  rm -f "$log"
  compose=(docker-compose)
fi
echo "check-compose: $("${compose[@]}" version 2>/dev/null | head -n1)"

status=0
check() {
  local files=() f
  for f in "$@"; do files+=(-f "$f"); done
  if "${compose[@]}" "${files[@]}" config -q; then
    echo "check-compose: ok: $*"
  else
    echo "check-compose: ERROR: $* does not validate" >&2
    status=1
  fi
}
check compose.yaml
check compose.yaml compose.cpu.yaml
exit $status
