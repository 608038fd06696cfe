# shellcheck shell=bash disable=SC2034  # (sets globals for the sourcing script)
# Shared by the mpi_jobs/ entry points (sourced, not run): settings, the virtualenv, launcher
# flags, and printing then running the job. Every entry point is parameterised by environment
# variables, so the same line works by hand, from make, CI or a batch script:
#
#   NP        ranks                                                   (default 2)
#   HOSTS     hosts and slots, e.g. localhost:2 or host1:4,host2:4     (default: this host)
#   HOSTFILE  a hostfile, one "host slots=N" per line; wins over HOSTS
#   CONFIG    a TOML file, passed as --config
#   OUT       output folder                                           (default <repo>/runs/<job>)
#   VENV      virtualenv with hvdtrain           (default $HVDTRAIN_VENV, else <repo>/.venv)
#   MPI_ARGS  more mpirun flags, e.g. "--mca btl_tcp_if_include eth0"
#   HOROVODRUN_ARGS  more horovodrun flags, e.g. "--network-interface eth0 --verbose"
#   DRY_RUN   1: print the command and exit 0 without running it
#
# Relative CONFIG, HOSTFILE and OUT paths are taken from the caller's working directory and
# made absolute, because ranks on other hosts do not share it. Arguments after the script's
# own go to the hvdtrain command unchanged.

HVD_ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
HVD_JOB="$(basename "$0" .sh)"

hvd_die() { echo "$HVD_JOB: $*" >&2; exit 2; }
hvd_abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

# Validate the settings and set PY, OUT, CONFIG_ARGS; $1 names the default output folder.
hvd_setup() {
  NP="${NP:-2}"
  [[ "$NP" =~ ^[1-9][0-9]*$ ]] || hvd_die "NP='$NP' is not a positive integer; use e.g. NP=2"
  VENV="${VENV:-${HVDTRAIN_VENV:-$HVD_ROOT/.venv}}"
  PY="$VENV/bin/python"
  [ -x "$PY" ] || hvd_die "no virtualenv at VENV=$VENV; run \`make install\` (or bash mpi_jobs/install.sh), or set VENV"
  OUT="$(hvd_abs "${OUT:-$HVD_ROOT/runs/$1}")"
  CONFIG_ARGS=()
  if [ -n "${CONFIG:-}" ]; then
    [ -f "$CONFIG" ] || hvd_die "CONFIG=$CONFIG is not a file; point it at a TOML run configuration"
    CONFIG_ARGS=(--config "$(hvd_abs "$CONFIG")")
  fi
  if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || hvd_die "HOSTFILE=$HOSTFILE is not a file; write one 'host slots=N' per line"
    HOSTFILE="$(hvd_abs "$HOSTFILE")"
  fi
  # The ranks and horovodrun's own helpers must find the venv's python, hvdtrain and horovodrun.
  export PATH="$VENV/bin:$PATH"
  # Open MPI refuses root unless told it is deliberate (containers, CI machines).
  if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT="${OMPI_ALLOW_RUN_AS_ROOT:-1}"
    export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}"
  fi
}

# Export hvdtrain's MPI/Horovod settings for the NP ranks this script starts, from their one
# definition (hvdtrain/comm/env.py), before the launcher: some are read as a rank starts
# (THP_MEM_ALLOC_ENABLE at torch's first allocation, OMPI_MCA_* at MPI_Init). A value already
# exported wins. With HOSTFILE the placement is unknown here: only the settings for any layout
# go in, and each rank adds the rest for its own. compare.sh and bench.sh skip this: hvdtrain
# gives each of their jobs its settings itself (and a benchmark's "stock" rows none).
# `hvd_rank_env mpirun`: the script starts mpirun, which gets its own settings too (comm/env.py
# MPIRUN: how long the ranks get to stop cleanly on Ctrl-C).
hvd_rank_env() {
  local exports
  local -a layout=(--np "$NP")
  if [ -n "${HOSTFILE:-}" ]; then layout=(); elif [ -n "${HOSTS:-}" ]; then layout+=(--hosts "$HOSTS"); fi
  if [ "${1:-}" = mpirun ]; then layout+=(--mpirun); fi
  exports="$("$PY" -m hvdtrain.comm.env --sh "${layout[@]}")" \
    || hvd_die "cannot read hvdtrain's MPI settings with $PY (is hvdtrain installed in VENV=$VENV?)"
  eval "$exports"
}

# True when the mpirun on PATH is Open MPI (the flags below are Open MPI's).
hvd_is_openmpi() { mpirun --version 2>&1 | grep -q "Open MPI"; }

# Sets MPIRUN_FLAGS: mpirun flags for this job, then MPI_ARGS. $1 says who runs mpirun:
#   mpirun      we do, so add --bind-to none --map-by slot (Horovod's advice: a rank runs several
#               threads, so pinning it to one core slows it; fill each host's slots in order);
#   horovodrun  it adds those itself (twice would be rejected).
# Either way (Open MPI), with more ranks than cores here (a laptop, a CI box): --oversubscribe.
hvd_mpirun_flags() {
  MPIRUN_FLAGS=()
  if hvd_is_openmpi; then
    if [ "$1" = mpirun ]; then MPIRUN_FLAGS=(--bind-to none --map-by slot); fi
    if [ "$NP" -gt "$(nproc)" ]; then MPIRUN_FLAGS+=(--oversubscribe); fi
  fi
  local -a extra
  read -ra extra <<< "${MPI_ARGS:-}"
  MPIRUN_FLAGS+=("${extra[@]}")
}

# Sets HOST_ARGS for mpirun ($1=mpirun) or horovodrun ($1=horovodrun; it defaults to localhost:NP).
hvd_host_args() {
  HOST_ARGS=()
  if [ -n "${HOSTFILE:-}" ]; then
    HOST_ARGS=(--hostfile "$HOSTFILE")
  elif [ -n "${HOSTS:-}" ]; then
    HOST_ARGS=(-H "$HOSTS")
  elif [ "$1" = horovodrun ]; then
    HOST_ARGS=(-H "localhost:$NP")
  fi
}

# Print the command as a shell would take it ("+ cmd"), then become it: the exit code is the job's.
hvd_exec() {
  local arg line="+"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$line" >&2
  if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
  exec "$@"
}
