# Two commands do all the set-up on a fresh machine:
#   make demo   — the agent plus a synthetic model service, on embedded defaults
#   make test   — lint, type-check and the whole test suite (incl. slow end-to-end tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint typecheck pytest proto proto-lint bench bench-peers bench-memory bench-engine bench-store bench-upstream bench-resources bench-client bench-demo system-deps clean chart dashboards

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mlsidecar demo $(DEMO_ARGS)

# Debian packages the tests start for real (Prometheus scrapes a running agent; the Redis
# pending store is tested against a real redis-server; alerts reach a real Alertmanager).
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Debian package: prometheus"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing Debian package: redis-server"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }
	@command -v prometheus-alertmanager >/dev/null 2>&1 || { \
	  echo "installing Debian package: prometheus-alertmanager"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus-alertmanager >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff format --check agent tests bench scripts grafana
	$(BIN)/ruff check agent tests bench scripts grafana

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck proto-lint pytest

# Regenerate the committed Python stubs from proto/ (tests fail when they are stale).
proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

proto-lint:
	cd proto && npx --yes @bufbuild/buf@1.47.2 lint

bench: $(STAMP)
	$(BIN)/python bench/ingest.py $(BENCH_ARGS)

# whylogs and Evidently side by side with the engine: they get their own venv, never .venv.
BENCH_VENV  ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[bench-peers]'
	touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/peers.py $(BENCH_ARGS)

# RSS over 10 M events: the engine in-process, then the real agent over gRPC.
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py --mode engine $(BENCH_ARGS)
	$(BIN)/python bench/memory.py --mode agent $(BENCH_ARGS)

# The other benchmarks print figures; bench/README.md says what each measures.
bench-engine: $(STAMP)
	$(BIN)/python bench/engine.py $(BENCH_ARGS)

bench-store: $(STAMP)
	$(BIN)/python bench/store.py $(BENCH_ARGS)

bench-upstream: $(STAMP)
	$(BIN)/python bench/upstream.py $(BENCH_ARGS)

bench-resources: $(STAMP)
	$(BIN)/python bench/resources.py $(BENCH_ARGS)

# The client SDK: per-call cost of log_prediction (5 k calls/s) and throughput to a real agent.
bench-client: $(STAMP)
	$(BIN)/python bench/client.py $(BENCH_ARGS)

# The demo model service's request latency with and without the SDK (interleaved rounds).
bench-demo: $(STAMP)
	$(BIN)/python bench/demo_latency.py $(BENCH_ARGS)
	$(BIN)/python bench/demo_latency.py --feature-store $(BENCH_ARGS)

# The Helm chart, linted (strict) and packaged by Helm's Go SDK (helm-python-sdk) into dist/.
chart: $(STAMP)
	$(BIN)/python scripts/package_chart.py --lint

# Grafana dashboards as code (grafana-foundation-sdk): regenerate the committed JSON of
# grafana/dashboards/ (tests/test_grafana.py fails when it is stale).
dashboards: $(STAMP)
	$(BIN)/python grafana/dashboards.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
