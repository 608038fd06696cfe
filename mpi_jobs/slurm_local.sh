#!/usr/bin/env bash
# A single-node Slurm (slurmctld + slurmd on this machine) for running slurm/*.sbatch for real.
#
#   mpi_jobs/slurm_local.sh start  [STATEDIR]   install if missing, configure, start, wait for idle
#   mpi_jobs/slurm_local.sh stop   [STATEDIR]   stop both daemons by their pid files
#   mpi_jobs/slurm_local.sh status [STATEDIR]   show daemons and `sinfo`
#
# `start` prints the environment the Slurm client commands need, so
#   eval "$(mpi_jobs/slurm_local.sh start)"
#   sbatch --wait --gres=none slurm/train_cpu.sbatch
# works; everything else goes to stderr. All three commands are idempotent.
#
# The cluster is one node, `localhost`, with no GPUs, no cgroups and no authentication
# (auth/none): a test and development cluster, not a production setup. Needs root (the
# daemons run as root, and `apt-get install` may be needed); jobs run as the submitting user.
#
# Environment:
#   SLURM_LOCAL_PORT     slurmctld port; slurmd uses PORT+1           (default: 6817)
#   SLURM_LOCAL_CPUS     CPUs the node advertises (may exceed the real core count:
#                        tasks then share cores)                      (default: 8)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for the node to become idle, and for the
#                        daemons to exit on `stop` before SIGKILL     (default: 30)
set -euo pipefail

cmd="${1:-}"
STATE="${2:-${SLURM_LOCAL_STATEDIR:-${TMPDIR:-/tmp}/hvdtrain-slurm}}"
PORT="${SLURM_LOCAL_PORT:-6817}"
CPUS="${SLURM_LOCAL_CPUS:-8}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-30}"
NODE=localhost
CONF="$STATE/slurm.conf"

say() { echo "[slurm_local] $*" >&2; }
die() { echo "slurm_local: $*" >&2; exit 1; }

case "$cmd" in
  start|stop|status) ;;
  *) echo "usage: $0 {start|stop|status} [STATEDIR]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || die "needs root (the local slurmctld/slurmd run as root); run it with sudo"

pid_of() {  # prints the pid in pid file $1 if that process is alive
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

print_env() {
  echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
  local name pid waited
  for name in slurmd slurmctld; do
    pid="$(pid_of "$STATE/$name.pid" || true)"
    if [ -z "$pid" ]; then
      say "ok: $name not running"
      rm -f "$STATE/$name.pid"
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$((TIMEOUT * 10))" ]; do
      sleep 0.1; waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
    say "stopped $name (pid $pid)"
  done
}

if [ "$cmd" = stop ]; then
  stop_daemons
  exit 0
fi

if [ "$cmd" = status ]; then
  rc=0
  for name in slurmctld slurmd; do
    if pid="$(pid_of "$STATE/$name.pid")"; then
      echo "$name: running (pid $pid)"
    else
      echo "$name: not running"; rc=1
    fi
  done
  [ "$rc" = 0 ] && SLURM_CONF="$CONF" sinfo
  exit "$rc"
fi

# --- start: 1. packages --------------------------------------------------------
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
# srun --mpi=pmix needs Slurm's PMIx plugin (slurm-wlm-basic-plugins) and libpmix.
ls /usr/lib/*/slurm-wlm/mpi_pmix.so >/dev/null 2>&1 || need+=(slurm-wlm-basic-plugins libpmix2)
if ((${#need[@]})); then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# --- 2. configuration (rewritten only when it changes) --------------------------
mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
# Advertise 90% of this machine's memory, so --mem requests are checked against something real.
MEM_MB="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
new_conf="$(cat <<EOF
# Written by mpi_jobs/slurm_local.sh: a single-node test cluster.
ClusterName=hvdtrain
SlurmctldHost=$NODE
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Let the node advertise more CPUs than it has (CPUs=$CPUS on any machine).
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
# Refuse at submission a job that no node/partition could ever run, instead of leaving it pending.
EnforcePartLimits=ALL
ReturnToService=2
KillWait=10
# Keep finished jobs 5 s: sbatch --wait then polls every 2 s instead of backing off to 32 s.
MinJobAge=5
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerType=sched/backfill
# Reconsider pending jobs (a requeued one) every 2 s rather than every 30-60 s.
SchedulerParameters=bf_interval=2,sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)"
if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; then
  if [ -n "$(pid_of "$STATE/slurmctld.pid" || true)$(pid_of "$STATE/slurmd.pid" || true)" ]; then
    say "configuration changed; restarting the daemons"
    stop_daemons
  fi
  printf '%s\n' "$new_conf" > "$CONF"
  say "wrote $CONF"
fi
export SLURM_CONF="$CONF"

# --- 3. daemons -----------------------------------------------------------------
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -n "$(pid_of "$STATE/slurmctld.pid" || true)" ]; then
  say "ok: slurmctld running (pid $(cat "$STATE/slurmctld.pid"))"
else
  port_busy "$PORT" && die "port $PORT is in use by another process (another Slurm?); set SLURM_LOCAL_PORT"
  slurmctld -f "$CONF"
  say "started slurmctld"
fi
if [ -n "$(pid_of "$STATE/slurmd.pid" || true)" ]; then
  say "ok: slurmd running (pid $(cat "$STATE/slurmd.pid"))"
else
  port_busy "$((PORT + 1))" && die "port $((PORT + 1)) is in use by another process; set SLURM_LOCAL_PORT"
  slurmd -f "$CONF" -N "$NODE"
  say "started slurmd"
fi

# --- 4. wait for the node ---------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) say "node $NODE is $state"; print_env; exit 0 ;;
  esac
  sleep 0.2
done
say "node $NODE not idle after ${TIMEOUT}s (state: '${state:-no answer}'); logs in $STATE/log:"
tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
exit 1
