#!/usr/bin/env bash
# Prove `bentoml containerize` end to end on a machine without Docker (rootful buildah + podman):
#   random-weight Part 1 model -> export -> bentoml build -> bentoml containerize (buildah)
#   -> podman run bound to 127.0.0.1:<free port> -> /readyz, /classify on a real PNG (must match the
#   model's own prediction), server runs as a non-root user -> remove what it started.
#
#   container/check.sh [--keep-images] [--purge] [--backend buildah|podman] [--bentofile FILE] [--json FILE]
#
#   --keep-images  keep the app image and cache every build layer; the next --keep-images run reuses them
#                  (skips the multi-GB pip layer when the requirements did not change)
#   --purge        afterwards delete all container storage and caches of the check ($STATE)
#   --json FILE    stage timings as JSON (default $STATE/timings.json)
# Env: CONTAINER_STATE (default /var/tmp/cifar100-container-check: storage, debootstrap cache, timings.json),
#      TRUST_HOST_CA=auto|1|0 (corporate proxy: trust the host's /usr/local/share/ca-certificates in
#      the base image; auto = when there are any), DEBIAN_MIRROR, PYTHON (default .venv/bin/python),
#      MIN_FREE_GB (30: the build's peak disk use; the image itself is ~7.4 GB).
# Needs root. Installs buildah/podman/runc/debootstrap with apt-get when they are missing.
# The containerize stage downloads torch + CUDA wheels from PyPI into the image (a few GB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CONTAINER_STATE:-/var/tmp/cifar100-container-check}
PY=${PYTHON:-$ROOT/.venv/bin/python}
BENTOML=$(dirname "$PY")/bentoml
BACKEND=buildah
BENTOFILE=$ROOT/bentofile.yaml
KEEP_IMAGES=0
PURGE=0
JSON=
IMAGE=localhost/cifar100-serve:check
PUBLIC_BASE=docker.io/library/python:3.11-slim   # what BentoML's generated Dockerfile names
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TRUST_HOST_CA=${TRUST_HOST_CA:-auto}

while (($#)); do
  case $1 in
    --keep-images) KEEP_IMAGES=1 ;;
    --purge) PURGE=1 ;;
    --backend) BACKEND=$2; shift ;;
    --bentofile) BENTOFILE=$(realpath "$2"); shift ;;
    --json) JSON=$(realpath -m "$2"); shift ;;
    -h|--help) sed -n "2,18p" "${BASH_SOURCE[0]}" | sed "s/^# \{0,1\}//"; exit 0 ;;
    *) echo "container/check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "container/check.sh: $*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root (rootful buildah/podman; rootless needs subuid setup this check does not do)"
[[ -x $PY ]] || die "no Python at $PY (run 'make setup' or set PYTHON)"
[[ -f $BENTOFILE ]] || die "no bentofile at $BENTOFILE"

T_START=$(date +%s.%N)
# Stage timings: name seconds, printed as a table and written to $STATE/timings.json at the end.
declare -a STAGES=()
stage_start() { STAGE=$1; STAGE_T0=$(date +%s.%N); log "$1"; }
stage_end() {
  local secs; secs=$(echo "$(date +%s.%N) - $STAGE_T0" | bc)
  STAGES+=("$STAGE $secs"); printf '<== %s took %.1f s\n' "$STAGE" "$secs"
}

# ---------------------------------------------------------------------------------------------- tools
stage_start tools
need=()
for tool in buildah podman runc debootstrap bc curl flock; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  pkgs=$(printf '%s\n' "${need[@]}" | sed 's/^flock$/util-linux/' | sort -u | tr '\n' ' ')
  echo "installing: $pkgs"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
fi
stage_end

mkdir -p "$STATE"
JSON=${JSON:-$STATE/timings.json}
free_gb=$(df --output=avail -BG "$STATE" | tail -1 | tr -dc 0-9)
((free_gb >= ${MIN_FREE_GB:-30})) || die "only ${free_gb} GB free under $STATE; the build needs ~30 GB at its peak (MIN_FREE_GB)"
exec 9>"$STATE/lock"
flock -n 9 || die "another container check is running (lock $STATE/lock): one heavy build at a time"
WORK=$(mktemp -d "$STATE/run.XXXXXX")   # everything of this run that is not an image; removed at exit

# Container tooling config of the check's own (no system-wide changes):
# crun fails here (setrlimit not permitted, hybrid cgroups): runc + cgroupfs + explicit ulimits,
# host networking, chroot isolation for buildah RUN steps.
cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/runroot"
EOF
cat >"$STATE/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_STORAGE_CONF=$STATE/storage.conf CONTAINERS_CONF=$STATE/containers.conf
export BUILDAH_ISOLATION=chroot
((KEEP_IMAGES)) && export BUILDAH_LAYERS=true   # cache every build step for the next run
export BENTOML_HOME=$WORK/bentoml_home BENTOML_DO_NOT_TRACK=true WANDB_MODE=disabled

CNAME=cifar100-check-$$
STARTED=0
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  log "cleanup"
  if ((STARTED)); then
    ((rc)) && { echo "--- container logs (last 60 lines)"; podman logs --tail 60 "$CNAME" 2>&1; }
    podman rm -f -t 5 "$CNAME" >/dev/null && echo "removed container $CNAME"
  fi
  buildah rm --all >/dev/null 2>&1   # working containers a failed build left behind (our storage only)
  if ((!KEEP_IMAGES)); then
    podman rmi -f "$IMAGE" >/dev/null 2>&1 && echo "removed image $IMAGE"
    podman image prune -f >/dev/null 2>&1
  fi
  rm -rf "$WORK"
  if ((PURGE)); then
    podman system reset -f >/dev/null 2>&1
    rm -rf "$STATE" && echo "purged $STATE"
  fi
  ((rc)) && echo "container check FAILED (exit $rc) in stage '${STAGE:-?}'" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------- base
# A python:3.11-slim stand-in built from Debian packages, named by a hash of its inputs (cached).
stage_start base
mkdir -p "$WORK/base-ctx/ca-certificates"
if [[ $TRUST_HOST_CA != 0 ]] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$WORK/base-ctx/ca-certificates/"
  echo "trusting the host's extra CA certificates: $(ls "$WORK/base-ctx/ca-certificates" | tr '\n' ' ')"
elif [[ $TRUST_HOST_CA == 1 ]]; then
  die "TRUST_HOST_CA=1 but /usr/local/share/ca-certificates has no *.crt"
fi
BASE_HASH=$(cat "$ROOT/container/base.Containerfile" "$WORK"/base-ctx/ca-certificates/* 2>/dev/null | sha256sum | cut -c1-12)
BASE=localhost/cifar100-base:$BASE_HASH
if ! podman image exists "$BASE"; then
  if ! podman image exists localhost/debian:bookworm; then
    if [[ ! -s $STATE/debian-bookworm.tar ]]; then
      rm -rf "$WORK/rootfs"
      debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
      tar -C "$WORK/rootfs" -cf "$STATE/debian-bookworm.tar.tmp" . && mv "$STATE/debian-bookworm.tar.tmp" "$STATE/debian-bookworm.tar"
      rm -rf "$WORK/rootfs"
    fi
    podman import "$STATE/debian-bookworm.tar" localhost/debian:bookworm >/dev/null
  fi
  buildah build --layers -f "$ROOT/container/base.Containerfile" -t "$BASE" "$WORK/base-ctx"
fi
# drop bases of older Containerfiles / certificates
podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/cifar100-base:' | grep -vx "$BASE" \
  | xargs -r podman rmi >/dev/null || true
podman tag "$BASE" "$PUBLIC_BASE"
echo "base image: $BASE (tagged $PUBLIC_BASE)"
stage_end

# ---------------------------------------------------------------------------------------------- model
stage_start model
cd "$ROOT"
"$PY" -m training.synthetic "$WORK/data" --per-class 1   # a test image for the probe
CKPT=$WORK/part1.pt
"$PY" -m export random --part part1 --out "$CKPT"        # the plumbing is checked, not the accuracy
"$PY" -m export all --checkpoint "$CKPT" --out "$WORK/artifacts"   # ONNX (+FP16) -> model store entry
stage_end

# ---------------------------------------------------------------------------------------------- bento
stage_start bento
BENTO=$("$BENTOML" build -f "$BENTOFILE" --output tag "$ROOT" | sed -n 's/^__tag__://p' | tail -1)
[[ -n $BENTO ]] || die "bentoml build printed no tag"
echo "bento: $BENTO"
stage_end

# ---------------------------------------------------------------------------------------------- containerize
stage_start containerize
"$BENTOML" containerize --backend "$BACKEND" "$BENTO" -t "$IMAGE"
podman image exists "$IMAGE" || die "containerize did not produce $IMAGE"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
stage_end

# ---------------------------------------------------------------------------------------------- run
stage_start run
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
STARTED=1
podman run -d --name "$CNAME" --network host \
  -e BENTOML_HOST=127.0.0.1 -e BENTOML_PORT="$PORT" "$IMAGE" >/dev/null
URL=http://127.0.0.1:$PORT
for _ in $(seq 1 300); do
  [[ $(podman inspect -f '{{.State.Running}}' "$CNAME") == true ]] || die "container exited before it was ready"
  curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "$URL/readyz" >/dev/null || die "$URL/readyz not ready after 300 s"
echo "ready at $URL"
stage_end

# ---------------------------------------------------------------------------------------------- probe
stage_start probe
USER_UID=$(podman exec "$CNAME" sh -c 'awk "/^Uid:/{print \$2}" /proc/1/status')
echo "server (pid 1) uid: $USER_UID, image user: $(podman image inspect -f '{{.Config.User}}' "$IMAGE")"
[[ $USER_UID =~ ^[0-9]+$ && $USER_UID -ne 0 ]] || die "the server runs as uid '$USER_UID', expected non-root"
"$PY" "$ROOT/container/probe.py" --url "$URL" --data-dir "$WORK/data" --checkpoint "$CKPT" --out "$WORK/probe"
stage_end

# ---------------------------------------------------------------------------------------------- report
STAGES+=("total $(echo "$(date +%s.%N) - $T_START" | bc)")
printf '\n%-14s %9s\n' stage seconds
for s in "${STAGES[@]}"; do printf '%-14s %9.1f\n' ${s}; done
printf '%s\n' "${STAGES[@]}" | "$PY" -c '
import json, sys
rows = [line.split() for line in sys.stdin if line.strip()]
json.dump({"seconds": {name: round(float(t), 1) for name, t in rows}, "image": sys.argv[1], "bento": sys.argv[2],
           "backend": sys.argv[4]}, open(sys.argv[3] + ".tmp", "w"), indent=2)' "$IMAGE" "$BENTO" "$JSON" "$BACKEND"
mv "$JSON.tmp" "$JSON"
echo "container check passed (timings: $JSON)"
