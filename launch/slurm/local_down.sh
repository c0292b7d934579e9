#!/usr/bin/env bash
# Stop the one-node cluster that local_up.sh started: cancel its jobs, then stop slurmd, slurmctld
# and munged, each by the PID in its own pid file (never by name). Safe to run when it is down.
#
#   launch/slurm/local_down.sh                    # RAGDIST_SLURM_PREFIX as for local_up.sh
#   RAGDIST_SLURM_WIPE=1 launch/slurm/local_down.sh   # also delete the prefix (state, logs, key)
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
PREFIX=${RAGDIST_SLURM_PREFIX:-/tmp/ragdist-slurm}
PIDS=$PREFIX/run
export SLURM_CONF=$PREFIX/etc/slurm.conf

say() { printf '[local_down %s] %s\n' "$(date +%T)" "$*" >&2; }
running() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] &&
    ! grep -qs '^State:.*Z' "/proc/$pid/status"
}
halt() {
  if ! running "$1"; then return 0; fi
  local pid i
  pid=$(cat "$PIDS/$1.pid")
  say "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 100); do running "$1" || return 0; sleep 0.1; done
  say "$1 (pid $pid) still up after 10 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null
}

# Jobs first, while the controller can still tell their steps to stop.
if running slurmctld && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
halt slurmd
halt slurmctld
halt munged
if [ "${RAGDIST_SLURM_WIPE:-0}" = 1 ]; then
  say "removing $PREFIX"
  rm -rf -- "$PREFIX"
fi
exit 0
