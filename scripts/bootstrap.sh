#!/usr/bin/env bash
# Create/update the local virtualenv .venv with everything hi3d needs (idempotent, quick when nothing changed).
# Debian packages: EGL/Mesa for headless rendering, and real 3D test objects made by others.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HI3D_VENV:-.venv}
PY=${PYTHON:-python3}
DEBS="libegl1 libegl-mesa0 libgl1-mesa-dri libgles2 glmark2-data assimp-testmodels"

missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    echo "bootstrap: installing Debian packages:" $missing
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null) \
      || echo "bootstrap: WARNING: could not install Debian packages ($missing); rendering or tests needing real objects will be skipped. Install them with: apt-get install $missing" >&2
  else
    echo "bootstrap: WARNING: Debian packages missing ($missing) and no root/sudo; install them with: apt-get install $missing" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# Users on CUDA machines install their own torch into the venv first; otherwise pin the CPU-install versions.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "bootstrap: installing torch==2.14.1 torchvision==0.29.1"
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
fi
stamp="$VENV/.hi3d-installed"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing hi3d and its dependencies"
  "$VENV/bin/pip" install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
