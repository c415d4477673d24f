# avatarcast: `make serve` runs the main job on the embedded default, `make test` runs the test suite.
# Both install what they need into .venv first (idempotent: reinstalls only when pyproject.toml changes).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install install-gpu test test-fast serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	@touch $(STAMP)

# CUDA machines: onnxruntime and onnxruntime-gpu share one package directory, so the GPU wheel is
# force-reinstalled last, without dependencies, after the CPU one that insightface pulls in.
install-gpu: install
	$(PIP) install --quiet -e '.[gpu]'
	$(PIP) install --quiet --force-reinstall --no-deps onnxruntime-gpu==1.31.1

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

serve: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/avatarcast serve

bench: install
	$(VENV)/bin/avatarcast bench dit

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
