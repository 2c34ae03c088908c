#!/usr/bin/env bash
# Build the labelq image from ./Dockerfile with buildah, run it with podman the way the Helm chart
# runs it (UID 10001, read-only root, no capabilities, writable NUMBA_CACHE_DIR and /tmp only),
# wait for /health/ready, post one request, check the answer, stop it with SIGTERM, then start it
# again on the same numba cache to time a warm start. Cleans up the container and image at the end.
#
# No registry is reachable here, so the Dockerfile's base image (ARG PYTHON_IMAGE, e.g.
# python:3.11.15-slim-bookworm) cannot be pulled. This script builds a stand-in under that very
# name: `debootstrap --variant=minbase bookworm` + python3 + python3-venv (Debian bookworm's python3
# is 3.11), imported with `podman import`. The official image has its Python in /usr/local, the
# stand-in in /usr; the Dockerfile only relies on `python3` being on PATH, so both work. The
# stand-in is kept (cached) in container storage; --rebuild-base makes it again.
#
# Needs root and: apt-get install -y --no-install-recommends buildah podman skopeo runc \
#   debootstrap fuse-overlayfs uidmap slirp4netns
# Usage: scripts/image.sh [--rebuild-base] [--keep-image]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE_DIR=${IMAGE_CACHE_DIR:-$ROOT/.cache/image}
IMAGE=${IMAGE:-localhost/labelq:smoke}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
READY_TIMEOUT=${READY_TIMEOUT:-300}
REBUILD_BASE=0
KEEP_IMAGE=0
for arg in "$@"; do
  case $arg in
    --rebuild-base) REBUILD_BASE=1 ;;
    --keep-image) KEEP_IMAGE=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "image.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# One storage driver for buildah and podman (vfs: no overlay/fuse needed), runc, no systemd.
BUILDAH=(buildah --storage-driver vfs)
PODMAN=(podman --storage-driver vfs --runtime runc --cgroup-manager cgroupfs --events-backend file)
# This sandbox cannot raise rlimits: every container gets these explicitly.
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

log() { printf '[image.sh %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

for tool in buildah podman debootstrap curl python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see the header of this script)"
done
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and rootful podman)"

BASE=$(sed -n 's/^ARG PYTHON_IMAGE=\(.*\)$/\1/p' "$ROOT/Dockerfile")
[ -n "$BASE" ] || die "no 'ARG PYTHON_IMAGE=' in Dockerfile"
BASE_LOCAL="localhost/${BASE#docker.io/library/}"
CONTAINER="labelq-smoke-$$"
mkdir -p "$CACHE_DIR"
NUMBA_DIR=$(mktemp -d "$CACHE_DIR/numba.XXXXXX")

cleanup() {
  local rc=$?
  "${PODMAN[@]}" rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  [ "$KEEP_IMAGE" = 1 ] || "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$NUMBA_DIR"
  log "exit $rc"
}
trap cleanup EXIT

# 1. the stand-in base image ---------------------------------------------------------------------
if [ "$REBUILD_BASE" = 1 ] || ! "${PODMAN[@]}" image exists "$BASE_LOCAL"; then
  log "bootstrapping Debian bookworm (minbase + python3) as $BASE_LOCAL"
  ROOTFS="$CACHE_DIR/rootfs"
  rm -rf "$ROOTFS"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
  "${PODMAN[@]}" rmi -f "$BASE_LOCAL" >/dev/null 2>&1 || true
  tar -C "$ROOTFS" --numeric-owner -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE_LOCAL" >/dev/null
  rm -rf "$ROOTFS"
  log "base image ready: $("${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$BASE_LOCAL" python3 --version)"
else
  log "reusing base image $BASE_LOCAL"
fi

# 2. build ---------------------------------------------------------------------------------------
log "building $IMAGE"
build_start=$SECONDS
"${BUILDAH[@]}" bud --isolation chroot --pull=never --format docker --layers=false \
  --volume "$HOST_CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt \
  --build-arg REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$CACHE_DIR/build.log" 2>&1 \
  || { tail -30 "$CACHE_DIR/build.log" >&2; die "build failed (log: $CACHE_DIR/build.log)"; }
log "built in $((SECONDS - build_start)) s; size $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"

user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || die "image user is '$user', expected 10001:10001"
stopsignal=$("${PODMAN[@]}" image inspect --format '{{.Config.StopSignal}}' "$IMAGE")
[ "$stopsignal" = "SIGTERM" ] || die "image stop signal is '$stopsignal'"
# nothing to build or install with in the runtime image
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none --no-healthcheck --entrypoint sh "$IMAGE" -c \
  'for t in gcc cc make pip pip3; do command -v $t && exit 1; done; ! python3 -c "import pip" 2>/dev/null' \
  || die "build tools or pip in the runtime image"

# 3. run as the chart does -----------------------------------------------------------------------
# The numba cache is a host directory owned by 10001 (the chart's emptyDir), so a second start can
# reuse what the first compiled. --network host: the server listens on loopback only.
chown 10001:10001 "$NUMBA_DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

start_container() {
  "${PODMAN[@]}" run -d --name "$CONTAINER" \
    --network host "${ULIMITS[@]}" \
    --user 10001:10001 --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777 \
    --volume "$NUMBA_DIR:/var/cache/labelq:rw" \
    --cap-drop ALL --security-opt no-new-privileges --no-healthcheck \
    -e LABELQ_HOST=127.0.0.1 -e LABELQ_PORT="$PORT" -e NUMBA_NUM_THREADS=2 \
    "$IMAGE" >/dev/null
}

wait_ready() {
  local t0=$SECONDS code
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health/ready" || true)
    [ "$code" = 200 ] && break
    [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] \
      || { "${PODMAN[@]}" logs "$CONTAINER" >&2; die "container exited before ready"; }
    [ $((SECONDS - t0)) -lt "$READY_TIMEOUT" ] \
      || { "${PODMAN[@]}" logs "$CONTAINER" >&2; die "not ready after $READY_TIMEOUT s"; }
    sleep 1
  done
  echo $((SECONDS - t0))
}

log "starting (cold numba cache)"
start_container
cold=$(wait_ready)
log "ready after ${cold} s (cold)"

[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health/live")" = 200 ] || die "/health/live is not 200"
[ "$("${PODMAN[@]}" exec "$CONTAINER" id -u)" = 10001 ] || die "not running as UID 10001"
if "${PODMAN[@]}" exec "$CONTAINER" sh -c 'touch /opt/venv/x' 2>/dev/null; then
  die "root filesystem is writable"
fi
[ -n "$(ls -A "$NUMBA_DIR")" ] || die "numba wrote nothing to NUMBA_CACHE_DIR"
# the image's HEALTHCHECK command, run by hand (podman here has no systemd timer to run it)
"${PODMAN[@]}" exec -e LABELQ_PORT="$PORT" "$CONTAINER" python3 -c \
  "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LABELQ_PORT', '8000') + '/health/ready', timeout=2)" \
  || die "the HEALTHCHECK command fails"

answer=$(curl -sf -X POST "$URL/find-issues" -H 'Content-Type: application/json' -d '{
  "labels": [0, 0, 1, 1, 2, 2],
  "pred_probs": [[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.05, 0.9, 0.05],
                 [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]}') || die "POST /find-issues failed"
python3 - "$answer" <<'EOF' || die "unexpected answer: $answer"
import json, sys
a = json.loads(sys.argv[1])
assert a["num_label_issues"] == 2, a
assert a["ranked_issue_indices"] == [1, 5], a
assert a["suggested_label"] == [0, 1, 1, 1, 2, 0], a
EOF
log "POST /find-issues answered as expected"

stop_start=$SECONDS
"${PODMAN[@]}" stop -t 30 "$CONTAINER" >/dev/null
exit_code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$CONTAINER")
log "SIGTERM: stopped in $((SECONDS - stop_start)) s, exit code $exit_code"
[ "$exit_code" = 0 ] || { "${PODMAN[@]}" logs "$CONTAINER" >&2; die "exit code $exit_code after SIGTERM"; }
"${PODMAN[@]}" rm "$CONTAINER" >/dev/null

log "starting again on the same numba cache"
start_container
warm=$(wait_ready)
log "ready after ${warm} s (warm)"

log "OK: build + cold start ${cold} s + warm start ${warm} s; total ${SECONDS} s"
