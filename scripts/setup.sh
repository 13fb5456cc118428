#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: virtual environment, the package with its pinned
# dependencies and Debian's dataset-fashion-mnist (the embedded default data set).
#   scripts/setup.sh demo   what `make demo` and `make ui` need
#   scripts/setup.sh test   (default) also the test tools (the `dev` extras) and PostgreSQL, which
#                           only the deploy/ instance test starts
set -euo pipefail
cd "$(dirname "$0")/.."
FOR=${1:-test}
case "$FOR" in demo | test) ;; *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;; esac
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# one stamp per install: the test install (with the dev extras) serves the demo too
fresh() { [ -f "$1" ] && ! [ pyproject.toml -nt "$1" ]; }
if [ "$FOR" = test ]; then target=".[dev]" stamp="$VENV/.installed-dev"; else target="." stamp="$VENV/.installed"; fi
if ! fresh "$stamp" && ! { [ "$FOR" = demo ] && fresh "$VENV/.installed-dev"; }; then
  echo "==> installing prologue-pipeline and its pinned dependencies for $FOR (first time: a few minutes)"
  "$VENV/bin/pip" install --disable-pip-version-check -q -e "$target" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, dagster, webdataset, deepspeed" \
    || { echo "error: the install did not complete (see pip's output above)" >&2; exit 1; }
  touch "$stamp"
fi

# Debian packages: the embedded data set, and (tests only) the PostgreSQL server the deploy/ instance test starts
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
if [ "$FOR" = test ]; then
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: Debian packages missing: ${missing[*]}; installing them needs root." >&2
    echo "       run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "==> installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
# the Dagster instance the demo writes to and `make ui` reads (telemetry off: offline machines)
mkdir -p .dagster_home
[ -f .dagster_home/dagster.yaml ] || printf 'telemetry:\n  enabled: false\n' > .dagster_home/dagster.yaml
echo "==> environment ready: $VENV"
