# dicomsafe — every target installs what it needs.
#   make run    the demo on real local servers (installed on first use)
#   make test   the whole test suite (unit, integration, e2e)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .stamps
PROTOS := $(wildcard proto/dicomsafe/v1/*.proto)
GEN    := $(patsubst proto/%.proto,%_pb2.py,$(PROTOS))

.PHONY: help venv proto run run-keep viewer test test-unit test-integration test-e2e dr-drill lint bench infra-up infra-down infra-status topics clean

help:
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,codecs]'
	@touch $@

venv: $(STAMPS)/venv ## create .venv with pinned dependencies

$(GEN) &: $(PROTOS) $(STAMPS)/venv
	$(PY) -m grpc_tools.protoc -I proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  $(PROTOS)
	@touch $(GEN)

proto: $(GEN) ## generate Python code for proto/dicomsafe/v1 (not committed)

run: proto ## demo: start servers + services, publish studies, retrieve, verify audit, stop
	$(PY) -m tools.demo

run-keep: proto ## the demo, leaving servers and services running
	$(PY) -m tools.demo --keep-running

viewer: proto ## OHIF in a browser against every service: sample studies, sign-in users printed; Ctrl-C stops
	$(PY) -m tools.viewer

test: proto ## all tests against real Kafka, Vault API and MongoDB-wire servers
	$(PY) -m pytest -q -rs

test-unit: proto
	$(PY) -m pytest -q -m unit

test-integration: proto
	$(PY) -m pytest -q -m integration

test-e2e: proto
	$(PY) -m pytest -q -m e2e

dr-drill: proto ## back up a populated site, destroy it, restore into fresh servers, verify; prints RPO/RTO
	$(PY) -m pytest -q -s -p no:cacheprovider tests/e2e/test_dr_drill.py

lint: proto ## ruff + mypy (strict)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy dicomsafe services tools tests

bench: proto ## throughput ratios vs baselines measured in the same run; writes bench-results.json
	$(PY) -m tools.bench

infra-up: $(STAMPS)/venv ## start local Kafka, OpenBao and MongoDB-wire servers
	$(PY) -m tools.infra up

infra-down: $(STAMPS)/venv
	$(PY) -m tools.infra down

infra-status: $(STAMPS)/venv
	$(PY) -m tools.infra status

topics: proto ## create the Kafka topics on $$KAFKA_BOOTSTRAP
	$(PY) -m tools.topics

clean:
	rm -rf $(STAMPS) dicomsafe/v1/*_pb2*.py dicomsafe/v1/*_pb2*.pyi var bench-results.json
