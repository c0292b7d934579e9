#!/usr/bin/env bash
# ragdist-train as a Ray job: the job's driver prepares data and index, starts the retrieval service
# on the cluster, trains on Ray Train workers (one per rank), evaluates and writes the report.
# Arguments: ragdist.launch.ray_job's flags (--workers N, --cpus-per-worker C, --gpus-per-worker G),
# then ragdist-train's Hydra overrides. hydra.run.dir and index.root: absolute, on shared storage.
#
#   RAY_DASHBOARD_ADDRESS=http://head:8265 launch/ray_submit.sh --workers 8 --gpus-per-worker 1 \
#       hydra.run.dir=/shared/runs/exp1 index.root=/shared/indexes trainer.zero_stage=3
#   NO_WAIT=1 launch/ray_submit.sh ...        # return at once; then `ray job status|logs|stop ID`
#
# To try it on this machine, with a head of its own on loopback (stopped by PID, not `ray stop`):
#   eval "$(.venv/bin/python -m ragdist.launch.ray_head start --temp-dir /tmp/rh-demo --num-cpus 2)"
#   launch/ray_submit.sh --cpus-per-worker 0.5 +experiment=tiny hydra.run.dir=$PWD/runs/ray-tiny
#   .venv/bin/python -m ragdist.launch.ray_head stop --temp-dir /tmp/rh-demo
#
# Env: RAY_DASHBOARD_ADDRESS (the head's dashboard, as printed by ray_head start), SUBMISSION_ID
#      (default ragdist-<date>), NO_WAIT, PYTHON. The job runs `python` from the head's PATH.
set -euo pipefail
LAUNCHER=ray
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RAGDIST_HOME"
: "${RAY_DASHBOARD_ADDRESS:?set RAY_DASHBOARD_ADDRESS=http://<head>:<dashboard port>}"
SUBMISSION_ID=${SUBMISSION_ID:-ragdist-$(date +%Y%m%d-%H%M%S)}

cmd=("$PYBIN/ray" job submit --address "$RAY_DASHBOARD_ADDRESS" --submission-id "$SUBMISSION_ID"
  --working-dir "$RAGDIST_HOME")
[ -n "${NO_WAIT:-}" ] && cmd+=(--no-wait)
cmd+=(-- python -m ragdist.launch.ray_job "$@")
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"
echo "status: $PYBIN/ray job status --address $RAY_DASHBOARD_ADDRESS $SUBMISSION_ID" >&2
echo "logs:   $PYBIN/ray job logs --address $RAY_DASHBOARD_ADDRESS $SUBMISSION_ID" >&2
