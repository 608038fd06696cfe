#!/usr/bin/env bash
# Entry point of the hvdtrain image: runs a command inside hvdtrain's virtualenv.
#
#   docker run IMAGE                               -> hvdtrain --help
#   docker run IMAGE hvdtrain train ...            -> hvdtrain train ...
#   docker run IMAGE train ...                     -> hvdtrain train ... (first word is no command)
#   docker run --gpus all IMAGE horovodrun -np 4 hvdtrain train ...
set -euo pipefail

VENV="${HVDTRAIN_VENV:-/opt/hvdtrain/venv}"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
# Open MPI's shared-memory transport uses cross-memory attach (CMA) for large messages; the
# default container seccomp profile forbids process_vm_readv, so ranks would fail on it.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

if [ "$#" -eq 0 ]; then
  set -- hvdtrain --help
elif ! command -v -- "$1" >/dev/null 2>&1; then
  set -- hvdtrain "$@"
fi
exec "$@"
