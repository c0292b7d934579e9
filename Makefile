# The README's commands. Each creates .venv if it is missing and installs the project into it.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev,slurm
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/ragdist/torch_extensions
export WANDB_MODE ?= offline
# The venv's tools first for every process a target starts (ranks, Ray workers, SLURM jobs): with a
# second `ninja` ahead of the venv's, DeepSpeed rebuilds its C++ ops whenever the two alternate.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install test demo demo-elements joint-demo compare lint bench gpu-check clean

$(BIN)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	rm -f $(BIN)/.installed-*
	touch $@

install: $(BIN)/.installed-$(EXTRAS)

# The whole suite; pytest's "no tests collected" (exit 5) is not a failure of the suite.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# Build the index, start the retrieval service, fine-tune (RAG and closed book), evaluate, report.
demo: install
	$(BIN)/ragdist-index +experiment=demo
	$(BIN)/ragdist-train +experiment=demo hydra.run.dir=runs/demo

# The demo's recipe on the second built-in dataset (chemical elements, from the mendeleev package).
demo-elements: install
	$(BIN)/ragdist-index +experiment=demo_elements
	$(BIN)/ragdist-train +experiment=demo_elements hydra.run.dir=runs/demo-elements

# Joint retriever training with each loss, from the demo's generator (run `make demo` first), then
# one table of recall@k before → after.
JOINT_LOSSES ?= rag_nll emdr2 lsr pdist
joint-demo: install
	test -d runs/demo/checkpoints/rag || { echo "run 'make demo' first: runs/demo/checkpoints/rag is missing" >&2; exit 2; }
	for loss in $(JOINT_LOSSES); do $(BIN)/ragdist-train +experiment=demo_joint joint=$$loss hydra.run.dir=runs/joint-$$loss || exit 1; done
	$(BIN)/ragdist-train +experiment=demo_joint joint=lsr joint.side=both joint.refresh_every=20 hydra.run.dir=runs/joint-lsr-both
	$(BIN)/python -m ragdist.joint.report $(foreach l,$(JOINT_LOSSES),runs/joint-$(l)) runs/joint-lsr-both

# The comparison (fine-tune only / RAG at inference / RAG fine-tuned): trains what is missing, then
# writes runs/compare/report.{md,json}, plots/*.png and an offline wandb run.
COMPARE_ARGS ?= +experiment=demo
compare: install
	$(BIN)/ragdist-eval $(COMPARE_ARGS) eval.compare=true logger=wandb hydra.run.dir=runs/compare

lint: install
	$(BIN)/ruff check ragdist tests bench

bench: install
	$(BIN)/python bench/retrieval.py

# On a machine with a CUDA GPU, in at most 8 minutes: faiss-gpu in place of faiss-cpu if missing, the
# GPU-marked tests, ZeRO-3 bf16 training, a sharded evaluation, shards vs in-process faiss-gpu, the Triton
# kernels; one JSON line of figures (also runs/gpu-check/result.json). Without a GPU: why, and exit 0.
# No `install` prerequisite: its [cpu] extra would put faiss-cpu back beside faiss-gpu. Only a GPU
# machine without a venv gets one, with the [gpu] extra, unless PYTHON names an interpreter that has
# ragdist's requirements already (a prepared image): `PYTHON=python3 make gpu-check`. Steps to run:
# `make gpu-check GPU_CHECK_ARGS="--only train,kernels"`.
gpu-check:
	@if [ -z "$${PYTHON:-}" ] && [ ! -x $(BIN)/python ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then \
	  $(MAKE) install EXTRAS=gpu,dev; fi
	launch/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf runs outputs multirun indexes data/builtin wandb
