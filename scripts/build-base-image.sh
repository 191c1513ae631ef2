#!/usr/bin/env bash
# Builds the Dockerfile's base image locally, for hosts that cannot pull it from a registry:
# a minimal Debian bookworm made by debootstrap from Debian's packages, with python3 and a venv
# rooted at /usr/local (so `python` and `pip` are on PATH, as in the official python image),
# committed with buildah under the exact name the Dockerfile's FROM uses.
#   scripts/build-base-image.sh            tag = the Dockerfile's FROM (python:3.11-slim)
#   scripts/build-base-image.sh --force    rebuild even when the tag already exists
# Env: DEBIAN_MIRROR (default: debootstrap's own), BASE_SUITE (bookworm: Python 3.11, as the FROM).
# Needs root, buildah and debootstrap (installed from Debian's packages when missing).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE="${BASE_SUITE:-bookworm}"
FORCE=0
if [ "${1:-}" = "--force" ]; then FORCE=1; fi

# The name as buildah stores a Docker Hub short name, so `FROM python:3.11-slim` resolves to it
# locally and `buildah bud --pull=never` never looks for a registry.
from="$(awk 'toupper($1) == "FROM" { print $2; exit }' "$REPO/Dockerfile")"
case "$from" in
  */*/*) TAG="$from" ;;
  */*) TAG="docker.io/$from" ;;
  *) TAG="docker.io/library/$from" ;;
esac

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ "${#missing[@]}" = 0 ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (container image tests)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: ${missing[*]} missing; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
}

ensure_tools
if [ "$FORCE" = 0 ] && buildah inspect --type image "$TAG" >/dev/null 2>&1; then
  echo "$TAG already built (--force to rebuild)" >&2
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/base-image.XXXXXX")"
container=""
cleanup() {
  if [ -n "$container" ]; then buildah rm "$container" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "debootstrap $SUITE (minbase + python3, python3-venv) for $TAG" >&2
# shellcheck disable=SC2086  # DEBIAN_MIRROR is empty (debootstrap's default) or one URL
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$work/rootfs" ${DEBIAN_MIRROR:-} >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
chroot "$work/rootfs" python3 -m venv /usr/local
# Downloaded .debs and package lists are not part of an image (python:3.11-slim drops them too).
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
# A tar keeps owners, modes and links exactly; /dev, /proc, /sys are the runtime's to fill.
tar -C "$work/rootfs" --numeric-owner --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
  -cf "$work/rootfs.tar" .

container="$(buildah from scratch)"
buildah add --quiet "$container" "$work/rootfs.tar" / >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 --label "org.opencontainers.image.description=local $SUITE + python3 (debootstrap)" \
  "$container"
buildah commit --quiet "$container" "$TAG" >/dev/null
echo "built $TAG" >&2
