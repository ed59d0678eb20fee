# The two quickstart commands: `make serve` and `make test` (each installs what is missing first).
# torch: `pip install torch==2.13.0` from PyPI is the CUDA build on Linux (several GB). For the CPU
# wheel, name PyTorch's index once: `make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	@echo "installing into $(VENV) (the first time: about 1.5 minutes)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: serve test lint docs
serve: $(VENV)/.installed
	$(VENV)/bin/rnnserve serve --host 0.0.0.0 --port 8000

test: $(VENV)/.installed
	@echo "make test: the whole suite, about 11 minutes on 2 cores. It needs redis-server on PATH;"
	@echo "  chromium (/usr/bin/chromium) for the browser tests and nginx for one balancer are optional."
	@command -v redis-server >/dev/null || echo "  redis-server not found: its tests skip (fail under CI=true); apt-get install redis-server"
	@test -x /usr/bin/chromium || echo "  chromium not found: the browser tests skip (fail under CI=true); apt-get install chromium"
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app

# the site from docs/ into site/; strict: a broken link or anchor fails the build
docs: $(VENV)/.installed
	$(PY) -m app.tools.readme --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
