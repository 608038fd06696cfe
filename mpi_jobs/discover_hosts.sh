#!/usr/bin/env bash
# Host discovery for Horovod elastic jobs (horovodrun --host-discovery-script): prints the lines
# of a hosts file, one HOST:SLOTS (or HOST) per line. Edit the file while the job runs to remove or
# add hosts: horovodrun runs this script every second and resizes the job to what it prints.
#
#   printf '198.18.0.1:1\n198.18.0.2:1\n198.18.0.3:1\n' > hosts.txt
#   HVDTRAIN_DISCOVERY_FILE=$PWD/hosts.txt horovodrun --gloo -np 3 --min-np 2 --max-np 3 \
#     --host-discovery-script mpi_jobs/discover_hosts.sh \
#     python -m hvdtrain train --backend horovod --elastic --elastic-commit-every 10
#
# The file is the first argument, else $HVDTRAIN_DISCOVERY_FILE. Blank lines and # comments are
# skipped; a missing file or a malformed line is one line on stderr and exit 2 (horovodrun then
# keeps the hosts it knew). Replace the file atomically (write a temporary file, then `mv`) so
# horovodrun never reads half of it.
set -euo pipefail

die() { echo "discover_hosts: $*" >&2; exit 2; }
file="${1:-${HVDTRAIN_DISCOVERY_FILE:-}}"
[ -n "$file" ] || die "no hosts file; pass its path or set HVDTRAIN_DISCOVERY_FILE"
[ -f "$file" ] || die "hosts file '$file' does not exist; write one HOST:SLOTS per line"
hosts=()
while IFS= read -r line || [ -n "$line" ]; do
  line="${line%%#*}"
  line="${line//[[:space:]]/}"
  [ -n "$line" ] || continue
  [[ "$line" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(:[1-9][0-9]*)?$ ]] \
    || die "line '$line' of '$file' is not HOST or HOST:SLOTS; e.g. 198.18.0.1:1"
  hosts+=("$line")
done <"$file"
[ ${#hosts[@]} -eq 0 ] || printf '%s\n' "${hosts[@]}"  # all or nothing: no half list on a bad line
