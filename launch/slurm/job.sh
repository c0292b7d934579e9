# The body of ragdist's SLURM batch scripts: cpu.sbatch and gpu.sbatch set the resources and source
# this file with the Hydra overrides as arguments. Not a script of its own.
#
# What one job does, on every start (the first and each requeue):
#  1. a Ray head on the first node of the allocation (this one) and a Ray worker on each other node:
#     the retrieval service's shard actors run there;
#  2. one training rank per SLURM task (`srun` → python -m ragdist.launch.rank), with RANK /
#     WORLD_SIZE / LOCAL_RANK from SLURM and MASTER_ADDR / MASTER_PORT from the first node; rank 0
#     prepares data, index and service, all ranks train and generate their share of the
#     evaluation, rank 0 writes the report;
#  3. preemption: SIGUSR1 (`--signal=USR1@120`, or `scancel --signal=USR1 JOB`) reaches the ranks,
#     which checkpoint and exit with status 75; the job then stops its Ray processes and runs
#     `scontrol requeue`. The requeued job has the same id, hence the same run directory, and
#     `trainer.resume=auto` resumes from the newest checkpoint there.
#
# Env: RAGDIST_HOME (repo; default: the directory sbatch ran in), PYTHON, RAGDIST_RUN_DIR
#      (default runs/slurm-<job id>), RAGDIST_RAY_TMP (default /tmp/rdr-<job id>),
#      RAGDIST_RAY_CPUS (logical CPUs the Ray head offers; default: the node's),
#      RAGDIST_RAY_GPUS (GPUs each Ray node offers for shard actors: a number, or `auto` = the
#      allocation's GPUs on that node, counted there; default 0, gpu.sbatch sets auto).
set -euo pipefail

# What ragdist/train/preempt.py's REQUEUE_EXIT_CODE says a preempted trainer exits with (EX_TEMPFAIL).
REQUEUE_EXIT_CODE=75

RAGDIST_HOME=${RAGDIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
source "$RAGDIST_HOME/launch/common.sh"
cd "$RAGDIST_HOME"

RUN_DIR=${RAGDIST_RUN_DIR:-$RAGDIST_HOME/runs/slurm-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR/logs"
# Written by a rank that checkpointed and left for a requeue (ragdist/launch/rank.py): srun's one
# exit status cannot say so once --kill-on-bad-exit has SIGTERMed the other ranks.
PREEMPTED=$RUN_DIR/logs/preempted
rm -f "$PREEMPTED"
exec > >(tee -a "$RUN_DIR/logs/job.out") 2>&1
say() { echo "[ragdist $(date +%T)] $*"; }
say "job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))) on $SLURM_JOB_NODELIST:" \
  "$SLURM_NTASKS ranks, run dir $RUN_DIR"

# A mistyped override fails here, before any rank starts, not in every rank; the check runs while
# the Ray head comes up.
"$PYTHON" -m ragdist.launch.rank --check "$@" &
CHECK_PID=$!

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_ADDR=$(scontrol show node "$HEAD" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
HEAD_IP=$(getent ahostsv4 "${HEAD_ADDR:-$HEAD}" | awk 'NR==1 {print $1}')
export MASTER_ADDR=$HEAD_IP
export MASTER_PORT=${MASTER_PORT:-$(free_port "$HEAD_IP")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

RAY_TMP=${RAGDIST_RAY_TMP:-/tmp/rdr-$SLURM_JOB_ID}
RAY_GPUS=${RAGDIST_RAY_GPUS:-0}
WORKERS_PID=
TRAIN_PID=
stop_ray() {
  [ -n "${RAY_TMP:-}" ] || return 0
  if [ -n "$WORKERS_PID" ]; then
    # each worker node's processes, by PID, on that node
    srun --overlap --nodes=$((${#NODES[@]} - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
      "$PYTHON" -m ragdist.launch.ray_head stop --temp-dir "$RAY_TMP" || true
    kill "$WORKERS_PID" 2>/dev/null || true
  fi
  "$PYTHON" -m ragdist.launch.ray_head stop --temp-dir "$RAY_TMP" || true
  RAY_TMP=
}
on_term() {
  # scancel or the time limit: the ranks checkpoint on SIGTERM at their next step boundary, which
  # needs the retrieval service; Ray goes only once they are done (SLURM's KillWait bounds this).
  say "SIGTERM: stopping the ranks, then Ray"
  if [ -n "$TRAIN_PID" ]; then
    kill -TERM "$TRAIN_PID" 2>/dev/null
    wait "$TRAIN_PID" 2>/dev/null
  fi
  stop_ray
  exit 143
}
trap stop_ray EXIT
trap on_term TERM

ray_env=$("$PYTHON" -m ragdist.launch.ray_head start --temp-dir "$RAY_TMP" --host "$HEAD_IP" \
  --num-cpus "${RAGDIST_RAY_CPUS:-${SLURM_CPUS_ON_NODE:-2}}" --num-gpus "$(ray_gpus "$RAY_GPUS")" \
  --no-dashboard) || { say "the Ray head did not start"; exit 1; }
eval "$ray_env"
say "Ray head $RAY_ADDRESS ($(ray_gpus "$RAY_GPUS") GPUs for shard actors)"
wait "$CHECK_PID" || { say "bad overrides: not starting the ranks"; exit 2; }
if [ "${#NODES[@]}" -gt 1 ]; then
  # Each worker counts its own node's GPUs (an allocation need not give every node the same number).
  srun --overlap --nodes=$((${#NODES[@]} - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
    bash -c 'PYTHON=$2 && source "$1/launch/common.sh" && exec "$PYTHON" -m ragdist.launch.ray_head \
      worker --address "$3" --host auto --temp-dir "$4" --num-gpus "$(ray_gpus "$5")" --block' \
    ray-worker "$RAGDIST_HOME" "$PYTHON" "$RAY_ADDRESS" "$RAY_TMP" "$RAY_GPUS" &
  WORKERS_PID=$!
  "$PYTHON" -m ragdist.launch.ray_head wait --address "$RAY_ADDRESS" --nodes "${#NODES[@]}" --timeout 300
fi

ARGS=("hydra.run.dir=$RUN_DIR")
case " $* " in *" trainer.resume="*) ;; *) ARGS+=("trainer.resume=auto") ;; esac
ARGS+=("$@")

set +e
srun --overlap --kill-on-bad-exit=1 "$PYTHON" -m ragdist.launch.rank "${ARGS[@]}" &
TRAIN_PID=$!
# `--signal=B:USR1@...` warns only this shell: pass the warning on to the ranks (srun relays it).
trap 'say "SIGUSR1: asking the ranks to checkpoint"; kill -USR1 "$TRAIN_PID" 2>/dev/null' USR1
while :; do
  wait "$TRAIN_PID"
  rc=$?
  kill -0 "$TRAIN_PID" 2>/dev/null || break
done
set -e
trap - USR1

if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] || { [ "$rc" -ne 0 ] && [ -f "$PREEMPTED" ]; }; then
  say "preempted after a checkpoint: requeueing job $SLURM_JOB_ID"
  stop_ray
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
say "training finished with status $rc"
exit "$rc"
