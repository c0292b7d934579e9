#!/usr/bin/env bash
# ragdist-train under torchrun: one rank per GPU (per CPU process on a CPU machine).
# Arguments are ragdist-train's Hydra overrides. Rank 0 prepares data, index and retrieval service;
# every rank trains, then generates its share of the evaluation; rank 0 writes the report. Only rank 0 prints; rank N logs to <run dir>/logs/rank-N.log.
#
# One node:
#   launch/torchrun.sh +experiment=tiny hydra.run.dir=runs/tr-tiny
#   NPROC=8 launch/torchrun.sh hydra.run.dir=runs/exp1 trainer.engine=fsdp
# Several nodes: the same command on every node, each with its NODE_RANK (a shared filesystem for
# the run dir and index; a Ray cluster for the service, RAY_ADDRESS exported — see docs/cluster.md):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node1 MASTER_PORT=29500 launch/torchrun.sh hydra.run.dir=/shared/runs/exp1
#
# Env: NPROC ranks per node (default: the GPU count, or 2 on CPU), NNODES (1), NODE_RANK (0),
#      MASTER_ADDR (127.0.0.1), MASTER_PORT (a free one on one node; set it on several), PYTHON, RUN_DIR.
# The command it runs (printed first) is the plain torchrun one:
#   torchrun --nnodes 1 --nproc_per_node N --master_addr A --master_port P -m ragdist.launch.rank <overrides>
set -euo pipefail
LAUNCHER=torchrun
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RAGDIST_HOME"
with_run_dir "$@"

if [ "$RAGDIST_GPUS" -gt 0 ]; then NPROC=${NPROC:-$RAGDIST_GPUS}; else NPROC=${NPROC:-2}; fi
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
  : "${MASTER_PORT:?set MASTER_PORT (the same on every node)}"
fi
cmd=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-$(free_port)}"
  -m ragdist.launch.rank "${RUN_ARGS[@]}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
