# shellcheck shell=bash
# Shared by the slurm/*.sbatch scripts (sourced, never submitted): environment set-up,
# the MPI launcher for a backend, and the checkpoint-and-requeue protocol.
#
# Protocol: the training step runs in the background while the batch shell waits, so the
# shell can take signals. On SIGUSR1 (sent by `#SBATCH --signal=B:USR1@120` before the time
# limit, or by `scancel --batch --signal=USR1 JOBID`) or SIGTERM (preemption, `scancel`), the
# shell forwards SIGUSR1 to the launcher (srun and mpirun pass it on to every rank); hvdtrain
# writes a checkpoint and exits with EXIT_PREEMPTED (hvdtrain/errors.py: 99, "preempted, resume
# me"). The shell then runs `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue
# under the same id and output directory, and the next run finds the checkpoint and adds `--resume`.

hvd_log() { echo "[hvdtrain-slurm $(date +%H:%M:%S)] $*"; }
hvd_die() { echo "hvdtrain-slurm: $*" >&2; exit 2; }

# Activate the virtualenv: HVDTRAIN_VENV, else <submit dir>/.venv, else <repo>/.venv, else PATH.
hvd_setup() {
  local venv="${HVDTRAIN_VENV:-}" cand
  if [ -z "$venv" ]; then
    for cand in "${SLURM_SUBMIT_DIR:-.}/.venv" "$HVDTRAIN_HOME/.venv"; do
      if [ -f "$cand/bin/activate" ]; then venv="$cand"; break; fi
    done
  fi
  if [ -n "$venv" ]; then
    [ -f "$venv/bin/activate" ] || hvd_die "HVDTRAIN_VENV=$venv has no bin/activate; point it at the virtualenv made by mpi_jobs/install.sh"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
  command -v hvdtrain >/dev/null 2>&1 \
    || hvd_die "'hvdtrain' is not on PATH (venv: '${venv:-none found}'); set HVDTRAIN_VENV=/path/to/venv or run mpi_jobs/install.sh in $SLURM_SUBMIT_DIR"
  # Steps inherit this shell's environment (the venv's PATH) even under `sbatch --export=NONE`.
  export SLURM_EXPORT_ENV=ALL
  # hvdtrain's MPI/Horovod settings for the job's ranks, from their one definition
  # (hvdtrain/comm/env.py), before any step starts: some are read as a rank starts (torch's first
  # allocation, MPI_Init). A value already exported wins. On one node the whole job is known to
  # share a host; on several, each rank adds the layout-dependent ones for itself.
  local -a layout=()
  if [ "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" = 1 ]; then layout=(--np "${SLURM_NTASKS:-1}"); fi
  local exports
  exports="$(python -m hvdtrain.comm.env --sh "${layout[@]}")" \
    || hvd_die "cannot read hvdtrain's MPI settings with $(command -v python); set HVDTRAIN_VENV to hvdtrain's virtualenv"
  eval "$exports"
  # The exit code of a step that checkpointed on a signal ("preempted, resume me"): hvdtrain's own.
  HVD_EXIT_PREEMPTED="$(python -c 'from hvdtrain.errors import EXIT_PREEMPTED; print(EXIT_PREEMPTED)')" \
    || hvd_die "cannot import hvdtrain with $(command -v python)"
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job; pass it on.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
  if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  hvd_log "job ${SLURM_JOB_NAME:-?} ${SLURM_JOB_ID:-?} (run $(( ${SLURM_RESTART_COUNT:-0} + 1 ))):" \
    "nodes=${SLURM_JOB_NODELIST:-?} ntasks=${SLURM_NTASKS:-1} gpus/task=${SLURM_GPUS_PER_TASK:-0}" \
    "python=$(command -v python) venv=${venv:-none}"
}

# "host1:4,host2:4" for horovodrun -H, from SLURM_JOB_NODELIST and SLURM_TASKS_PER_NODE ("4(x2),3").
hvd_hostlist() {
  local part parts=() counts=() hosts=() entries=() i r
  IFS=, read -ra parts <<< "$SLURM_TASKS_PER_NODE"
  for part in "${parts[@]}"; do
    if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((r = 0; r < BASH_REMATCH[2]; r++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
      counts+=("$part")
    fi
  done
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  for i in "${!hosts[@]}"; do entries+=("${hosts[$i]}:${counts[$i]}"); done
  (IFS=,; echo "${entries[*]}")
}

# Sets HVD_LAUNCH to the command prefix that starts `hvdtrain` on every task of the job.
# Backends: horovod | mpi | ddp | single. Launchers: srun | mpirun | horovodrun.
hvd_launcher() {
  local backend="$1" launcher="$2" np="${SLURM_NTASKS:-1}"
  # The mpi fallback runs under `python -m mpi4py`, so an exception on one rank aborts all.
  local -a prog=(hvdtrain)
  [ "$backend" = mpi ] && prog=(python -m mpi4py -m hvdtrain)
  # shellcheck disable=SC2206
  local -a mpirun_args=(${HVDTRAIN_MPIRUN_ARGS:-})
  case "$backend:$launcher" in
    single:*)              HVD_LAUNCH=(srun --ntasks=1 hvdtrain) ;;
    horovod:srun|mpi:srun|ddp:srun) HVD_LAUNCH=(srun --mpi=pmix "${prog[@]}") ;;
    horovod:mpirun|mpi:mpirun|ddp:mpirun)
                           HVD_LAUNCH=(mpirun -np "$np" "${mpirun_args[@]}" "${prog[@]}") ;;
    horovod:horovodrun)    HVD_LAUNCH=(horovodrun -np "$np" -H "$(hvd_hostlist)" hvdtrain) ;;
    mpi:horovodrun|ddp:horovodrun)
                           hvd_die "HVDTRAIN_LAUNCHER=horovodrun starts Horovod jobs only; use srun or mpirun for HVDTRAIN_BACKEND=$backend" ;;
    *) hvd_die "unknown HVDTRAIN_BACKEND='$backend' or HVDTRAIN_LAUNCHER='$launcher' (backends: horovod mpi ddp single; launchers: srun mpirun horovodrun)" ;;
  esac
}

# True when run directory $1 holds a finished checkpoint (hvdtrain writes checkpoints/ckpt-<step>.pt).
hvd_have_checkpoint() {
  compgen -G "$1/checkpoints/ckpt-*.pt" >/dev/null
}

# HVDTRAIN_RESUME: auto (default: resume when OUT already holds a checkpoint, e.g. after a
# requeue), 1 (always pass --resume), 0 (never).
hvd_resume_args() {
  case "${HVDTRAIN_RESUME:-auto}" in
    1) echo --resume ;;
    0) ;;
    auto) if hvd_have_checkpoint "$1"; then echo --resume; fi ;;
    *) hvd_die "HVDTRAIN_RESUME must be auto, 1 or 0, not '$HVDTRAIN_RESUME'" ;;
  esac
}

HVD_SIGNALLED=""
HVD_STEP_PID=""
hvd_forward() {
  HVD_SIGNALLED="$1"
  if [ -n "$HVD_STEP_PID" ] && kill -0 "$HVD_STEP_PID" 2>/dev/null; then
    hvd_log "got SIG$1: asking the training step to checkpoint and stop (SIGUSR1 to pid $HVD_STEP_PID)"
    kill -USR1 "$HVD_STEP_PID" 2>/dev/null || true
  fi
}

# hvd_run_step CMD...: run CMD in the background, forward SIGUSR1/SIGTERM to it, return its status.
hvd_run_step() {
  local rc
  hvd_log "running: $*"
  "$@" &
  HVD_STEP_PID=$!
  trap 'hvd_forward USR1' USR1
  trap 'hvd_forward TERM' TERM
  while :; do
    wait "$HVD_STEP_PID"
    rc=$?
    # `wait` returns >128 when a trapped signal interrupts it; the step is still running then.
    if [ "$rc" -gt 128 ] && kill -0 "$HVD_STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1 TERM
  return "$rc"
}

# hvd_finish RC OUT: exit the batch script; a preempted step (exit $HVD_EXIT_PREEMPTED, or stopped
# by a forwarded signal after writing a checkpoint) requeues the job unless HVDTRAIN_REQUEUE=0.
hvd_finish() {
  local rc="$1" out="$2"
  if [ "$rc" = 0 ]; then
    hvd_log "finished: $out"
    exit 0
  fi
  if [ "$rc" = "$HVD_EXIT_PREEMPTED" ] || { [ -n "$HVD_SIGNALLED" ] && hvd_have_checkpoint "$out"; }; then
    if [ "${HVDTRAIN_REQUEUE:-1}" = 1 ]; then
      hvd_log "preempted (exit $rc), checkpoint in $out/checkpoints: requeueing job $SLURM_JOB_ID"
      if scontrol requeue "$SLURM_JOB_ID"; then
        # Slurm now ends this run of the batch script; wait for that rather than race it.
        sleep 300 &
        wait $!
      fi
      hvd_log "scontrol requeue failed (submitted with --no-requeue?); resubmit to resume from $out"
    else
      hvd_log "preempted (exit $rc); HVDTRAIN_REQUEUE=0, so not requeueing; resubmit to resume from $out"
    fi
    exit "$HVD_EXIT_PREEMPTED"
  fi
  hvd_log "training step failed with exit code $rc"
  exit "$rc"
}

# The body of train.sbatch and train_cpu.sbatch: `hvdtrain train` with the HVDTRAIN_* settings.
hvd_train_main() {
  hvd_setup
  local out="${HVDTRAIN_OUT:-${SLURM_SUBMIT_DIR:-.}/runs/${SLURM_JOB_NAME:-hvdtrain}-${SLURM_JOB_ID:-0}}"
  mkdir -p "$out" || hvd_die "cannot create HVDTRAIN_OUT=$out"
  local -a args=(train --backend "$HVDTRAIN_BACKEND" --data "$HVDTRAIN_DATA"
                 --rows "$HVDTRAIN_ROWS" --epochs "$HVDTRAIN_EPOCHS"
                 --batch-size "$HVDTRAIN_BATCH_SIZE" --out "$out")
  [ -n "${HVDTRAIN_CHECKPOINT_EVERY:-}" ] && args+=(--checkpoint-every "$HVDTRAIN_CHECKPOINT_EVERY")
  [ -n "${HVDTRAIN_SYNC_EVERY:-}" ] && args+=(--sync-every "$HVDTRAIN_SYNC_EVERY")
  # shellcheck disable=SC2207
  args+=($(hvd_resume_args "$out"))
  # shellcheck disable=SC2206
  args+=(${HVDTRAIN_ARGS:-})
  hvd_launcher "$HVDTRAIN_BACKEND" "$HVDTRAIN_LAUNCHER"
  hvd_run_step "${HVD_LAUNCH[@]}" "${args[@]}"
  hvd_finish "$?" "$out"
}
