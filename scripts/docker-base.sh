#!/usr/bin/env bash
# Makes the Debian base image the Dockerfiles start from, without a
# container registry: a minimal root filesystem of the host's Debian
# release from the Debian package archive (debootstrap), imported into the
# local engine with `docker import`.
#
#   bash scripts/docker-base.sh [TAG]     # default TAG: duo-base:<codename>
#
# Users with a registry don't need this (the Dockerfiles default to
# debian:bookworm-slim). Skips the work when TAG already exists.
set -euo pipefail
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
tag=${1:-duo-base:$codename}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"
  exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if ! command -v debootstrap >/dev/null; then
  sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq debootstrap; } >/dev/null 2>&1 || {
    echo "docker-base: debootstrap is missing and could not be installed: apt-get install debootstrap" >&2
    exit 1
  }
fi
root=$(mktemp -d /tmp/duo-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $codename from $mirror into $root (a few minutes)"
debootstrap --variant=minbase "$codename" "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "made $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
