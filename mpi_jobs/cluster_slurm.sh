#!/usr/bin/env bash
# Slurm on the local cluster's hosts (root): one slurmd per host namespace, slurmctld beside them.
#
#   eval "$(mpi_jobs/cluster_local.sh up 2)"      # hosts hvd-h1, hvd-h2 first
#   eval "$(mpi_jobs/cluster_slurm.sh up)"        # exports SLURM_CONF
#   sbatch --nodes=2 --ntasks-per-node=1 slurm/train_cpu.sbatch   # one rank on each host (srun --mpi=pmix)
#   mpi_jobs/cluster_slurm.sh status | down       # `cluster_local.sh down` also runs `down`
#
# Nodes are NodeName=hvd-hK NodeAddr=198.18.0.K. Each slurmd runs in its host's network
# namespace with that host's hostname and /etc/hosts, entered with `nsenter --net` rather than
# `ip netns exec` (which remounts /sys and hides the cgroup mounts slurmd needs). slurmctld runs
# in the root namespace under the hostname of SlurmctldHost (hvd-launcher, 198.18.0.254, the
# bridge), which it must have to start. Spool, pid, log and TmpFS are per node (%n): srun
# --mpi=pmix puts its PMIx directories in TmpFS, and two nodes sharing /tmp collide there.
# Everything lives in STATE/slurm, STATE being the cluster's state folder, removed by `down`.
# Jobs run as root, with no authentication (auth/none) and no cgroups: a test cluster.
#
# Environment: HVDTRAIN_CLUSTER_DIR (the cluster's state folder, default /tmp/hvdtrain-cluster),
#   HVDTRAIN_CLUSTER_SLURM_PORT   slurmctld port; each slurmd uses PORT+1 (default 6827)
#   HVDTRAIN_CLUSTER_SLURM_CPUS   CPUs each node advertises                 (default 2)
#   HVDTRAIN_CLUSTER_SLURM_TIMEOUT seconds to wait for the nodes on `up`, and for the daemons
#                                  to exit on `down` before SIGKILL         (default 30)
set -euo pipefail

STATE="${HVDTRAIN_CLUSTER_DIR:-/tmp/hvdtrain-cluster}"
SL="$STATE/slurm"
CONF="$SL/slurm.conf"
PORT="${HVDTRAIN_CLUSTER_SLURM_PORT:-6827}"
CPUS="${HVDTRAIN_CLUSTER_SLURM_CPUS:-2}"
TIMEOUT="${HVDTRAIN_CLUSTER_SLURM_TIMEOUT:-30}"
NET=198.18.0 CTLD=hvd-launcher

say() { echo "[cluster_slurm] $*" >&2; }
die() { echo "cluster_slurm: $*" >&2; exit 2; }
usage="usage: $0 {up|status|down}"

[ "$(id -u)" = 0 ] || die "needs root (slurmd and slurmctld run as root in the cluster's namespaces); run it with sudo"
[ $# -eq 1 ] || die "$usage"
cmd="$1"
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1024 ] && [ "$PORT" -le 65534 ] \
  || die "HVDTRAIN_CLUSTER_SLURM_PORT='$PORT' is not a port in 1024..65534 (slurmd takes PORT+1)"

hosts() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hvd-h[0-9]+$' | sort -V || true; }
# The pid in pid file $1 if that process is alive and still a Slurm daemon (pid files go stale).
daemon_pid() {
  local p; p="$(cat "$1" 2>/dev/null || true)"
  [ -n "$p" ] && grep -qs slurm "/proc/$p/comm" && echo "$p"
}
# Processes named slurmstepd (job steps) in the cluster's host namespaces.
stepds() {
  local ns p
  for ns in $(hosts); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do grep -qsx slurmstepd "/proc/$p/comm" && echo "$p"; done
  done
  return 0
}

# Pid $1 and all its descendants.
tree() {
  local c; echo "$1"
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$c"; done
}

up() {
  [ -n "$(hosts)" ] && [ -f "$STATE/n" ] || die "no local cluster in $STATE; run \`eval \"\$(mpi_jobs/cluster_local.sh up 2)\"\` first (or set HVDTRAIN_CLUSTER_DIR)"
  [ ! -e "$SL" ] || die "Slurm is already up on the cluster ($SL exists); run \`$0 down\` first"
  local n k ns need=()
  n="$(cat "$STATE/n")"
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  ls /usr/lib/*/slurm-wlm/mpi_pmix.so >/dev/null 2>&1 || need+=(slurm-wlm-basic-plugins libpmix2)
  if ((${#need[@]})); then
    say "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; } \
      || die "apt-get install ${need[*]} failed; install them by hand"
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && die "port $PORT is in use (another Slurm?); set HVDTRAIN_CLUSTER_SLURM_PORT"
  trap 'say "up failed; logs in $SL/log (removed by down):"; tail -n 15 "$SL"/log/*.log >&2 2>/dev/null || true; down >/dev/null 2>&1 || true; exit 1' ERR
  mkdir -p "$SL/ctld" "$SL/log"
  for k in $(seq 1 "$n"); do mkdir -p "$SL/spool-hvd-h$k" "$SL/tmp-hvd-h$k"; done
  # The nodes share this machine's memory: each advertises its share.
  local mem; mem="$(awk -v n="$n" '/^MemTotal:/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)"
  cat >"$CONF" <<EOF
# Written by mpi_jobs/cluster_slurm.sh: Slurm on the local cluster's $n namespace hosts.
ClusterName=hvdcluster
SlurmctldHost=$CTLD($NET.254)
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
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
KillWait=10
MinJobAge=5
InactiveLimit=0
StateSaveLocation=$SL/ctld
SlurmctldPidFile=$SL/slurmctld.pid
SlurmctldLogFile=$SL/log/slurmctld.log
# Per node (%n): two slurmds on one machine must not share spool, pid, log or TmpFS.
SlurmdSpoolDir=$SL/spool-%n
SlurmdPidFile=$SL/slurmd-%n.pid
SlurmdLogFile=$SL/log/slurmd-%n.log
TmpFS=$SL/tmp-%n
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
EOF
  for k in $(seq 1 "$n"); do
    echo "NodeName=hvd-h$k NodeAddr=$NET.$k CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=cluster Nodes=hvd-h[1-$n] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"

  unshare --uts sh -c "hostname $CTLD && exec slurmctld -f '$CONF'"
  for k in $(seq 1 "$n"); do
    ns="hvd-h$k"
    # The host's network; its own hostname and /etc/hosts (as its sshd has), so jobs see them too.
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
      "mount --bind '$STATE/hosts' /etc/hosts && hostname '$ns' && exec slurmd -f '$CONF' -N '$ns'"
  done
  export SLURM_CONF="$CONF"
  local deadline=$((SECONDS + TIMEOUT)) states=""
  while :; do
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    [ "$(grep -oE '\b(idle|mixed|allocated)\b' <<<"$states" | wc -l)" = "$n" ] && break
    [ $SECONDS -lt $deadline ] || { say "nodes not idle after ${TIMEOUT}s: ${states:-no answer}"; false; }
    sleep 0.2
  done
  trap - ERR
  say "up: slurmctld ($CTLD, $NET.254:$PORT) and $n slurmds (${states% }); state in $SL"
  printf 'export SLURM_CONF=%q\n' "$CONF" | tee "$SL/env"
}

status() {
  local f name pid
  [ -f "$CONF" ] || { echo "Slurm is not up on the cluster ($CONF missing)"; return 1; }
  for f in "$SL"/slurmctld.pid "$SL"/slurmd-*.pid; do
    [ -e "$f" ] || continue
    name="$(basename "$f" .pid)"; pid="$(daemon_pid "$f" || true)"
    if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
  done
  SLURM_CONF="$CONF" sinfo -N -o '%N %T %c' || true
}

# Stop the daemons: TERM, wait, then KILL; then any job step left in the hosts.
down() {
  local f pid pids=() waited
  # Nothing of ours to stop (and the hosts' job steps may belong to another state folder's Slurm).
  [ -d "$SL" ] || { say "down: Slurm is not up on the cluster in $STATE"; return 0; }
  if [ -f "$CONF" ] && [ -n "$(daemon_pid "$SL/slurmctld.pid" || true)" ]; then
    SLURM_CONF="$CONF" timeout 10 scancel --user=root >/dev/null 2>&1 || true
  fi
  for f in "$SL"/slurmd-*.pid "$SL"/slurmctld.pid; do
    [ -e "$f" ] || continue
    pid="$(daemon_pid "$f" || true)"
    [ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); }
  done
  waited=0
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt $((TIMEOUT * 10)) ]; do sleep 0.1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid ignored SIGTERM for ${TIMEOUT}s; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  # slurmstepd (and the job's processes under it) outlive slurmd; none may outlive the cluster.
  for pid in $(stepds); do tree "$pid"; done | xargs -r kill -KILL 2>/dev/null || true
  rm -rf "$SL"
  say "down: no Slurm daemon of the cluster remains"
}

case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) die "unknown command '$cmd'; $usage" ;;
esac
