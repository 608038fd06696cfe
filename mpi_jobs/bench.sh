#!/usr/bin/env bash
# Benchmarks: `allreduce` (the allreduce implementations over message sizes) or `train`
# (training throughput per strategy). They print a table and write JSON into OUT.
#
#   mpi_jobs/bench.sh allreduce
#   NP=4 OUT=runs/bench4 mpi_jobs/bench.sh train --rows 200000
#
# Settings (NP, CONFIG (train only), OUT, VENV, DRY_RUN): see mpi_jobs/common.sh. Arguments
# after the kind go to `hvdtrain bench <kind>`.
set -euo pipefail
# shellcheck source=mpi_jobs/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

kind="${1:-}"
case "$kind" in
  allreduce|train) shift ;;
  *) hvd_die "first argument '$kind' must be the benchmark: allreduce or train; e.g. mpi_jobs/bench.sh allreduce" ;;
esac
hvd_setup "bench-$kind"
if [ "$kind" = allreduce ] && [ -n "${CONFIG:-}" ]; then
  hvd_die "CONFIG is a training configuration; use it with 'bench.sh train', or unset it"
fi
hvd_exec "$VENV/bin/hvdtrain" bench "$kind" --np "$NP" --out "$OUT" "${CONFIG_ARGS[@]}" "$@"
