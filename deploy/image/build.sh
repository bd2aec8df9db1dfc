#!/usr/bin/env bash
# Builds the project's image here, without a Docker engine or a container registry:
#   deploy/image/build.sh [TAG]          (default localhost/leadscore:dev)
#   1. a Debian bookworm root filesystem from the Debian mirror (mmdebstrap), imported into
#      podman as the runtime base (Python 3.11, as python:3.11-slim-bookworm has);
#   2. the release binary built on this (bookworm) host, imported as the image it comes from;
#   3. the repository's Dockerfile, runtime stage, built by podman on those two.
# Needs root and the Debian packages podman, mmdebstrap, uidmap and runc (installed if missing).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
TAG="${1:-localhost/leadscore:dev}"
CACHE="${LEADSCORE_CACHE:-$HOME/.cache/leadscore}/image"
BASE=localhost/leadscore-runtime-base:bookworm
BINARY=localhost/leadscore-binary:dev
# crun cannot set rlimits here; runc with cgroupfs and limits within the shell's own works.
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1000:1000)

missing=()
for tool in podman mmdebstrap newuidmap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  step "installing podman, mmdebstrap, uidmap, runc (Debian)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman mmdebstrap uidmap runc >/dev/null
fi
mkdir -p "$CACHE"

if ! "${PODMAN[@]}" image exists "$BASE"; then
  step "runtime base: Debian bookworm from the Debian mirror (mmdebstrap)"
  # The host's own extra CAs (a TLS-inspecting egress proxy's, here) are trusted in the base
  # too, so the build's pip reaches PyPI as the host does; the base exists only locally.
  mmdebstrap --variant=minbase --include=ca-certificates,python3,python3-venv,passwd,libgomp1 \
    --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" &&
        chroot "$1" update-ca-certificates >/dev/null; fi' \
    bookworm "$CACHE/rootfs.tar"
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' "$CACHE/rootfs.tar" "$BASE"
  rm -f "$CACHE/rootfs.tar"
fi

step "release binary (cargo build --release -p leadscore)"
cargo build --release -p leadscore --locked
bin="$(leadscore_release_bin)"
rm -rf "$CACHE/binary" && mkdir -p "$CACHE/binary/src/target/release"
cp "$bin" "$CACHE/binary/src/target/release/leadscore"
strip "$CACHE/binary/src/target/release/leadscore"
tar -C "$CACHE/binary" -cf "$CACHE/binary.tar" src
"${PODMAN[@]}" import "$CACHE/binary.tar" "$BINARY" >/dev/null
rm -rf "$CACHE/binary" "$CACHE/binary.tar"

step "image $TAG (Dockerfile, runtime stage)"
"${PODMAN[@]}" build "${LIMITS[@]}" --network host --target runtime \
  --build-arg RUNTIME_IMAGE="$BASE" --build-arg BINARY_FROM="$BINARY" \
  -t "$TAG" -f Dockerfile .
"${PODMAN[@]}" image inspect --format '{{.Id}} {{.Size}} bytes' "$TAG"
