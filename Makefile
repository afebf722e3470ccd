# vna — developer entry points. `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
CLUSTER_DIR ?= .cluster
CLUSTER_ARGS ?= --frontends 2
# The Rust toolchain (rustup's default place when cargo is not on PATH); maturin finds cargo on PATH too
export PATH := $(PATH):$(HOME)/.cargo/bin
CARGO  ?= cargo
NATIVE_STAMP := $(VENV)/.native-installed
NATIVE_SRC := Cargo.toml Cargo.lock $(shell find crates -type f \( -name '*.rs' -o -name '*.toml' -o -name '*.pyi' \) 2>/dev/null)

.PHONY: install viewer run test test-native fuzz fuzz-ci test-fast lint typecheck system-deps cassandra cassandra-stop cluster-up cluster-down cluster-status bench bench-cluster clean

OHIF_VERSION ?= 3.13.2
OHIF_CACHE   ?= .cache/ohif
OHIF_VIEWER  := $(OHIF_CACHE)/viewer/VNA_PREPARED

install: $(STAMP) $(NATIVE_STAMP) viewer

## The OHIF viewer served at /viewer/: `npm pack` of the pinned @ohif/app (cached), prepared for /viewer/.
## Without npm vna still runs; /viewer/ then says how to get it.
viewer: $(STAMP)
	@if test -f $(OHIF_VIEWER) && grep -q "ohif-app-$(OHIF_VERSION).tgz" $(OHIF_VIEWER); then :; \
	elif command -v npm >/dev/null 2>&1; then \
	  mkdir -p $(OHIF_CACHE) && \
	  { test -f $(OHIF_CACHE)/ohif-app-$(OHIF_VERSION).tgz || \
	    (cd $(OHIF_CACHE) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null); } && \
	  $(BIN)/python -m vna.web.viewer prepare $(OHIF_CACHE)/ohif-app-$(OHIF_VERSION).tgz $(OHIF_CACHE)/viewer; \
	else echo "npm not found: the OHIF viewer is not installed (vna runs without it; install nodejs and npm, then make install)"; fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## The native DIMSE core (crates/, module vna_native), built in release by maturin (fetched by pip).
$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC)
	$(BIN)/pip install -q ./crates/vna-python
	touch $(NATIVE_STAMP)

## Rust checks: formatting, lints, unit and property tests of the native core.
test-native:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test -q -p vna-core
	$(CARGO) test -q --release -p vna-codec

## Fuzz the native parsers (crates/vna-core/fuzz: libFuzzer targets, built by cargo with the
## instrumentation cargo-fuzz uses and no sanitizer, so stable Rust builds them; no cargo-fuzz to
## install) for FUZZ_SECONDS each (FUZZ_TARGETS: a subset), from the seeds of seeds.py plus the
## corpus kept from earlier runs. Fails on a crash (panic, hang, an allocation over its bound),
## whose input lands in crates/vna-core/fuzz/artifacts/. FUZZ_TOOLCHAIN=nightly picks a toolchain.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?=
FUZZ_DIR := crates/vna-core/fuzz
fuzz:
	$(FUZZ_DIR)/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

## The bounded fuzz run of `make test`: every target for FUZZ_CI_SECONDS, after a format check.
FUZZ_CI_SECONDS ?= 20
fuzz-ci:
	$(CARGO) fmt --manifest-path $(FUZZ_DIR)/Cargo.toml --all --check
	$(FUZZ_DIR)/run.sh $(FUZZ_CI_SECONDS)

## Start the archive on the embedded default (SQLite index, hot replicas under ./vna-data);
## its last start-up line is the viewer's URL (http://127.0.0.1:8080/viewer/).
run: install
	$(BIN)/vna serve

## Debian packages the tests drive as real peers (DCMTK), installed when missing.
system-deps:
	@command -v storescu >/dev/null 2>&1 || { \
	  echo "installing DCMTK (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null; }
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy || { \
	  echo "installing HAProxy (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium + chromium-driver (apt; the viewer's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  echo "installing Orthanc + its DICOMweb plugin (apt; the peer of tests/web and benchmarks/dicomweb.py)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; }
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs + npm (apt; fetches the OHIF viewer)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@command -v strace >/dev/null 2>&1 || { \
	  echo "installing strace (apt; the journal fsync-order test of tests/unit/test_transfer_audit.py)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; }
	@command -v java >/dev/null 2>&1 || { \
	  echo "installing Java 17 + Maven (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null; }

## The whole suite: unit, contract (SQLite + a real Cassandra), DIMSE integration with DCMTK, faults;
## the native parsers fuzzed for a bounded time first (fuzz-ci).
test: system-deps install test-native fuzz-ci
	$(BIN)/python ops/cassandra/launcher.py fetch
	$(BIN)/mypy vna
	$(BIN)/python -m mypy.stubtest vna_native --allowlist crates/vna-python/stubtest-allowlist.txt
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Without Cassandra: quick inner loop.
test-fast: install
	$(BIN)/python -m pytest -q -m "not cassandra" $(PYTEST_ARGS)

typecheck: install
	$(BIN)/mypy vna

## A local Cassandra node for development (data under ./.cassandra, CQL on 9042).
cassandra: install
	$(BIN)/python ops/cassandra/launcher.py fetch
	$(BIN)/python ops/cassandra/launcher.py start --dir .cassandra --port 9042

cassandra-stop:
	$(BIN)/python ops/cassandra/launcher.py stop --dir .cassandra

## A local HA cluster: Cassandra, SeaweedFS, 2 `vna serve` front-ends, HAProxy (DICOM 11112, gRPC 50051).
cluster-up: install system-deps
	$(BIN)/python ops/cassandra/launcher.py fetch
	$(BIN)/python ops/cluster/cluster.py up --dir $(CLUSTER_DIR) $(CLUSTER_ARGS)

cluster-status:
	$(BIN)/python ops/cluster/cluster.py status --dir $(CLUSTER_DIR)

cluster-down:
	$(BIN)/python ops/cluster/cluster.py down --dir $(CLUSTER_DIR)

## Ingest through HAProxy with 1 and 2 front-ends, gRPC MB/s, and Orthanc on the same corpus.
bench-cluster: install system-deps
	$(BIN)/python ops/cassandra/launcher.py fetch
	$(BIN)/python -m benchmarks.cluster

bench: install system-deps
	$(BIN)/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache target
