# Everything a developer or CI needs, from a clean clone: `make run`, `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION := 0.13.9
PYTHON ?= python3
TOOLS_VENV := .tools
UV := $(TOOLS_VENV)/bin/uv
VENV := .venv
VPY := $(VENV)/bin/python
BUF := tools/node_modules/.bin/buf
PROTODEPS := build/protodeps
GEN_DIR := src
PROTO_FILES := $(wildcard proto/dembrane/webhooks/v1/*.proto)

export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help install run demo test test-sqlite test-postgres generate check-generated lint protodeps bench clean

help:
	@echo "make run       start the service (gRPC :50051, REST :8080, dispatcher) on SQLite"
	@echo "make test      install, check generated code, lint, and run every test"
	@echo "make demo      show an event's way to a receiver on a throwaway service (seconds)"
	@echo "make generate  regenerate the Python code from proto/"
	@echo "make lint      buf lint/format, ruff, mypy --strict"
	@echo "make bench     run the benchmarks and write docs/benchmarks.md"

$(UV):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet "uv==$(UV_VERSION)"

# Bytecode is compiled at install: every process (the service, its sender processes, the
# tests' subprocesses) then starts without compiling its libraries, even where the
# environment forbids writing bytecode caches.
$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --locked --quiet --compile-bytecode
	@touch $@

$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(VENV)/.installed

# The google/api protos come from the installed googleapis-common-protos package.
protodeps: $(VENV)/.installed
	@rm -rf $(PROTODEPS) && mkdir -p $(PROTODEPS)/google/api
	@site=$$($(VPY) -c 'import google.api.annotations_pb2 as m, os; print(os.path.dirname(m.__file__))'); \
	  cp $$site/annotations.proto $$site/http.proto $$site/field_behavior.proto $(PROTODEPS)/google/api/

define run_protoc
	$(VPY) -m grpc_tools.protoc \
	  -I proto -I $(PROTODEPS) \
	  -I $$($(VPY) -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))') \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) \
	  $(PROTO_FILES)
endef

generate: protodeps
	@rm -f $(GEN_DIR)/dembrane/webhooks/v1/*_pb2*.py $(GEN_DIR)/dembrane/webhooks/v1/*_pb2*.pyi
	$(call run_protoc,$(GEN_DIR))

# Fails when the committed generated code differs from what the protos produce.
check-generated: protodeps
	@tmp=$$(mktemp -d) && $(call run_protoc,$$tmp) && \
	  if diff -r -x '__init__.py' -x '__pycache__' -x 'py.typed' $$tmp/dembrane/webhooks/v1 $(GEN_DIR)/dembrane/webhooks/v1 >/dev/null; then \
	    echo "generated code is up to date"; rm -rf $$tmp; \
	  else \
	    diff -r -x '__init__.py' -x '__pycache__' -x 'py.typed' $$tmp/dembrane/webhooks/v1 $(GEN_DIR)/dembrane/webhooks/v1 | head -40; \
	    echo "generated code is stale: run 'make generate' and commit the result"; rm -rf $$tmp; exit 1; \
	  fi

lint: protodeps $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code proto
	$(VENV)/bin/ruff check src tests $(wildcard bench)
	$(VENV)/bin/ruff format --check src tests $(wildcard bench)
	$(VENV)/bin/mypy

test: install check-generated lint test-sqlite test-postgres

test-sqlite: install
	$(VENV)/bin/pytest -q

# Every test again on a private PostgreSQL server (installed from Debian's packages when
# missing), but those about the single-process SQLite mode.
test-postgres: install
	WEBHOOKS_TEST_BACKEND=postgres tools/postgres.sh \
	  $(VENV)/bin/pytest -q -p no:cacheprovider -m "not sqlite_only"

# A development secret unless one is set; never use it for a deployment.
run: export WEBHOOKS_JWT_SECRET ?= dev-only-secret-never-use-in-production
# buf too: the README's calls use `buf curl`.
run: install $(BUF)
	$(VENV)/bin/dembrane-webhooks serve

demo: install
	$(VENV)/bin/dembrane-webhooks demo

bench: install
	$(VPY) -m bench

clean:
	rm -rf $(VENV) $(TOOLS_VENV) build tools/node_modules
