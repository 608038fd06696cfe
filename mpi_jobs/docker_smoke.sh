#!/usr/bin/env bash
# Smoke build of hvdtrain's Dockerfile where no Docker engine or registry is reachable.
#
# buildah runs the Dockerfile's own steps (apt, the non-root user, COPY, mpi_jobs/install.sh,
# `horovodrun --check-build`) on a Debian bookworm base that debootstrap makes locally, standing
# in for the CUDA base image, with HVDTRAIN_WITH_NCCL=0 and a CPU torch. It is NOT the real
# CUDA/NCCL image: it proves the Dockerfile's steps and the entry point, not CUDA or NCCL.
# Then it runs the built image's entry point: `hvdtrain --help` and `horovodrun -np 2` as `hvd`.
#
# Needs root (debootstrap, buildah's chroot isolation) and reaches Debian's mirror and PyPI.
# 15-30 minutes on 2 cores (Horovod is compiled inside the build, and vfs storage copies the
# image); the Debian base is made once and cached. The build log goes to $CACHE/smoke-build.log.
# Environment:
#   HVDTRAIN_CACHE             cache root (default ~/.cache/hvdtrain); uses smoke-rootfs/, smoke-storage/
#   HVDTRAIN_SMOKE_MIRROR      Debian mirror for debootstrap      (default http://deb.debian.org/debian)
#   HVDTRAIN_SMOKE_TORCH_SPEC  torch inside the build             (default torch==2.13.0)
#   HVDTRAIN_SMOKE_WHEELS      local wheel directory given to pip in the build as find-links
#                              (default: the host pip's find-links, if that is a directory)
#   HVDTRAIN_SMOKE_PIP_CERT    CA bundle for pip in the build     (default: the host pip's cert)
#   HVDTRAIN_SMOKE_KEEP=1      keep the built image in the smoke storage (default: remove it)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HVDTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdtrain}"
ROOTFS="$CACHE/smoke-rootfs"
STORAGE="$CACHE/smoke-storage"
MIRROR="${HVDTRAIN_SMOKE_MIRROR:-http://deb.debian.org/debian}"
TORCH_SPEC="${HVDTRAIN_SMOKE_TORCH_SPEC:-torch==2.13.0}"
BASE_TAG=localhost/hvdtrain-smoke-base:bookworm
IMAGE_TAG=localhost/hvdtrain-smoke:latest

say() { echo "[docker-smoke] $*"; }
die() { echo "hvdtrain docker-smoke: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap and buildah's chroot isolation); run it as root"

cat <<'EOF'
==============================================================================
 SMOKE BUILD of hvdtrain's Dockerfile steps on a local Debian bookworm base
 standing in for the CUDA base image (CPU torch, HVDTRAIN_WITH_NCCL=0).
 This is NOT the real CUDA/NCCL image; build that with `docker build .`.
==============================================================================
EOF
start=$SECONDS

# --- 1. tools -----------------------------------------------------------------
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ((${#need[@]})); then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# A storage of its own (vfs: no overlay mounts needed), cleared of containers a killed run left.
BUILDAH=(buildah --root "$STORAGE/root" --runroot "$STORAGE/run" --storage-driver vfs)
"${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true

# --- 2. a minimal Debian bookworm root file system, made once ---------------
if [ -e "$ROOTFS/.hvdtrain-complete" ]; then
  say "ok: base root file system $ROOTFS"
else
  say "debootstrap bookworm from $MIRROR into $ROOTFS (a few minutes, once)"
  rm -rf "$ROOTFS.tmp"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase bookworm "$ROOTFS.tmp" "$MIRROR" > "$CACHE/smoke-debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $CACHE/smoke-debootstrap.log"
  rm -rf "$ROOTFS.tmp"/var/cache/apt/archives/*.deb "$ROOTFS.tmp"/var/lib/apt/lists/*
  touch "$ROOTFS.tmp/.hvdtrain-complete"
  rm -rf "$ROOTFS"
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

# --- 3. the root file system as a local image ---------------------------------
if "${BUILDAH[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
  say "ok: base image $BASE_TAG"
else
  say "importing $ROOTFS as $BASE_TAG"
  ctr="$("${BUILDAH[@]}" from scratch)"
  mnt="$("${BUILDAH[@]}" mount "$ctr")"
  tar -C "$ROOTFS" --exclude=./.hvdtrain-complete --exclude='./dev/*' --exclude='./proc/*' \
      --exclude='./sys/*' -cf - . | tar -C "$mnt" -xpf -
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  "${BUILDAH[@]}" commit -q "$ctr" "$BASE_TAG" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
fi

# --- 4. the Dockerfile, with the stand-in base and CPU arguments ------------
# The host pip's local wheels and CA bundle, when it has them, serve pip inside the build too.
host_pip() { python3 -m pip config get "global.$1" 2>/dev/null | awk '{print $1}' || true; }
wheels="${HVDTRAIN_SMOKE_WHEELS:-${PIP_FIND_LINKS:-$(host_pip find-links)}}"
cert="${HVDTRAIN_SMOKE_PIP_CERT:-${PIP_CERT:-$(host_pip cert)}}"
extra=()
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  say "pip in the build also looks in $wheels (mounted read-only)"
  extra+=(--volume "$wheels:/run/hvdtrain-smoke/wheels:ro"
          --build-arg HVDTRAIN_PIP_FIND_LINKS=/run/hvdtrain-smoke/wheels)
fi
if [ -n "$cert" ] && [ -f "$cert" ]; then
  say "pip in the build trusts the host pip's CA bundle $cert (mounted read-only)"
  extra+=(--volume "$cert:/run/hvdtrain-smoke/ca.crt:ro"
          --build-arg HVDTRAIN_PIP_CERT=/run/hvdtrain-smoke/ca.crt)
fi
say "buildah bud $ROOT/Dockerfile (BASE_IMAGE=$BASE_TAG, $TORCH_SPEC, no NCCL)"
log="$CACHE/smoke-build.log"
set +e
# docker format: the OCI format would drop the Dockerfile's SHELL (bash -o pipefail).
"${BUILDAH[@]}" bud --format docker --isolation chroot --network host --pull=never \
  --layers=false --force-rm \
  --build-arg BASE_IMAGE="$BASE_TAG" \
  --build-arg HVDTRAIN_WITH_NCCL=0 \
  --build-arg TORCH_INDEX_URL= \
  --build-arg HVDTRAIN_TORCH_SPEC="$TORCH_SPEC" \
  "${extra[@]}" \
  -f "$ROOT/Dockerfile" -t "$IMAGE_TAG" "$ROOT" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || die "the smoke build failed (exit $rc); full log: $log"

# --- 5. the image's entry point, as the image's user ------------------------
run_image() {
  local ctr
  ctr="$("${BUILDAH[@]}" from --pull=never "$IMAGE_TAG")"
  local user
  user="$("${BUILDAH[@]}" inspect --format '{{.OCIv1.Config.User}}' "$ctr")"
  local status=0
  "${BUILDAH[@]}" run --isolation chroot --network host --user "$user" "$ctr" -- \
    bash /opt/hvdtrain/src/mpi_jobs/docker_entrypoint.sh "$@" || status=$?
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  return "$status"
}
say "entry point, no arguments (hvdtrain --help):"
run_image
say "entry point, horovodrun -np 2 as the image's non-root user:"
run_image horovodrun -np 2 python -c \
  'import os, horovod.torch as hvd; hvd.init(); print(f"rank {hvd.rank()}/{hvd.size()} uid {os.getuid()}")'

if [ "${HVDTRAIN_SMOKE_KEEP:-0}" != 1 ]; then
  "${BUILDAH[@]}" rmi "$IMAGE_TAG" >/dev/null
fi
say "PASSED: smoke build of the Dockerfile's steps on the Debian stand-in base in $((SECONDS - start)) s"
say "(not the CUDA image: CUDA, NCCL and GPU runs are untested here)"
