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
# The API's descriptors with their comments, which the REST gateway's OpenAPI document shows.
API_DESCRIPTORS := dembrane/webhooks/v1/api_descriptors.binpb

# The client libraries (buf.gen.yaml): the generated directories, and the pinned plugins
# that make them. A Go plugin's stamp names its version, so a new version installs anew.
GO ?= go
GOBIN_DIR := build/gobin
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
PROTOC_GEN_GO := $(GOBIN_DIR)/.protoc-gen-go-$(PROTOC_GEN_GO_VERSION)
PROTOC_GEN_GO_GRPC := $(GOBIN_DIR)/.protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)
CLIENT_GEN_TOOLS := $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
GO_CLIENT_GEN := clients/go/dembrane
TS_CLIENT := clients/typescript
TS_CLIENT_GEN := $(TS_CLIENT)/src/gen
TS_CLIENT_DEPS := $(TS_CLIENT)/node_modules/.installed

export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help install run demo test test-sqlite test-postgres test-clients generate check-generated lint protodeps breaking bench clean

help:
	@echo "make run           start the service (gRPC :50051, REST :8080, dispatcher) on SQLite"
	@echo "make test          install, check generated code, lint, and run every test"
	@echo "make demo          show an event's way to a receiver on a throwaway service (seconds)"
	@echo "make test-clients  build the Go and TypeScript clients and run them against the service"
	@echo "make generate      regenerate the Python code and the clients in clients/ from proto/"
	@echo "make lint          buf lint/format, ruff, mypy --strict"
	@echo "make breaking      check proto/ stays compatible with main (BASE=<revision> for another)"
	@echo "make bench         run the benchmarks and write docs/benchmarks.md"

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

# The Go plugins at the versions pinned above; ts-proto, the TypeScript one, comes with buf
# from tools/package-lock.json.
$(PROTOC_GEN_GO):
	GOBIN=$(abspath $(GOBIN_DIR)) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	@touch $@

$(PROTOC_GEN_GO_GRPC):
	GOBIN=$(abspath $(GOBIN_DIR)) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	@touch $@

$(TS_CLIENT_DEPS): $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
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
	  --include_source_info --descriptor_set_out=$(1)/$(API_DESCRIPTORS) \
	  $(PROTO_FILES)
endef

# Fails when the protos break compatibility with a git revision: `make breaking` compares
# with main, `make breaking BASE=<revision>` with another.
breaking: protodeps $(BUF)
	tools/proto-breaking.sh $(or $(BASE),main)

generate: protodeps $(CLIENT_GEN_TOOLS)
	@rm -f $(GEN_DIR)/dembrane/webhooks/v1/*_pb2*.py $(GEN_DIR)/dembrane/webhooks/v1/*_pb2*.pyi \
	  $(GEN_DIR)/$(API_DESCRIPTORS)
	$(call run_protoc,$(GEN_DIR))
	@rm -rf $(GO_CLIENT_GEN) $(TS_CLIENT_GEN)
	$(BUF) generate

# Fails when the committed generated code (Python, and the clients) differs from what the
# protos produce.
check-generated: protodeps $(CLIENT_GEN_TOOLS)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  $(call run_protoc,$$tmp); \
	  $(BUF) generate -o $$tmp; \
	  stale=0; \
	  same() { if ! diff -r "$$@" >/dev/null; then diff -r "$$@" | head -40; stale=1; fi; }; \
	  same -x '__init__.py' -x '__pycache__' -x 'py.typed' $$tmp/dembrane/webhooks/v1 $(GEN_DIR)/dembrane/webhooks/v1; \
	  same $$tmp/$(GO_CLIENT_GEN) $(GO_CLIENT_GEN); \
	  same $$tmp/$(TS_CLIENT_GEN) $(TS_CLIENT_GEN); \
	  if [ $$stale = 0 ]; then echo "generated code is up to date"; \
	  else echo "generated code is stale: run 'make generate' and commit the result"; exit 1; fi

lint: protodeps $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code proto
	$(VENV)/bin/ruff check src tests $(wildcard bench)
	$(VENV)/bin/ruff format --check src tests $(wildcard bench)
	$(VENV)/bin/mypy
	cd bench/loadgen && $(GO) vet ./... && test -z "$$(gofmt -l .)"

test: install check-generated lint test-clients test-sqlite test-postgres

# The Go and TypeScript clients: vet, build and type-check them, then run each against the
# real service (tools/test-clients.sh starts it on free ports and stops it again).
test-clients: install $(TS_CLIENT_DEPS)
	cd clients/go && $(GO) vet ./... && $(GO) build ./...
	cd $(TS_CLIENT) && node_modules/.bin/tsc --noEmit
	cd $(TS_CLIENT) && rm -rf dist && node_modules/.bin/tsc
	tools/test-clients.sh

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
	rm -rf $(VENV) $(TOOLS_VENV) .bench-cache build tools/node_modules $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist
