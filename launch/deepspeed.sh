#!/usr/bin/env bash
# ragdist-train under the DeepSpeed launcher: one rank per GPU (per CPU process on a CPU machine).
# Arguments are ragdist-train's Hydra overrides. Rank 0 prepares data, index and retrieval service;
# every rank trains, then generates its share of the evaluation; rank 0 writes the report.
# Only rank 0 prints; rank N logs to <run dir>/logs/rank-N.log.
#
# One node:
#   launch/deepspeed.sh +experiment=tiny hydra.run.dir=runs/ds-tiny
#   NPROC=8 launch/deepspeed.sh hydra.run.dir=runs/exp1 trainer.zero_stage=3
# Several nodes, started from the first one over ssh (pdsh; passwordless ssh to every host; a shared
# filesystem for the repo, run dir and index; a Ray cluster for the service, RAY_ADDRESS exported —
# see docs/cluster.md). A hostfile line per node: `node1 slots=8`.
#   HOSTFILE=hostfile MASTER_ADDR=node1 launch/deepspeed.sh hydra.run.dir=/shared/runs/exp1 ...
# Several nodes without ssh: the same command on every node, each with its NODE_RANK:
#   HOSTFILE=hostfile MASTER_ADDR=node1 NODE_RANK=0 launch/deepspeed.sh hydra.run.dir=/shared/runs/exp1
#
# Env: NPROC ranks per node (default: the GPU count, or 2 on CPU), MASTER_PORT (default: a free one),
#      HOSTFILE, MASTER_ADDR, NODE_RANK, PYTHON, RUN_DIR (when no hydra.run.dir= is given).
# The command it runs (printed first) is the plain DeepSpeed one:
#   deepspeed --num_gpus N --master_port P --module ragdist.launch.rank <overrides>
set -euo pipefail
LAUNCHER=deepspeed
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RAGDIST_HOME"
with_run_dir "$@"

if [ "$RAGDIST_GPUS" -gt 0 ]; then NPROC=${NPROC:-$RAGDIST_GPUS}; else NPROC=${NPROC:-2}; fi
cmd=("$PYBIN/deepspeed")
if [ -n "${HOSTFILE:-}" ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the first host of $HOSTFILE}"
  addr=$MASTER_ADDR port=${MASTER_PORT:-29500}
  cmd+=(--hostfile "$HOSTFILE" --master_addr "$addr" --master_port "$port")
  # A fixed port: every node must agree on it, and a free port here says nothing about the others.
  if [ -n "${NODE_RANK:-}" ]; then cmd+=(--no_ssh --node_rank "$NODE_RANK"); fi
  cmd+=(--num_gpus "$NPROC")
else
  addr=127.0.0.1 port=${MASTER_PORT:-$(free_port)}
  cmd+=(--num_gpus "$NPROC" --master_addr "$addr" --master_port "$port")
fi
# DeepSpeed appends --local_rank=N to each rank's arguments; ragdist's entry point takes it off
# before Hydra reads the overrides.
cmd+=(--module ragdist.launch.rank "${RUN_ARGS[@]}")
echo "+ ${cmd[*]}" >&2
"${cmd[@]}" &
child=$!
# A batch system's preemption notice reaches this script: pass it on (the ranks checkpoint, exit 75).
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # a trapped signal ended the first wait
# On CPU ranks DeepSpeed's launcher sets LOCAL_SIZE, and DeepSpeed's shared-memory all-reduce then maps a
# buffer per rank under /dev/shm that it never removes (2 x 66 MiB a job). The job is over: this job's
# buffers (named by its uid, master address and port) go.
if [ "$RAGDIST_GPUS" -eq 0 ]; then
  rm -f "/dev/shm/deepspeed_allreduce_buffer_$(id -u)_${addr}_${port}_"* || true
fi
exit "$rc"
