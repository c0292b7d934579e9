#!/usr/bin/env bash
# `make gpu-check`: what only a CUDA GPU can show, in at most 8 minutes (bench/gpu_check.py): faiss-gpu in
# place of faiss-cpu if it is missing, every GPU-marked test, ZeRO-3 bf16 training steps, a sharded
# evaluation, faiss-gpu shards vs in-process faiss-gpu, the Triton kernels vs their references. The last
# line is one JSON object of figures, also written to $GPU_CHECK_OUT (default runs/gpu-check/result.json).
# Without a GPU it prints why as {"skipped": "..."} and exits 0. Arguments go to bench/gpu_check.py:
#   launch/gpu_check.sh                      # everything
#   launch/gpu_check.sh --only train,eval    # some steps
#   launch/gpu_check.sh --size medium        # a smaller random model than the GPU's memory allows
# It runs the venv's python as it is (launch/common.sh); it installs nothing but faiss-gpu.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
cd "$RAGDIST_HOME"
exec "$PYTHON" bench/gpu_check.py "$@"
