# metald — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VAR := $(CURDIR)/var
ASSETS := $(VAR)/assets
APT_PACKAGES := qemu-system-x86 busybox-static cpio lz4 e2fsprogs iproute2 iputils-ping curl ca-certificates nftables wrk nghttp2-client prometheus systemd
GEN := src/metald/gen
# Every .proto `make proto` generates (tests/unit/test_generated.py checks the same list).
PROTOS := vmprovisioner/v1/vm.proto billing/v1/billing.proto metald/admin/v1/admin.proto

# Quick-start settings; anything already in the environment wins.
export UNKEY_METALD_ADDRESS ?= 127.0.0.1
export UNKEY_METALD_PORT ?= 8080
export UNKEY_METALD_BACKEND ?= qemu
export UNKEY_METALD_DATA_DIR ?= $(VAR)/data
export UNKEY_METALD_ASSETMANAGER_CACHE_DIR ?= $(ASSETS)
export UNKEY_METALD_AUTH_DEV_TOKENS ?= true

.PHONY: run test bench bench-deps deps system-deps venv guest buf proto lint unit clean

# The quick start runs its own billing service too (`metald billing-sink` on 127.0.0.1:8081,
# metald's default UNKEY_METALD_BILLING_ENDPOINT), ended by its pid when metald ends;
# `metald billing usage --db var/billing-sink.db` shows what it received.
run: deps guest
	$(BIN)/metald billing-sink --db $(VAR)/billing-sink.db & sink=$$!; \
	trap 'kill $$sink 2>/dev/null; wait $$sink' EXIT; $(BIN)/metald serve

test: deps guest buf
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/pytest -q -ra --durations=30 tests

# Benchmarks (bench/): prints tables, writes bench/results/*.json; see docs/performance.md.
bench: deps guest bench-deps
	$(BIN)/python -m bench

# The other ASGI servers bench/servers.py compares (pyproject's `bench` extra).
bench-deps: venv
	$(BIN)/pip install -q -e '.[dev,bench]'


deps: system-deps venv

# Installs only what is missing, so a second run costs nothing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  case " $$missing " in *" prometheus "*) if [ -d /run/systemd/system ]; then \
	    echo "prometheus is for the tests (they start their own): its system service stays off"; \
	    systemctl disable --now prometheus.service; fi;; esac; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

guest: venv
	$(BIN)/metald assets build --store $(ASSETS)

buf: node_modules/.bin/buf

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

# Regenerates the protobuf and Connect code; tests/unit/test_generated.py fails when it is stale.
proto: venv
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) \
	  --plugin=protoc-gen-connectrpc=$(BIN)/protoc-gen-connectrpc \
	  --connectrpc_out=$(GEN) --connectrpc_opt=protobuf=google $(PROTOS)
	for d in $(dir $(PROTOS)); do while [ "$$d" != . ]; do touch $(GEN)/$$d/__init__.py; d=$$(dirname $$d); done; done
	touch $(GEN)/__init__.py

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench

unit: venv
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf $(VENV) node_modules $(VAR)
