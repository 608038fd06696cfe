#!/usr/bin/env bash
# The MPI fallback (mpi4py only, no Horovod): mpirun starts NP ranks; rank 0 broadcasts the
# start point, ranks take local steps and average their parameters every --sync-every k steps.
# Ranks run under `python -m mpi4py`, so an exception on one rank aborts all instead of
# leaving the others waiting forever.
#
#   mpi_jobs/mpi_fallback.sh --sync-every 4 --alpha 1 --epochs 2
#   NP=8 HOSTS=host1:4,host2:4 mpi_jobs/mpi_fallback.sh --sync-every 16
#
# Settings (NP, HOSTS, HOSTFILE, CONFIG, OUT, VENV, MPI_ARGS, DRY_RUN): see
# mpi_jobs/common.sh. Arguments go to `hvdtrain train`.
set -euo pipefail
# shellcheck source=mpi_jobs/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

hvd_setup mpi_fallback
hvd_rank_env mpirun
hvd_host_args mpirun
hvd_mpirun_flags mpirun
hvd_exec mpirun -np "$NP" "${HOST_ARGS[@]}" "${MPIRUN_FLAGS[@]}" \
  "$PY" -m mpi4py -m hvdtrain train --backend mpi "${CONFIG_ARGS[@]}" --out "$OUT" "$@"
