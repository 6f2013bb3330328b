# safekey-trl: `make train` trains the default tiny recipe on CPU, `make test` runs the tests.
# Both create .venv on first use. Paper-size runs: `make train RECIPE=qwen7b` on a GPU machine.

PYTHON ?= python3
VENV ?= .venv
RECIPE ?= tiny
ARGS ?=
# Multi-GPU: ACCELERATE=ddp|zero2|zero3|zero3_offload|fsdp (recipes/accelerate/), NUM_PROCESSES=<GPUs in all>
ACCELERATE ?=
NUM_PROCESSES ?=
# The CPU build of PyTorch (it lies on these machines' disk). An unpinned `torch` would pull a multi-GB CUDA build;
# on a GPU machine, install the CUDA build you need first, e.g. `make install TORCH_SPEC=torch==2.13.0`.
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed, which the distributed tests run on CPU: source on PyPI, built against the installed PyTorch (no build
# isolation); the version the tests run, or with WHEELHOUSE the one built there
DEEPSPEED_SPEC ?= $(if $(strip $(WHEELHOUSE)),deepspeed,deepspeed==0.19.8)
EXTRAS ?= dev,eval
# Offline (an air-gapped GPU machine): `make install WHEELHOUSE=wheelhouse` installs from that folder (or those
# folders) alone, with no index; `make wheelhouse` fills it on a connected machine, for WHEEL_PYTHON and
# WHEEL_PLATFORM, with every wheel the package and WHEEL_EXTRAS need beyond a CUDA PyTorch (scripts/wheelhouse.py).
WHEELHOUSE ?=
WHEEL_DIR ?= wheelhouse
WHEEL_PYTHON ?= 3.11
WHEEL_PLATFORM ?= manylinux_2_28_x86_64
WHEEL_EXTRAS ?= deepspeed
WHEEL_TORCH ?= 2.13.0
# `pip freeze` of the target (or package names alone): what it has already is left out
WHEEL_INSTALLED ?=
ifneq ($(strip $(WHEELHOUSE)),)
export PIP_NO_INDEX := 1
export PIP_FIND_LINKS := $(abspath $(WHEELHOUSE))
endif

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint bench gpu-check wheelhouse clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/safekey-trl train --recipe $(RECIPE) $(if $(ACCELERATE),--accelerate $(ACCELERATE)) \
		$(if $(NUM_PROCESSES),--num-processes $(NUM_PROCESSES)) $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_safekey.py $(ARGS)

# On a CUDA machine: the checks CPU cannot make, one process each under a time budget; writes docs/gpu.md.
# Without CUDA it lists them as skipped and exits 0.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m safekey_trl.gpu_check $(ARGS)

wheelhouse: $(STAMP)
	$(BIN)/python scripts/wheelhouse.py --dest $(WHEEL_DIR) --python-version $(WHEEL_PYTHON) \
		--platform $(WHEEL_PLATFORM) --extras $(WHEEL_EXTRAS) --torch $(WHEEL_TORCH) \
		$(if $(WHEEL_INSTALLED),--installed $(WHEEL_INSTALLED))

lint: $(STAMP)
	$(BIN)/ruff check safekey_trl tests bench data scripts
	$(BIN)/ruff format --check safekey_trl tests bench data scripts

clean:
	rm -rf outputs .pytest_cache .ruff_cache
