#!/usr/bin/env bash
# A cluster of N hosts on this machine, for multi-host jobs over real TCP (root only).
#
#   eval "$(mpi_jobs/cluster_local.sh up 2)"        # make hosts hvd-h1, hvd-h2; export the launch env
#   mpirun -np 2 --hostfile "$HOSTFILE" hostname    # -> hvd-h1, hvd-h2
#   horovodrun -np 2 -H "$HOSTS" [--gloo|--mpi] python train.py
#   mpi_jobs/cluster_local.sh status | shape --rate 1gbit [--delay 0.5ms] | unshape | down
#   eval "$(mpi_jobs/cluster_slurm.sh up)"          # two-node Slurm on the hosts (see that script)
#
# Host K is a network namespace hvd-hK whose interface `hvd0` (198.18.0.K/24) is a veth into the
# bridge `hvd0` (198.18.0.254/24) in the root namespace, with its own sshd, hostname (UTS
# namespace) and /etc/hosts (a bind mount in a private mount namespace: the machine's /etc/hosts
# is untouched). The bridge has the hosts' interface name on purpose: horovodrun picks the
# rendezvous address of its own namespace by that name. Only 198.18.0.0/24 (RFC 2544's
# benchmarking range) is used, only on interfaces made here; no traffic leaves the machine.
#
# `up` prints export lines on stdout, also kept in STATE/env (all else goes to stderr):
#   HOSTS, HOSTFILE         the hosts for horovodrun -H / mpirun --hostfile
#   PATH                    STATE/bin (an `ssh` that adds `-F STATE/ssh_config`, so horovodrun
#                           reaches the hosts with the cluster key and without writing
#                           ~/.ssh/known_hosts) and the venv's bin first
#   OMPI_MCA_plm_rsh_agent  the same ssh, for mpirun
#   OMPI_MCA_orte_launch_agent  an orted wrapper: remote ranks find the venv first on PATH
#   OMPI_MCA_{btl,oob}_tcp_if_include=198.18.0.0/24   Open MPI uses the hosts' links
#   OMPI_ALLOW_RUN_AS_ROOT{,_CONFIRM}=1, HVDTRAIN_CLUSTER_DIR
# Environment reaches remote ranks by: mpirun's own forwarding (OMPI_* and `-x VAR`);
# horovodrun (--mpi and --gloo both forward its whole environment); and sshd itself: it sets
# PATH to the venv (SetEnv) and accepts HVDTRAIN_*, OMP_NUM_THREADS, THP_MEM_ALLOC_ENABLE,
# which the cluster's ssh sends (AcceptEnv/SendEnv).
#
# Environment: HVDTRAIN_CLUSTER_DIR (state folder, default /tmp/hvdtrain-cluster),
#              HVDTRAIN_VENV (virtualenv whose bin the hosts put on PATH, default <repo>/.venv).
set -Eeuo pipefail  # -E: the ERR trap in `up` also fires inside functions

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
STATE="${HVDTRAIN_CLUSTER_DIR:-/tmp/hvdtrain-cluster}"
VENV="${HVDTRAIN_VENV:-$ROOT/.venv}"
NET=198.18.0 BR=hvd0 MAXN=8
CFG="$STATE/ssh_config"

say() { echo "[cluster_local] $*" >&2; }
die() { echo "cluster_local: $*" >&2; exit 2; }
usage="usage: $0 {up N|status|shape --rate RATE [--delay D]|unshape|down}"

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, a bridge, sshd); run it with sudo"
[ $# -ge 1 ] || die "$usage"
cmd="$1"; shift

# The hosts that exist now, from the namespaces (not the state folder, which may be gone).
hosts() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hvd-h[0-9]+$' | sort -V || true; }
in_ns() { ip netns exec "$1" "${@:2}"; }

# The CPUs host K of N gets: its share of this machine's allowed CPUs (N <= CPUs: a contiguous
# block each; more hosts than CPUs: one CPU each, round robin). Hosts share this machine's cores;
# pinning each host's sshd (so everything launched on the host) to its share keeps hvdtrain's
# threads = cores // ranks-per-host from oversubscribing the real cores. HVDTRAIN_CLUSTER_CPUS=all
# leaves every host all CPUs.
host_cpus() {
  local k=$1 n=$2 part cpus=()
  for part in $(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status | tr ',' ' '); do
    if [[ "$part" == *-* ]]; then cpus+=($(seq "${part%-*}" "${part#*-}")); else cpus+=("$part"); fi
  done
  local c=${#cpus[@]}
  if [ "$n" -le "$c" ]; then
    local lo=$(( (k - 1) * c / n )) hi=$(( k * c / n - 1 ))
    echo "${cpus[*]:$lo:$((hi - lo + 1))}" | tr ' ' ','
  else
    echo "${cpus[$(( (k - 1) % c ))]}"
  fi
}
sshd_pid() { local p; p="$(cat "$STATE/sshd-$1.pid" 2>/dev/null || true)"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; }

up() {
  [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] && [ "$1" -le $MAXN ] || die "up needs a host count 1..$MAXN, got '${1:-}'; e.g. up 2"
  local n="$1" k ns
  if [ -n "$(hosts)" ] || ip link show $BR >/dev/null 2>&1 || [ -e "$STATE" ]; then
    die "a cluster is already up (hosts: $(hosts | tr '\n' ' ')bridge $BR or state folder $STATE exists); run \`$0 down\` first"
  fi
  [ -x "$VENV/bin/python" ] || die "no virtualenv at $VENV (ranks need it); run \`make install\` or set HVDTRAIN_VENV"
  if [ ! -x /usr/sbin/sshd ]; then
    say "installing openssh-server (apt-get)"
    # Debian's postinst would start a machine-wide sshd; policy-rc.d (101) forbids that.
    local policy=0
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null 2>&1; } \
      || { [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d; die "apt-get install openssh-server failed; install it by hand"; }
    [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d
  fi
  # From here on a failure leaves a half-made cluster: take it down again.
  trap 'say "up failed; cleaning up"; down >/dev/null 2>&1 || true; exit 1' ERR
  mkdir -p "$STATE/bin" /run/sshd
  chmod 700 "$STATE"
  ssh-keygen -q -t ed25519 -N '' -C hvdtrain-cluster -f "$STATE/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C hvdtrain-cluster-host -f "$STATE/ssh_host_ed25519_key"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  echo "$n" >"$STATE/n"
  # Client side: our hosts get the cluster key and a private known_hosts; others are unchanged.
  cat >"$CFG" <<EOF
Host $NET.* hvd-h*
  User root
  IdentityFile $STATE/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile $STATE/known_hosts
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
  # A host whose link went down must not hang the launcher: mpirun (and horovodrun) wait on
  # their ssh to each host, which without keepalives waits forever on a silent peer.
  ServerAliveInterval 5
  ServerAliveCountMax 3
  SendEnv HVDTRAIN_* OMP_NUM_THREADS THP_MEM_ALLOC_ENABLE
Host *
  Include ~/.ssh/config
  Include /etc/ssh/ssh_config
EOF
  printf '#!/bin/sh\n# ssh with the hvdtrain local cluster config (cluster_local.sh up)\nexec /usr/bin/ssh -F %q "$@"\n' "$CFG" >"$STATE/bin/ssh"
  # Remote ranks under plain mpirun inherit orted's environment, whose PATH the user's ~/.bashrc
  # may have reordered after sshd's SetEnv: start orted through a wrapper that puts the venv first.
  printf '#!/bin/sh\nPATH=%q:"$PATH"; export PATH\nexec %q "$@"\n' "$VENV/bin" "$(command -v orted || echo /usr/bin/orted)" >"$STATE/bin/orted"
  chmod +x "$STATE/bin/ssh" "$STATE/bin/orted"
  # horovodrun caches its ssh and interface checks in ~/.horovod; remove it on `down` if we caused it.
  [ -e "$HOME/.horovod" ] || touch "$STATE/remove-horovod-cache"
  [ -e "$HOME/.ssh/known_hosts" ] || touch "$STATE/remove-known-hosts"
  { printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s.254 hvd-launcher\n' $NET
    for k in $(seq 1 "$n"); do echo "$NET.$k hvd-h$k"; done; } >"$STATE/hosts"

  ip link add $BR type bridge
  ip addr add $NET.254/24 dev $BR
  ip link set $BR up
  : >"$STATE/hostfile"
  local hosts_list=""
  for k in $(seq 1 "$n"); do
    ns="hvd-h$k"
    ip netns add "$ns"
    # Host end hvd-hK on the bridge; the namespace end is created inside it, already named hvd0.
    ip link add "$ns" type veth peer name hvd0 netns "$ns"
    ip link set "$ns" master $BR up
    in_ns "$ns" ip addr add "$NET.$k/24" dev hvd0
    in_ns "$ns" ip link set hvd0 up
    in_ns "$ns" ip link set lo up
    cat >"$STATE/sshd-$ns.conf" <<EOF
ListenAddress $NET.$k
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd-$ns.pid
AuthorizedKeysFile $STATE/authorized_keys
# root, with the cluster key only (StrictModes off: the state folder sits under world-writable /tmp)
PermitRootLogin prohibit-password
AllowUsers root
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 64
MaxSessions 64
SetEnv PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
AcceptEnv HVDTRAIN_* OMP_NUM_THREADS THP_MEM_ALLOC_ENABLE
EOF
    local pin=""
    [ "${HVDTRAIN_CLUSTER_CPUS:-}" = all ] || pin="taskset -c $(host_cpus "$k" "$n")"
    in_ns "$ns" unshare --uts --mount --propagation private sh -c \
      "mount --bind '$STATE/hosts' /etc/hosts && hostname '$ns' && exec $pin /usr/sbin/sshd -f '$STATE/sshd-$ns.conf'"
    echo "$NET.$k slots=1" >>"$STATE/hostfile"
    hosts_list+="${hosts_list:+,}$NET.$k:1"
  done
  # Wait until every sshd answers with the key (it daemonizes before listening is certain).
  for k in $(seq 1 "$n"); do
    local tries=0
    until "$STATE/bin/ssh" -o BatchMode=yes -o ConnectTimeout=2 "$NET.$k" true 2>/dev/null; do
      tries=$((tries + 1)); [ $tries -lt 50 ] || { say "sshd on hvd-h$k does not answer"; false; }
      sleep 0.2
    done
  done
  trap - ERR
  say "up: $n hosts ($hosts_list), state in $STATE"
  # The same lines stay in STATE/env, for shells that did not eval them (`source STATE/env`).
  { echo "export HOSTS=$hosts_list"
    printf 'export %s=%q\n' HVDTRAIN_CLUSTER_DIR "$STATE" HOSTFILE "$STATE/hostfile" \
      OMPI_MCA_plm_rsh_agent "$STATE/bin/ssh" OMPI_MCA_orte_launch_agent "$STATE/bin/orted" \
      OMPI_MCA_btl_tcp_if_include $NET.0/24 \
      OMPI_MCA_oob_tcp_if_include $NET.0/24 OMPI_ALLOW_RUN_AS_ROOT 1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM 1
    printf 'export PATH=%q:%q:"$PATH"\n' "$STATE/bin" "$VENV/bin"; } >"$STATE/env"
  cat "$STATE/env"
}

status() {
  local ns k pid
  [ -n "$(hosts)" ] || { echo "no cluster is up"; return 0; }
  printf '%-8s %-14s %-12s %14s %14s %s\n' host address sshd rx_bytes tx_bytes qdisc
  for ns in $(hosts); do
    k="${ns#hvd-h}"
    pid="$(sshd_pid "$ns" || true)"
    printf '%-8s %-14s %-12s %14s %14s %s\n' "$ns" "$NET.$k" "${pid:+pid }${pid:-DOWN}" \
      "$(in_ns "$ns" cat /sys/class/net/hvd0/statistics/rx_bytes)" \
      "$(in_ns "$ns" cat /sys/class/net/hvd0/statistics/tx_bytes)" \
      "$(in_ns "$ns" tc qdisc show dev hvd0 | awk 'NR==1{print $2}')"
  done
}

shape() {
  local rate="" delay="" ns
  while [ $# -gt 0 ]; do
    case "$1" in
      --rate) rate="${2:-}"; shift 2 || die "--rate needs a value, e.g. --rate 1gbit" ;;
      --delay) delay="${2:-}"; shift 2 || die "--delay needs a value, e.g. --delay 0.5ms" ;;
      *) die "shape: unknown argument '$1'; $usage" ;;
    esac
  done
  rate="${rate,,}"  # tc takes 1Gbit as 1gbit
  [[ "$rate" =~ ^[0-9]+(\.[0-9]+)?([kmgt]?bit|[kmgt]?bps)$ ]] || die "shape --rate '$rate' is not a tc rate; use e.g. --rate 1gbit, 10gbit, 500mbit"
  [ -z "$delay" ] || [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die "shape --delay '$delay' is not a tc time; use e.g. --delay 0.5ms"
  [ -n "$(hosts)" ] || die "no cluster is up; run \`$0 up N\` first"
  local delay_ok=1
  for ns in $(hosts); do
    # Each host's egress: every packet between two hosts crosses exactly one shaped queue.
    in_ns "$ns" tc qdisc del dev hvd0 root 2>/dev/null || true
    in_ns "$ns" tc qdisc add dev hvd0 root handle 1: htb default 10
    # quantum: only one class, so its size does not matter; set it to silence the "big quantum" warning
    in_ns "$ns" tc class add dev hvd0 parent 1: classid 1:10 htb rate "$rate" ceil "$rate" quantum 60000
    if [ -n "$delay" ] && ! in_ns "$ns" tc qdisc add dev hvd0 parent 1:10 handle 10: netem delay "$delay" 2>/dev/null; then
      delay_ok=0
    fi
  done
  [ $delay_ok = 1 ] || say "note: delay emulation is unavailable here (tc netem failed: no sch_netem); applied the rate only"
  say "shaped $(hosts | wc -l) hosts: rate $rate${delay:+, delay $delay}"
}

unshape() {
  local ns
  for ns in $(hosts); do in_ns "$ns" tc qdisc del dev hvd0 root 2>/dev/null || true; done
  say "unshaped"
}

# Remove known_hosts entries for our hosts that an ssh without the cluster's config wrote.
forget_hosts() {
  local kh="$HOME/.ssh/known_hosts" k h old
  [ -f "$kh" ] || return 0
  old=0; [ -e "$kh.old" ] && old=1
  for k in $(seq 1 $MAXN); do
    for h in "$NET.$k" "hvd-h$k"; do
      if ssh-keygen -F "$h" -f "$kh" >/dev/null 2>&1; then ssh-keygen -R "$h" -f "$kh" >/dev/null 2>&1 || true; fi
    done
  done
  [ $old = 1 ] || rm -f "$kh.old"  # ssh-keygen -R leaves a backup; keep only one the user had
  # An ssh outside the cluster's config created it for our hosts alone: remove it when empty.
  if [ -e "$STATE/remove-known-hosts" ] && [ ! -s "$kh" ]; then rm -f "$kh"; fi
}

# The state folder of the cluster whose hosts exist now, read from their sshd's command line.
owner() {
  local ns pid
  for ns in $(hosts); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      { tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline"; echo; } | sed -n 's|.*sshd -f \(/.*\)/sshd-hvd-h[0-9]*\.conf.*|\1|p' || true
    done
  done | sort -u | head -n 1
}

down() {
  local ns pid f other
  # The host names are machine-wide: never take down a live cluster another state folder (another
  # shell or test session) made. Hosts whose state folder is gone are orphans: removed below.
  other="$(owner)"
  if [ -n "$other" ] && [ "$(readlink -m "$other")" != "$(readlink -m "$STATE")" ] && [ -d "$other" ]; then
    die "the hosts up now belong to the cluster in $other, not $STATE; run \`HVDTRAIN_CLUSTER_DIR=$other $0 down\`"
  fi
  # Slurm on the hosts (cluster_slurm.sh up): its slurmctld lives outside the hosts' namespaces.
  [ ! -d "$STATE/slurm" ] || HVDTRAIN_CLUSTER_DIR="$STATE" bash "$ROOT/mpi_jobs/cluster_slurm.sh" down || true
  for f in "$STATE"/sshd-*.pid; do
    [ -e "$f" ] || continue
    # Only if that pid still is our sshd (a stale pid file may name another process by now).
    pid="$(cat "$f")"
    if grep -qsF "$STATE/sshd-" "/proc/$pid/cmdline"; then kill "$pid" 2>/dev/null || true; fi
  done
  for ns in $(hosts); do
    # Anything still running in the namespace (sshd sessions, orphaned ranks) goes with it.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip link del "$ns" 2>/dev/null || true
    ip netns del "$ns"
  done
  ip link del $BR 2>/dev/null || true
  forget_hosts
  [ ! -e "$STATE/remove-horovod-cache" ] || rm -rf "$HOME/.horovod"
  rm -rf "$STATE"
  say "down: no cluster hosts remain"
}

case "$cmd" in
  up) [ $# -eq 1 ] || die "up takes one argument, the host count; e.g. up 2"; up "$1" ;;
  status) status ;;
  shape) shape "$@" ;;
  unshape) unshape ;;
  down) down ;;
  *) die "unknown command '$cmd'; $usage" ;;
esac
