#!/usr/bin/env bash
# The same training job under Horovod allreduce and under the MPI fallback (one run per
# --sync-every k), side by side: OUT/report.md, OUT/compare.json and a table on stdout.
# `hvdtrain compare` launches each run itself on this host (horovodrun, mpirun).
#
#   mpi_jobs/compare.sh --rows 100000 --epochs 1 --sync-every 1,16
#   NP=4 OUT=runs/cmp4 CONFIG=run.toml mpi_jobs/compare.sh
#
# Settings (NP, CONFIG, OUT, VENV, DRY_RUN): see mpi_jobs/common.sh. Arguments go to
# `hvdtrain compare`; those it does not know go on to every `hvdtrain train` run.
set -euo pipefail
# shellcheck source=mpi_jobs/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

hvd_setup compare
if [ -n "${HOSTS:-}${HOSTFILE:-}" ]; then
  echo "$HVD_JOB: note: HOSTS/HOSTFILE are ignored; hvdtrain compare runs every job on this host" >&2
fi
hvd_exec "$VENV/bin/hvdtrain" compare --np "$NP" --out "$OUT" "${CONFIG_ARGS[@]}" "$@"
