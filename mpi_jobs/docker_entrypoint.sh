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

if [ "$#" -eq 0 ]; then
  set -- hvdtrain --help
elif ! command -v -- "$1" >/dev/null 2>&1; then
  set -- hvdtrain "$@"
fi
exec "$@"
