# aov-dist: every target sets itself up; `make demo` and `make test` are all a new user needs.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip on some machines warns about absent local index folders: keep the install output readable.
QUIET_PIP := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DS_BUILD_OPS ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
# the 25 slowest tests are listed at the end of every run (CI time budget: keep `make test` < ~25 min)
PYTEST_ARGS ?= --durations=25

.PHONY: setup test test-fast demo shards train eval export launch launch-eval k8s mlflow-ui bench plan clean

setup: $(STAMP)

# torch first (the CPU build on local disk), then everything else with it pinned as a constraint:
# without the pin deepspeed/accelerate would pull a multi-GB CUDA torch.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel setuptools ninja $(QUIET_PIP)
	$(PIP) install -q -c constraints.txt torch==2.13.0 $(QUIET_PIP)
	# deepspeed imports torch in its setup.py: build it against the torch already installed.
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed==0.19.8 $(QUIET_PIP)
	$(PIP) install -q -c constraints.txt -e ".[dev]" $(QUIET_PIP)
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Synthetic Anomaly-Instruct-format data + VisA-D&R-format benchmark -> WebDataset shards (reused when present).
SYNTH_DIR := data_shards/synthetic
SYNTH_ARGS ?= --seed 0 --num-train 1200 --num-bench 240 --image-size 112
shards: setup $(SYNTH_DIR)/shards/manifest.json

$(SYNTH_DIR)/shards/manifest.json:
	$(PY) -m aov_dist.data.cli synth --out $(SYNTH_DIR) $(SYNTH_ARGS)
	$(PY) -m aov_dist.data.cli shard --input $(SYNTH_DIR)/train/synthetic_instruct.json \
	  --image-root $(SYNTH_DIR)/train/images --out $(SYNTH_DIR)/shards --shard-size-mb 2 --on-error fail --overwrite
	$(PY) -m aov_dist.data.cli inspect $(SYNTH_DIR)/shards

# ---- the main job and its parts ----
# the tiny tower has no pretrained weights: the demo-style stage 1 trains it too (see README)
TRAIN_ARGS ?= stage.global_batch_size=16 data.micro_batch_size=8 stage.max_steps=60 train.checkpoint_every_steps=20 +stage.lr.vision_tower=1e-3
train: shards
	$(PY) -m aov_dist.train $(TRAIN_ARGS)

# The pre-launch plan of a job (parameters, tokens per sample, per-GPU memory estimate); starts nothing:
#   make plan ARGS="experiment=aov_7b_stage2 cluster.nodes=8"
plan: setup
	$(PY) -m aov_dist.train.plan_cli $(ARGS)

eval: shards
	$(PY) -m aov_dist.eval num_workers=2 checkpoint_root=ray_results $(EVAL_ARGS)

export: setup
	$(PY) -m aov_dist.train.export $(EXPORT_ARGS)  # EXPORT_ARGS="<step or run folder> <out dir>"

demo: shards
	$(PY) -m aov_dist.demo --out demo_out

# The MLflow UI on loopback only; prints each experiment's training-runs address first.
# MLFLOW_DB picks the store (the demo's by default when present), MLFLOW_PORT the port.
MLFLOW_DB ?= $(if $(wildcard demo_out/mlflow.db),demo_out/mlflow.db,mlflow.db)
MLFLOW_PORT ?= 5000
mlflow-ui: setup
	$(PY) -m aov_dist.tracking.ui --backend-store-uri sqlite:///$(MLFLOW_DB) --host 127.0.0.1 --port $(MLFLOW_PORT)

bench: shards
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_trainer.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_checkpoint.py

# ---- cluster: Ray job submission, KubeRay manifests, a 2-node Ray cluster on this machine ----
# NODES: cluster.nodes; CLUSTER: conf/cluster/<preset>.yaml; ARGS: Hydra overrides for the job;
# SUBMIT_ARGS: options of launch/submit.py itself (--dry-run, --env KEY=VALUE, --submission-id ID)
NODES ?= 1
CLUSTER ?= h100
ARGS ?=
SUBMIT_ARGS ?=
CLUSTER_ROOT ?= /tmp/aov-cluster
.PHONY: launch-probe cluster-up cluster-down multinode-demo

launch: setup
	$(PY) launch/submit.py train --nodes $(NODES) --cluster $(CLUSTER) $(SUBMIT_ARGS) -- $(ARGS)

launch-eval: setup
	$(PY) launch/submit.py eval --nodes $(NODES) --cluster $(CLUSTER) $(SUBMIT_ARGS) -- $(ARGS)

launch-probe: setup
	$(PY) launch/submit.py probe --nodes $(NODES) --cluster $(CLUSTER) $(SUBMIT_ARGS) -- $(ARGS)

k8s: setup
	$(PY) -m aov_dist.cluster.k8s --nodes $(NODES) --cluster $(CLUSTER) --out k8s/rendered $(ARGS)

cluster-up: setup
	$(PY) -m aov_dist.cluster.local_cluster up --root $(CLUSTER_ROOT) --nodes 2

cluster-down:
	$(PY) -m aov_dist.cluster.local_cluster down --root $(CLUSTER_ROOT)

multinode-demo: setup
	$(PY) -m pytest tests/test_multinode.py -m slow -v -rs $(PYTEST_ARGS)

# ---- the GPU rehearsal: one script for a GPU machine that has only PyTorch (docs/benchmarks.md) ----
# make gpu-wheels (here, with PyPI) puts what that machine lacks into .whl/; make gpu-check there
# installs them into .gpu-site/ and runs benchmarks/gpu_check.py. With this checkout's .venv (any
# machine that ran make setup) it uses the venv instead. GPU_CHECK_ARGS=--allow-cpu: tiny, on CPU.
GPU_CHECK_ARGS ?=
GPU_WHEELS := .whl
GPU_SITE := .gpu-site
.PHONY: gpu-check gpu-wheels

gpu-wheels: setup
	$(PY) benchmarks/gpu_wheels.py --out $(GPU_WHEELS)

gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); else py=python3; \
	  if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	    $$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; \
	  else echo "gpu-check: no $(GPU_WHEELS)/ (make gpu-wheels); using what $$py has" >&2; fi; fi; \
	PYTHONPATH=$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $$py benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf mlruns mlartifacts mlflow.db ray_results outputs demo_out data_shards/synthetic .pytest_cache k8s/rendered .gpu-site
