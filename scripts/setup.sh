#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: virtual environment, the package with its pinned
# dependencies, Debian's dataset-fashion-mnist (the embedded default data set) and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing prologue-pipeline and its pinned dependencies (first time: a few minutes)"
  "$VENV/bin/pip" install --disable-pip-version-check -q -e '.[dev]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, dagster, webdataset, deepspeed" \
    || { echo "error: the install did not complete (see pip's output above)" >&2; exit 1; }
  touch "$stamp"
fi

# Debian packages: the embedded data set, and the PostgreSQL server the deploy/ instance test starts
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
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
