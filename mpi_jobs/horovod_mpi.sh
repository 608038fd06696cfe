#!/usr/bin/env bash
# Horovod over MPI: horovodrun starts NP ranks through mpirun, and Horovod's ring-allreduce
# averages the gradients every step (NCCL on GPUs, MPI on CPUs).
#
#   mpi_jobs/horovod_mpi.sh --data regression --epochs 2
#   NP=8 HOSTS=host1:4,host2:4 OUT=runs/big mpi_jobs/horovod_mpi.sh --epochs 10
#   NP=8 HOSTFILE=hosts.txt CONFIG=run.toml mpi_jobs/horovod_mpi.sh
#
# Settings (NP, HOSTS, HOSTFILE, CONFIG, OUT, VENV, MPI_ARGS, HOROVODRUN_ARGS, DRY_RUN): see
# mpi_jobs/common.sh. Arguments go to `hvdtrain train`. Several hosts need passwordless ssh
# between them and the checkout at the same path on each.
set -euo pipefail
# shellcheck source=mpi_jobs/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

hvd_setup horovod_mpi
hvd_rank_env mpirun
hvd_host_args horovodrun
hvd_mpirun_flags horovodrun
read -ra extra <<< "${HOROVODRUN_ARGS:-}"
cmd=(horovodrun -np "$NP" "${HOST_ARGS[@]}" --mpi "${extra[@]}")
if [ "${#MPIRUN_FLAGS[@]}" -gt 0 ]; then cmd+=(--mpi-args="${MPIRUN_FLAGS[*]}"); fi
hvd_exec "${cmd[@]}" "$VENV/bin/hvdtrain" train --backend horovod "${CONFIG_ARGS[@]}" --out "$OUT" "$@"
