#!/usr/bin/env bash
# The end-to-end speed check in one command, made for the lent GPU machine (no registry there):
#
#   bash bench/gpu_check.sh                                  # GPU: ResNet-50 @224, 950,000 OOD images, < 9.5 min
#   bash bench/gpu_check.sh --images 5000 --resolution 32    # CPU dry run here (a few minutes)
#
# 1. installs .whl/*.whl (BentoML, Locust; bash bench/fetch_wheels.sh downloads them) into /tmp/site, plus
#    .whl/if-missing/*.whl the image lacks, when `import bentoml, locust` fails (i.e. not in the dev venv);
# 2. prints nvidia-smi and the torch/CUDA versions;
# 3. runs bench/end_to_end.py (see its docstring) under a hard time limit: export, raw backends,
#    `bentoml serve`, Locust, scoring the OOD set through the service and directly; one table at the end.
# Options go to bench/end_to_end.py (python bench/end_to_end.py --help lists them: --images, --resolution,
# --backend, --chunk-size, --in-flight, --batch-sizes, --locust-seconds, --locust-users, --keep-data).
# Results: CIFAR100_BENCH_OUT (default build/gpu_check): summary.json, table.txt, log.txt, backends.json,
# console.txt. Environment: CIFAR100_BENCH_OUT, CIFAR100_BENCH_WORK (scratch, wiped; /tmp/gpu_check),
# CIFAR100_BENCH_BUDGET (seconds for the stages, 480), PYTHON, and CIFAR100_* (passed to the service, e.g.
# CIFAR100_TORCH_COMPILE=0 for eager).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${CIFAR100_BENCH_OUT:-build/gpu_check} WORK=${CIFAR100_BENCH_WORK:-/tmp/gpu_check}
BUDGET=${CIFAR100_BENCH_BUDGET:-480}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)

# The service runs in its own process group (pgid in $WORK/service/server.pgid, written by LocalServer);
# stop it however we exit.
stop_service() {
  local pgid
  pgid=$(cat "$WORK/service/server.pgid" 2>/dev/null) || return 0
  if kill -0 -- "-$pgid" 2>/dev/null; then
    echo "stopping the service (process group $pgid)"
    kill -TERM -- "-$pgid" 2>/dev/null
    for _ in $(seq 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pgid" 2>/dev/null
  fi
  rm -f "$WORK/service/server.pgid"
}
DRIVER=
on_signal() {  # the driver stops the service itself on SIGTERM; the EXIT trap catches the rest
  [ -n "$DRIVER" ] && kill -TERM "$DRIVER" 2>/dev/null && wait "$DRIVER"
  exit 143
}
trap stop_service EXIT
trap on_signal TERM INT
exec > >(tee "$OUT/console.txt") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-?}: budget $BUDGET s, options: ${*:-none}"
if ! "$PY" -c "import bentoml, locust" 2>/dev/null; then
  SITE=${SITE:-/tmp/site}
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: bentoml/locust missing and no wheels in .whl/ (run bash bench/fetch_wheels.sh, carry .whl)" >&2
    exit 1
  fi
  # Wheels in .whl/if-missing/ only where the image has no such distribution, so nothing it ships is shadowed.
  MISSING=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, os
for wheel in sorted(glob.glob(".whl/if-missing/*.whl")):
    try:
        md.version(os.path.basename(wheel).split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  echo "== installing $(ls .whl/*.whl | wc -l) wheels + $(echo "$MISSING" | grep -c .) the image lacks into $SITE"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl $MISSING || { echo "error: installing the wheels failed" >&2; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
  echo "   installed in $(( $(date +%s) - t0 )) s: $(echo $MISSING | xargs -rn1 basename | cut -d- -f1 | tr '\n' ' ')"
  "$PY" -c "import bentoml, locust" || { echo "error: bentoml/locust still do not import" >&2; exit 1; }
  for module in tqdm requests matplotlib prometheus_client onnxconverter_common onnxruntime; do  # the stages say which fails
    "$PY" -c "import $module" 2>/dev/null || echo "warning: python cannot import $module" >&2
  done
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm \
    --format=csv
else
  echo "no nvidia-smi: CPU dry run"
fi
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA',
torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

# The stages' own budget plus a margin for the report; then the driver is stopped (and killed 30 s later).
timeout -k 30 $((BUDGET + 40)) "$PY" -u bench/end_to_end.py --out "$OUT" --work "$WORK" --budget "$BUDGET" "$@" &
DRIVER=$!
wait "$DRIVER"
rc=$?
DRIVER=
[ $rc -eq 124 ] && echo "error: bench/end_to_end.py ran past $((BUDGET + 40)) s and was stopped" >&2
echo "== gpu_check done in $(( $(date +%s) - START )) s (exit $rc)"
exit $rc
