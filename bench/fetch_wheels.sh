#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on the lent GPU machine (Python 3.12, no registry there).
#
#   bash bench/fetch_wheels.sh [DEST]      # default DEST: .whl (git-ignored); run from the repo root
#
# DEST/*.whl            always installed there: BentoML 1.4 and Locust with the dependencies the GPU image
#                       lacks (see /work/shared/notes/gpu-machine.md).
# DEST/if-missing/*.whl installed only when the image has no such distribution (tqdm, matplotlib, ...).
# Versions are the pins of constraints.txt; cp312 manylinux x86_64 or pure-Python wheels only.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}

REQUIRED=(
  bentoml fastapi annotated-doc a2wsgi aiohttp-asgi-connector aiosqlite annotated-types asgiref cattrs click-option-group httpx-ws
  kantoku opentelemetry-api opentelemetry-sdk opentelemetry-instrumentation
  opentelemetry-instrumentation-aiohttp-client opentelemetry-instrumentation-asgi
  opentelemetry-semantic-conventions opentelemetry-util-http pip-requirements-parser pydantic pydantic-core
  pydantic-settings python-dotenv
  python-json-logger python-multipart pyzmq rich-toolkit schema simple-di starlette tomli-w tornado
  typing-inspection tzdata uvicorn uvloop httptools watchfiles wsproto
  locust flask flask-cors flask-login itsdangerous blinker configargparse gevent geventhttpclient greenlet
  brotli bidict python-engineio python-socketio simple-websocket websocket-client zope-event zope-interface
)
# Imported by our code (export fp16, score progress bar, loadtest report/plots, HTTP client) or by the check (pytest
# for the GPU tests): small, and installed only where the image lacks them so that nothing the image ships is
# shadowed.
IF_MISSING=(
  tqdm onnxconverter-common requests urllib3 idna certifi charset-normalizer prometheus-client nvidia-ml-py pyyaml
  matplotlib contourpy kiwisolver fonttools cycler pyparsing python-dateutil
  pytest pluggy iniconfig pygments packaging pytest-timeout
)

pin() {  # NAME -> NAME==VERSION from constraints.txt (names compared PEP 503-normalised)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS='=' read -r name _ version; do
    if [ "$(echo "$name" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then echo "$1==$version"; return; fi
  done < <(grep -E '^[A-Za-z0-9_.-]+==' constraints.txt)
  echo "error: $1 is not pinned in constraints.txt" >&2
  return 1
}

download() {  # DIR SPEC...
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # noise of this machine's pip config
}

specs() { for p in "$@"; do pin "$p"; done; }

mkdir -p "$DEST/if-missing"
download "$DEST" $(specs "${REQUIRED[@]}")
download "$DEST/if-missing" $(specs "${IF_MISSING[@]}")

# One version of each package: a wheel whose name/version is no longer pinned (older runs) is removed.
"$PY" - "$DEST" <<'EOF'
import re, sys
from pathlib import Path
pins = {}
for line in Path("constraints.txt").read_text().splitlines():
    if "==" in line:
        name, version = line.split("==", 1)
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
for wheel in sorted(Path(sys.argv[1]).rglob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if pins.get(re.sub(r"[-_.]+", "-", name).lower()) != version:
        print(f"removing {wheel} (not the pinned version)")
        wheel.unlink()
EOF
count=$(find "$DEST" -name '*.whl' | wc -l)
echo "$count wheels in $DEST: $(du -sh "$DEST" | cut -f1) ($(du -sh "$DEST/if-missing" | cut -f1) of them if missing)"
