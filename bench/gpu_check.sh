#!/usr/bin/env bash
# The GPU check in one command, made for the lent GPU machine (no registry there; only what is written under the
# folder in $OUT comes back):
#
#   CIFAR100_BENCH_OUT=$OUT bash bench/gpu_check.sh          # every GPU path, < 5 min on an H100, install included
#   CIFAR100_BENCH_OUT=$OUT bash bench/gpu_check.sh --full   # 950,000 OOD images through the service, < 10 min
#   bash bench/gpu_check.sh                                  # without a GPU: the same stages at CPU sizes (dry run)
#
# 1. installs what the image lacks from .whl/ (bash bench/fetch_wheels.sh downloads it; carry .whl): .whl/*.whl
#    (BentoML, Locust and their dependencies) when `import bentoml, locust` fails, and each of .whl/if-missing/*.whl
#    (pytest, tqdm, matplotlib, ...) whose distribution is not installed, into /tmp/site;
# 2. prints nvidia-smi and the torch/CUDA versions;
# 3. runs bench/end_to_end.py (see its docstring) under a hard time limit: the whole command, install included,
#    ends within CIFAR100_BENCH_BUDGET seconds (default 290; --full 570).
# Options go to bench/end_to_end.py (python bench/end_to_end.py --help lists them).
# Results, directly in CIFAR100_BENCH_OUT (else $OUT, else build/gpu_check): summary.json and table.txt (both
# rewritten after every stage), backends.json, logs.tar.gz (every stage's log) and console.txt (this output).
# Environment: CIFAR100_BENCH_OUT, CIFAR100_BENCH_WORK (scratch, wiped; /tmp/gpu_check), CIFAR100_BENCH_BUDGET,
# PYTHON, TORCHINDUCTOR_CACHE_DIR (torch.compile's cache, shared by the stages; /tmp/cifar100-torchinductor), and
# CIFAR100_* (passed to the service, e.g. CIFAR100_TORCH_COMPILE=0 for eager).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
RESULTS=${CIFAR100_BENCH_OUT:-${OUT:-build/gpu_check}} WORK=${CIFAR100_BENCH_WORK:-/tmp/gpu_check}
export CIFAR100_BENCH_OUT=$RESULTS
FULL=0
for arg in "$@"; do [ "$arg" = --full ] && FULL=1; done
BUDGET=${CIFAR100_BENCH_BUDGET:-$((FULL ? 570 : 290))}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"

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
exec > >(tee "$RESULTS/console.txt") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-?}: $BUDGET s in all, results in $RESULTS, options: ${*:-none}"
# What the image lacks: BentoML and Locust with their dependencies when they do not import; each small package of
# .whl/if-missing/ (pytest, tqdm, ...) whose distribution is not there, so that nothing the image ships is shadowed.
WHEELS=$("$PY" - <<'EOF'
import glob, importlib.metadata as md, importlib.util, os
if not (importlib.util.find_spec("bentoml") and importlib.util.find_spec("locust")):
    print("\n".join(sorted(glob.glob(".whl/*.whl"))))
for wheel in sorted(glob.glob(".whl/if-missing/*.whl")):
    try:
        md.version(os.path.basename(wheel).split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
if [ -n "$WHEELS" ]; then
  SITE=${SITE:-/tmp/site}
  echo "== installing $(echo "$WHEELS" | grep -c .) wheels into $SITE: $(echo "$WHEELS" | xargs -n1 basename | cut -d- -f1 | tr '\n' ' ')"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHEELS \
    || { echo "error: installing the wheels failed" >&2; exit 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
  echo "   installed in $(( $(date +%s) - t0 )) s"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm \
    --format=csv
else
  echo "no nvidia-smi: CPU dry run"
fi
"$PY" - <<'EOF' || exit 1
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for module in ("pytest", "tqdm", "requests", "matplotlib", "prometheus_client", "onnxconverter_common", "onnxruntime"):
    try:   # the stages that need one say so; this says it first
        importlib.import_module(module)
    except Exception as e:
        print(f"warning: python cannot import {module}: {e}", file=sys.stderr)
try:
    import bentoml  # noqa: F401
except ImportError as e:
    sys.exit(f"error: {e} (and .whl/ has no wheel for it: bash bench/fetch_wheels.sh, carry .whl)")
if importlib.util.find_spec("locust") is None:   # not imported here: it patches the standard library for gevent
    sys.exit("error: no locust (and .whl/ has no wheel for it: bash bench/fetch_wheels.sh, carry .whl)")
EOF

# The stages get what is left less 20 s (the report, stopping the service); the driver is stopped 5 s before the
# end and killed at the end, so the command ends within BUDGET.
LEFT=$((BUDGET - ($(date +%s) - START)))
if [ $LEFT -lt 60 ]; then echo "error: only $LEFT s left of $BUDGET after the install" >&2; exit 1; fi
timeout -k 5 $((LEFT - 10)) "$PY" -u bench/end_to_end.py --out "$RESULTS" --work "$WORK" --budget $((LEFT - 25)) "$@" &
DRIVER=$!
wait "$DRIVER"
rc=$?
DRIVER=
[ $rc -eq 124 ] && echo "error: bench/end_to_end.py ran past its time and was stopped" >&2
echo "== gpu_check done in $(( $(date +%s) - START )) s (exit $rc)"
exit $rc
