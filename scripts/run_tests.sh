#!/usr/bin/env bash
# Run pytest in the local virtualenv (bootstrap first). Exit code 5 (no tests collected) counts as success.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
"${HI3D_VENV:-.venv}/bin/python" -m pytest "$@"
rc=$?
[ $rc -eq 5 ] && { echo "pytest: no tests collected"; exit 0; }
exit $rc
