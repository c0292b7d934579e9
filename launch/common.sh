# Shared by the launch scripts (sourced, not run): the repo root, the interpreter, a free port,
# and the run directory every rank must agree on.
#   RAGDIST_HOME  repo root (default: the parent of this launch/ folder)
#   PYTHON        interpreter with ragdist installed (default: $RAGDIST_HOME/.venv/bin/python)
#   RUN_DIR       run directory when the overrides carry no hydra.run.dir=
RAGDIST_HOME=${RAGDIST_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$RAGDIST_HOME/.venv/bin/python" ]; then PYTHON=$RAGDIST_HOME/.venv/bin/python; else PYTHON=python3; fi
fi
PYBIN=$(dirname "$(command -v "$PYTHON")")
# The venv's tools first, for every rank: with another `ninja` earlier on the PATH, DeepSpeed's
# JIT-built C++ ops are rebuilt (a minute each) whenever the two alternate.
export PATH="$PYBIN:$PATH"

free_port() { # free_port [HOST]
  "$PYTHON" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' \
    "${1:-127.0.0.1}"
}

# with_run_dir ARGS... → sets RUN_ARGS to ARGS plus hydra.run.dir=$RUN_DIR when ARGS name none.
# Every rank composes its own config; a per-rank ${now:} directory would split the run in two.
with_run_dir() {
  RUN_ARGS=("$@")
  local a
  for a in "$@"; do
    case "$a" in hydra.run.dir=*|+hydra.run.dir=*|++hydra.run.dir=*) return 0 ;; esac
  done
  RUN_DIR=${RUN_DIR:-runs/${LAUNCHER:-launch}-$(date +%Y-%m-%d_%H-%M-%S)}
  RUN_ARGS+=("hydra.run.dir=$RUN_DIR")
}

# node_gpus → how many GPUs this node's SLURM step may use: SLURM_GPUS_ON_NODE, else the entries of
# CUDA_VISIBLE_DEVICES (SLURM sets it from the allocation), else 0.
node_gpus() {
  if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"
    return 0
  fi
  local visible=${CUDA_VISIBLE_DEVICES:-}
  if [ -z "$visible" ] || [ "$visible" = NoDevFiles ]; then
    echo 0
    return 0
  fi
  local ids
  IFS=, read -r -a ids <<<"$visible"
  echo "${#ids[@]}"
}

# ray_gpus SETTING → the GPUs a Ray node started here offers: SETTING itself, or node_gpus for "auto".
ray_gpus() {
  if [ "${1:-0}" = auto ]; then node_gpus; else echo "${1:-0}"; fi
}

# On a machine without CUDA, DeepSpeed runs CPU ranks over gloo: say so rather than let it guess,
# and keep each rank to one OpenMP thread (more only oversubscribes the cores the ranks share).
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  RAGDIST_GPUS=0
else
  RAGDIST_GPUS=$(nvidia-smi -L | wc -l)
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export PYTHONUNBUFFERED=1
