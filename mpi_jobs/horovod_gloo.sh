#!/usr/bin/env bash
# Horovod over Gloo: horovodrun starts NP ranks itself (no mpirun), they meet at horovodrun's
# rendezvous server, and Horovod's ring-allreduce averages the gradients every step over Gloo.
# Use it where MPI is missing or misbehaves.
#
#   mpi_jobs/horovod_gloo.sh --data regression --epochs 2
#   NP=8 HOSTS=host1:4,host2:4 HOROVODRUN_ARGS="--network-interface eth0" mpi_jobs/horovod_gloo.sh
#
# Settings (NP, HOSTS, HOSTFILE, CONFIG, OUT, VENV, HOROVODRUN_ARGS, DRY_RUN): see
# mpi_jobs/common.sh. Arguments go to `hvdtrain train`. Several hosts need passwordless ssh
# between them and the checkout at the same path on each.
set -euo pipefail
# shellcheck source=mpi_jobs/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

hvd_setup horovod_gloo
hvd_rank_env
hvd_host_args horovodrun
read -ra extra <<< "${HOROVODRUN_ARGS:-}"
hvd_exec horovodrun --gloo -np "$NP" "${HOST_ARGS[@]}" "${extra[@]}" \
  "$VENV/bin/hvdtrain" train --backend horovod "${CONFIG_ARGS[@]}" --out "$OUT" "$@"
