#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (munged + slurmctld + slurmd, no systemd), for
# trying the batch scripts and for the test suite. Safe to run again while it is up. Run as root.
#
#   launch/slurm/local_up.sh && source /tmp/ragdist-slurm/env.sh
#   sbatch --ntasks 2 launch/slurm/cpu.sbatch +experiment=tiny
#   launch/slurm/local_down.sh
#
# Env (all optional):
#   RAGDIST_SLURM_PREFIX   config, state, logs and pid files          [/tmp/ragdist-slurm]
#   RAGDIST_SLURM_CPUS     CPUs the node advertises                   [the machine's]
#   RAGDIST_SLURM_PORTS    "slurmctld_port slurmd_port"                [6817 6818]
#   RAGDIST_SLURM_INSTALL  0 = never apt-get the packages              [1]
#   RAGDIST_SLURM_CRED_EXPIRE  seconds a requeued job waits to restart  [20]
# Exit status: 0 up; 3 the packages are missing and cannot be installed here (not root, no apt);
# 1 anything else (the daemons' log tails are printed).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

PREFIX=${RAGDIST_SLURM_PREFIX:-/tmp/ragdist-slurm}
read -r CTLD_PORT SLURMD_PORT <<<"${RAGDIST_SLURM_PORTS:-6817 6818}"
CONF=$PREFIX/etc/slurm.conf
MUNGE_SOCKET=$PREFIX/munge-socket/munge.sock
MUNGE_KEY=$PREFIX/munge/munge.key
PIDS=$PREFIX/run

say() { printf '[local_up %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() {
  say "failed: $*"
  local f
  for f in "$PREFIX"/log/*.log; do
    [ -f "$f" ] && { printf -- '--- %s (last 15 lines)\n' "$f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
# running NAME: true when $PIDS/NAME.pid names a live process whose command is NAME
running() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] &&
    ! grep -qs '^State:.*Z' "/proc/$pid/status"
}
halt() { # halt NAME: TERM, then KILL after 10 s; by the PID in its pid file only
  running "$1" || return 0
  local pid i
  pid=$(cat "$PIDS/$1.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do running "$1" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
munge_answers() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }
wait_for() { # wait_for SECONDS CMD...: poll every 0.2 s
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ "$SECONDS" -ge "$deadline" ] && return 1; sleep 0.2; done
}

# 1. packages
missing=()
for bin in munged slurmctld slurmd sbatch scontrol; do command -v "$bin" >/dev/null || missing+=("$bin"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${RAGDIST_SLURM_INSTALL:-1}" = 0 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing ${missing[*]}; installing needs root and apt-get (RAGDIST_SLURM_INSTALL=${RAGDIST_SLURM_INSTALL:-1})"
    exit 3
  fi
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
    >"${TMPDIR:-/tmp}/ragdist-slurm-apt.log" 2>&1 || { say "apt-get failed: see ${TMPDIR:-/tmp}/ragdist-slurm-apt.log"; exit 3; }
fi
[ "$(id -u)" = 0 ] || { say "the daemons run as root here; run this as root"; exit 3; }

# 2. configuration (rewritten only when it changes; a change restarts the SLURM daemons)
NODE=$(hostname -s)
getent hosts "$NODE" >/dev/null 2>&1 || NODE=localhost
HW=$(slurmd -C | head -n 1)
hw() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS=${RAGDIST_SLURM_CPUS:-$(hw CPUs)}
MEM=$(( $(hw RealMemory) * 8 / 10 ))
mkdir -p "$PREFIX"/{etc,state,spool,log,run,munge,munge-socket}
# munged wants its key private and the directory of its socket open to every user
chmod 755 "$PREFIX" "$PREFIX/munge-socket"
chmod 700 "$PREFIX/munge"
WANT=$(cat <<EOF
# written by launch/slurm/local_up.sh
ClusterName=ragdist
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=${RAGDIST_SLURM_CRED_EXPIRE:-20}
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd.log
MailProg=/bin/true
# no cgroups or systemd in containers: track job processes by parent PID, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default memory per CPU each job claims the whole node and jobs run one at a time
DefMemPerCPU=$((MEM / CPUS))
# start a submitted job at once, and a requeued one soon after it becomes eligible (the scheduler's
# passes default to every 30-60 s)
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
# refuse a job that can never fit rather than leave it pending forever
EnforcePartLimits=ALL
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT" ]; then
  if running slurmd || running slurmctld; then say "configuration changed: restarting"; fi
  halt slurmd
  halt slurmctld
  printf '%s\n' "$WANT" >"$CONF"
fi
export SLURM_CONF=$CONF
printf 'export SLURM_CONF=%s\n' "$CONF" >"$PREFIX/env.sh"

# 3. munge, with its own key and socket (never the system's)
if [ ! -s "$MUNGE_KEY" ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile="$MUNGE_KEY" --force
  else head -c 1024 /dev/urandom >"$MUNGE_KEY"; fi
  chmod 600 "$MUNGE_KEY"
fi
if ! { running munged && munge_answers; }; then
  halt munged
  munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$PIDS/munged.pid" \
    --log-file="$PREFIX/log/munged.log" --seed-file="$PREFIX/munge/seed" || fail "munged did not start"
  wait_for 10 munge_answers || fail "munged does not answer on $MUNGE_SOCKET"
  say "munged up (pid $(cat "$PIDS/munged.pid"))"
fi

# 4. controller, then the node daemon (both daemonize and write their pid files)
if ! running slurmctld; then
  slurmctld -f "$CONF" -i >>"$PREFIX/log/slurmctld.stdout.log" 2>&1 || fail "slurmctld did not start"
fi
wait_for 60 bash -c 'scontrol ping 2>/dev/null | grep -q UP' || fail "slurmctld does not answer"
if ! running slurmd; then
  slurmd -f "$CONF" -N "$NODE" >>"$PREFIX/log/slurmd.stdout.log" 2>&1 || fail "slurmd did not start"
fi
node_ready() { case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" in idle*|mixed*|allocated*|completing*) return 0 ;; esac; return 1; }
wait_for 60 node_ready || fail "node $NODE is not ready: $(sinfo -h -n "$NODE" -o '%T %E' 2>&1)"
say "up: node $NODE ($CPUS CPUs, ${MEM} MB), slurmctld pid $(cat "$PIDS/slurmctld.pid"), slurmd pid $(cat "$PIDS/slurmd.pid")"
say "use it with: source $PREFIX/env.sh"
