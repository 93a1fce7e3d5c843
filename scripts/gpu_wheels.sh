#!/usr/bin/env bash
# Wheels for scripts/gpu_check.py on a GPU machine without network, downloaded (DeepSpeed, source-only on PyPI,
# built) here into DIR, plus the real object and its 16-view 1024² orbit:
#   bash scripts/gpu_wheels.sh DIR          # then, on the GPU machine: python scripts/gpu_check.py --wheels DIR
# The GPU machine has python 3.12 with torch, torchvision, transformers, accelerate, timm, safetensors (and their
# dependencies: numpy, pillow, pyyaml, huggingface_hub, tqdm, psutil, networkx, ...; requests, which diffusers needs
# and transformers 5 no longer pulls in, is included). Versions are the ones
# of this checkout's environment (HI3D_VENV, default .venv). HI3D_WHEELS_PYTHON=3.11 targets another python
# (to check the flow on a machine without 3.12). Left out, to stay under 60 MiB: pyrender and its OpenGL stack
# (pyglet, PyOpenGL, freetype-py, imageio: only the turntable picture needs them, and a GPU machine rarely has
# EGL; gpu_check records the turntable as skipped), open_clip_torch, lpips, torchmetrics (metrics the check does
# not use), xatlas and fast-simplification (UV texturing, decimation: the check bakes vertex colours), pygments/
# markdown-it (rich's console, all gsplat uses, imports neither), tensorboard, matplotlib.
set -euo pipefail
DIR=${1:?usage: gpu_wheels.sh DIR}
PYVER=${HI3D_WHEELS_PYTHON:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HI3D_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# what hi3d needs beyond the GPU machine's packages (gsplat's, pyrender's and DeepSpeed's dependencies included)
BINARY="scipy PyMCubes msgpack pydantic-core ninja charset-normalizer"
PURE="diffusers importlib-metadata zipp omegaconf gsplat jaxtyping wadler-lindig rich trimesh hjson py-cpuinfo
      pydantic annotated-types typing-inspection nvidia-ml-py einops requests urllib3 certifi idna"

pinned() {  # NAME -> NAME==VERSION of this environment (NAME alone if it is not installed here)
  for name in "$@"; do
    v=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    echo "$name${v:+==$v}"
  done
}

# shellcheck disable=SC2046
"$PY" -m pip download -q --dest "$DIR" --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 $(pinned $BINARY $PURE)
# DeepSpeed (the release trains with ZeRO-2) is a source distribution on PyPI: build its pure-python wheel
# here without compiling any op (the ZeRO-2 check uses torch's AdamW, no DeepSpeed kernel)
DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$DIR" \
  "$(pinned deepspeed)" 2>"$DIR/deepspeed-build.log" || echo "gpu_wheels: deepspeed wheel not built (see $DIR/deepspeed-build.log): the ZeRO-2 step will be skipped"

# the real object (Stanford bunny, Debian glmark2-data) and its 16-view 1024² orbit (RGBA + cameras: what
# reconstruct reads), rendered here so the GPU machine needs no OpenGL for its input
SRC=/usr/share/glmark2/models/bunny.obj
if [ -f "$SRC" ]; then
  cp "$SRC" "$DIR/bunny.obj"
  if [ ! -f "$DIR/bunny_orbit/cameras.json" ]; then
    PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} PYTHONPATH="$ROOT" "$PY" -m hi3d.cli render-orbit "$SRC" \
      --out "$DIR/bunny_orbit" --num-views 16 --resolution 1024 >/dev/null
    rm -rf "$DIR/bunny_orbit/depth" "$DIR/bunny_orbit/normal" "$DIR/bunny_orbit/run.json"
  fi
else
  echo "gpu_wheels: $SRC missing (apt-get install glmark2-data): gpu_check renders no orbit without it"
fi
du -sh "$DIR" | awk '{print "gpu_wheels: " $1 " in " $2}'
ls "$DIR"/*.whl | wc -l | awk '{print "gpu_wheels: " $1 " wheels"}'
