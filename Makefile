# The two commands of the README: `make demo` runs the main job on its embedded default, `make test` the tests.
# Both create or reuse .venv in the checkout. On a machine without an NVIDIA driver the CPU torch wheel is
# pinned (constraints-cpu.txt); with one, pip resolves the CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
DEMO_DIR := artifacts/demo-corpus
# The languages demo.yaml trains; `whisper-lora demo-corpus --languages te,kn,ml --out DIR` speaks the others.
DEMO_LANGUAGES ?= mr,hi,ta
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 0

.PHONY: install espeak demo test gpu-check cluster-dry-run gpu-lock clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[demo,test]"
	touch $@

install: $(VENV)/.installed

espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q espeak-ng >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null); \
	  else sudo -n apt-get install -y -q espeak-ng >/dev/null; fi; } || { echo "install espeak-ng (Debian: apt-get install espeak-ng)"; exit 1; }

$(DEMO_DIR)/README.md: | install espeak
	$(PY) -m whisper_lora.cli demo-corpus --out $(DEMO_DIR) --languages $(DEMO_LANGUAGES)

demo: install espeak $(DEMO_DIR)/README.md
	$(PY) ray_jobs/tune_languages.py --config ray_jobs/configs/demo.yaml
	@echo "published: artifacts/published/demo/ (manifest.json, report.md, *.png)"

# Four stages, cheapest first: lint, the tests without Ray, the tests that start Ray (marked `ray`), then the
# multi-node cluster dry run (marked `cluster`: a head and two worker nodes, S3 on loopback, a node killed).
test: install espeak
	$(PY) -m ruff check whisper_lora ray_jobs tests benchmarks cluster
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q -m "not ray" --durations=10
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q -m "ray and not cluster" --durations=25
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q -m cluster --durations=5

# The first command on a GPU node: whisper-large-v2 LoRA in int8 and bf16 for a few steps, samples/s and peak memory
# beside the PEFT notebook's T4 (benchmarks/gpu_check.py; e.g. GPU_CHECK_ARGS="--model medium --steps 20").
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PY) benchmarks/gpu_check.py --json artifacts/gpu-check.json $(GPU_CHECK_ARGS)

# Before renting GPUs: the sweep on a local head + 2 worker nodes in their own mount namespaces, S3 on loopback,
# a worker node killed mid-trial (cluster/dry_run.py, cluster/README.md; needs root). DRY_RUN_ARGS="--workdir DIR".
DRY_RUN_ARGS ?=
cluster-dry-run: install
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) cluster/dry_run.py --report artifacts/cluster-dry-run.json $(DRY_RUN_ARGS)

# The GPU image's exact pins (cluster/Dockerfile): what is installed in .venv, torch as its CUDA build.
gpu-lock: install
	$(PY) cluster/gpu_lock.py > cluster/requirements-gpu.txt.new && mv cluster/requirements-gpu.txt.new cluster/requirements-gpu.txt

clean:
	rm -rf artifacts .pytest_cache
