#!/usr/bin/env bash
# GPU check: on a machine with one NVIDIA GPU and no package registry, build Horovod 0.28.1 with
# NCCL operations from a carried source distribution, then compare 1-GPU `hvdtrain train`
# (Horovod backend) with a plain torch loop on the same model, data and batch.
#
# Prepare on a machine with a registry (files travel with the working tree):
#   mkdir -p shared/gpu-carry && pip download --no-deps --no-binary :all: horovod==0.28.1 -d shared/gpu-carry
#   pip download -d shared/gpu-carry cloudpickle psutil pyyaml packaging
# Run on the GPU machine, from the checkout:
#   bash mpi_jobs/gpu_check.sh            # GPU_CARRY=<dir> GPU_HIDDEN=4096,4096 GPU_ROWS=400000 ...
# Prints samples/s for both and their ratio (goal: hvdtrain >= 0.97x plain torch), and writes
# $GPU_OUT/gpu_check.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${GPU_CARRY:-$ROOT/shared/gpu-carry}"
VENV="${GPU_VENV:-/tmp/hvdtrain-gpu-venv}"
OUT="${GPU_OUT:-${OUT:-$ROOT/runs/gpu_check}}"
HIDDEN="${GPU_HIDDEN:-4096,4096,4096}"
ROWS="${GPU_ROWS:-400000}"
BATCH="${GPU_BATCH:-1024}"
EPOCHS="${GPU_EPOCHS:-2}"

[ -f "$CARRY/horovod-0.28.1.tar.gz" ] || { echo "gpu_check: $CARRY/horovod-0.28.1.tar.gz is missing; see the header of $0" >&2; exit 2; }
# The machine's torch (CUDA build), NCCL and mpi4py stay visible through system site packages.
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
NCCL_DIR="$("$VENV/bin/python" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)"
if [ -n "$NCCL_DIR" ]; then
  export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$NCCL_DIR/lib"
  export LD_LIBRARY_PATH="$NCCL_DIR/lib:${LD_LIBRARY_PATH:-}"
  [ -e "$NCCL_DIR/lib/libnccl.so" ] || ln -sf libnccl.so.2 "$NCCL_DIR/lib/libnccl.so" 2>/dev/null || true
fi
CC_LIST="$("$VENV/bin/python" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')"
export HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-$CC_LIST}"
export HOROVOD_CUDA_HOME="${HOROVOD_CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
with_mpi=1
command -v mpicxx >/dev/null 2>&1 || with_mpi=0
echo "+ install: NCCL=$NCCL_DIR CUDA=$HOROVOD_CUDA_HOME CC=$HOROVOD_BUILD_CUDA_CC_LIST MPI=$with_mpi"
PIP_NO_INDEX=1 PIP_FIND_LINKS="$CARRY" HVDTRAIN_VENV="$VENV" HVDTRAIN_TORCH_SPEC=torch \
  HVDTRAIN_WITH_NCCL=1 HVDTRAIN_WITH_MPI="$with_mpi" HVDTRAIN_EXTRAS=0 \
  HVDTRAIN_HOROVOD_SDIST="$CARRY/horovod-0.28.1.tar.gz" HVDTRAIN_CACHE="$CARRY/cache" \
  bash "$ROOT/mpi_jobs/install.sh"
"$VENV/bin/horovodrun" --check-build

mkdir -p "$OUT"
PY="$VENV/bin/python"
"$PY" -m hvdtrain data make regression --rows "$ROWS" --out "$OUT/data" >/dev/null 2>&1 || true
echo "+ hvdtrain train --backend horovod (1 GPU)"
"$PY" -m hvdtrain train --backend horovod --data "$OUT/data" --model mlp --hidden "$HIDDEN" \
  --batch-size "$BATCH" --epochs "$EPOCHS" --lr 0.001 --out "$OUT/hvdtrain" --overwrite --log-every 50
echo "+ plain torch loop (same model, data, batch)"
"$PY" - "$OUT" "$HIDDEN" "$BATCH" "$EPOCHS" <<'PY'
import json, sys
from pathlib import Path
import torch
from hvdtrain.tools.bench_train import plain_loop
out, hidden, batch, epochs = Path(sys.argv[1]), tuple(int(h) for h in sys.argv[2].split(",")), int(sys.argv[3]), int(sys.argv[4])
plain = plain_loop(out / "data", hidden, batch, epochs, lr=0.001, seed=0, threads=1, device="cuda")["samples_per_sec"]
hv = json.loads((out / "hvdtrain" / "summary.json").read_text())
row = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "hidden": hidden, "batch": batch,
       "plain_samples_per_sec": plain, "hvdtrain_samples_per_sec": hv["samples_per_sec"],
       "ratio": hv["samples_per_sec"] / plain}
(out / "gpu_check.json").write_text(json.dumps(row, indent=2) + "\n")
print(f"plain torch: {plain:,.0f} samples/s   hvdtrain (horovod, 1 GPU): {hv['samples_per_sec']:,.0f} samples/s"
      f"   ratio {row['ratio']:.3f} (goal >= 0.97)")
PY
