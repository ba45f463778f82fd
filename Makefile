# Every target creates .venv and installs what it needs, so each works first on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

DIST ?= dist

.PHONY: demo test lint bench chaos contract clean dist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,embedded]'
	rm -f $(VENV)/.installed-*
	touch $@

# The installable wheel (migrations, templates and sample config inside). Only pip is needed:
# the venv is created bare if missing (the other targets install into it when they run).
dist:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(DIST) .
	@ls $(DIST)/imagen_worker-*.whl

demo: $(STAMP)
	$(BIN)/python -m imagen_worker.demo

# Two xdist workers, each with its own session database: most tests wait on processes, sockets
# and the database rather than the CPU, so two run side by side in about half the wall time.
# loadgroup: tests marked xdist_group(name) share one worker; the rest go wherever one is free.
# A PostgreSQL answering on 127.0.0.1:5432 is used as it is (the fault tests put a TCP proxy in
# front of it); without one the tests start their own (Docker, else embedded).
test: $(STAMP)
	@if [ -z "$$IMAGEN_TEST_DATABASE_URL" ] && $(BIN)/python -c \
		"import socket; socket.create_connection(('127.0.0.1', 5432), 1).close()" 2>/dev/null; then \
		export IMAGEN_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres; fi; \
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The benchmarks are type-checked too, against the libraries they compare with (the bench extra).
lint: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,embedded,bench]'
	$(BIN)/ruff check imagen_worker tests bench
	$(BIN)/ruff format --check imagen_worker tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,embedded,bench]'
	$(BIN)/python -m bench

chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

# The contract suite against the real ComfyUI and Supabase Storage as well as the fakes. The peer
# scripts build each server once (cached in PEERS), start it and verify it; both stop afterwards.
PEER_SCRIPTS ?= ../shared/peers
PEERS ?= $(HOME)/.cache/imagen-peers
contract: $(STAMP)
	PEERS=$(PEERS) $(PEER_SCRIPTS)/comfyui.sh setup
	PEERS=$(PEERS) $(PEER_SCRIPTS)/storage.sh setup
	. $(PEERS)/storage/env.sh; \
	IMAGEN_TEST_COMFYUI_URL=http://127.0.0.1:8188 IMAGEN_TEST_COMFYUI_HOME=$(PEERS)/comfyui \
	IMAGEN_TEST_STORAGE_HOME=$(PEERS)/storage \
	IMAGEN_TEST_SUPABASE_URL="$$SUPABASE_URL" \
	IMAGEN_TEST_SUPABASE_SERVICE_KEY="$$SUPABASE_SERVICE_KEY" $(BIN)/python -m pytest -q tests/contract; \
	status=$$?; \
	PEERS=$(PEERS) $(PEER_SCRIPTS)/comfyui.sh stop; PEERS=$(PEERS) $(PEER_SCRIPTS)/storage.sh stop; \
	exit $$status

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache
