#!/usr/bin/env bash
# Run pytest in the local virtualenv (bootstrap first): two worker processes (one per core, one torch thread
# each; a file's tests stay in one worker). Exit code 5 (no tests collected) counts as success.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"${HI3D_VENV:-.venv}/bin/python" -m pytest -n "${HI3D_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
[ $rc -eq 5 ] && { echo "pytest: no tests collected"; exit 0; }
exit $rc
