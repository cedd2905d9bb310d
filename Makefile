# StreamBus developer targets. Each one installs what it needs first, so on a
# fresh machine `make demo` and `make test` are the whole set-up.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests drive for real: a Prometheus server and promtool, Alertmanager, kcat.
DEB_PACKAGES := prometheus prometheus-alertmanager kcat
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install deb demo cluster test soak lint otelcol jaeger kafka-tools bench bench-quick bench-hostile bench-replication bench-transactions clean

install: $(STAMP) deb

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "StreamBus needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

deb:
	@missing=""; \
	for tool in prometheus promtool prometheus-alertmanager kcat; do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "missing:$$missing; installing Debian packages: $(DEB_PACKAGES)"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(DEB_PACKAGES); \
	fi

demo: $(STAMP)
	$(BIN)/python examples/observability/main.py $(ARGS)

# Three brokers of one cluster on this machine (ports, data dirs under ./cluster-data and a kcat
# example are printed; Ctrl+C stops all three). Options: make cluster ARGS="--help".
cluster: $(STAMP)
	$(BIN)/python deploy/cluster.py $(ARGS)

# The lint gates run first: a type or lint error fails the build like a failing test.
test: install lint otelcol jaeger kafka-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# The replication fault tests with a long leader-kill loop (STREAMBUS_KILL_ROUNDS rounds of
# SIGKILL and restart; `make test` runs 3), then the exactly-once pipeline SIGKILLed
# STREAMBUS_EOS_ROUNDS times (`make test` runs 3). Figures are printed.
KILL_ROUNDS ?= 12
EOS_ROUNDS ?= 12
soak: $(STAMP)
	STREAMBUS_KILL_ROUNDS=$(KILL_ROUNDS) $(BIN)/pytest -s tests/test_replication.py $(PYTEST_ARGS)
	STREAMBUS_EOS_ROUNDS=$(EOS_ROUNDS) $(BIN)/pytest -s tests/test_eos.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check streambus telemetry tests examples bench
	$(BIN)/ruff format --check streambus telemetry tests examples bench
	$(BIN)/mypy
	$(BIN)/mypy --strict bench

# The OpenTelemetry Collector, built with its official builder from deploy/otelcol/; the script
# rebuilds only when the manifest changed (Go's caches make a rebuild take seconds).
otelcol:
	deploy/otelcol/build.sh

# Jaeger v2 (all-in-one), the trace backend of the end-to-end trace test, built from the Go module
# pinned in deploy/jaeger/go.mod into .tools/jaeger; rebuilt only when that pin changes.
jaeger:
	deploy/jaeger/build.sh

# Apache Kafka's command-line tools for tests/test_kafka_tools.py, fetched with Maven into .tools/
# once (bench/kafka-tools/pom.xml). Without java the tests skip them; java without mvn fails.
kafka-tools: $(STAMP)
	@if command -v java >/dev/null; then $(BIN)/python -m bench.kafka fetch-tools; \
	else echo "no java: tests/test_kafka_tools.py will be skipped"; fi

# StreamBus beside Apache Kafka on this machine; Kafka's jars are fetched with Maven into .tools/
# on first use (needs java 17+ and mvn). Writes bench/results/latest.json and prints a table.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(ARGS)
	$(BIN)/python -m bench.replication $(REPL_ARGS)
	$(BIN)/python -m bench.transactions $(TXN_ARGS)
	$(BIN)/python -m bench.schemas
	$(BIN)/python -m bench.security

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick $(ARGS)
	$(BIN)/python -m bench.replication --quick $(REPL_ARGS)
	$(BIN)/python -m bench.transactions --quick $(TXN_ARGS)
	$(BIN)/python -m bench.schemas --quick
	$(BIN)/python -m bench.security --rounds 1 --messages 30000

# Replicated produce (replication factor 3, min.insync.replicas 2, acks=all) on three local
# StreamBus brokers beside three local Kafka brokers (KRaft), and the replication latency of
# each; writes bench/results/replication.json. REPL_ARGS="--quick", "--no-kafka", ...
bench-replication: $(STAMP)
	$(BIN)/python -m bench.replication $(REPL_ARGS)

# Transactional produce (100 x 100 B records per transaction; transactions/s, messages/s, commit
# latency p50/p99) and read_committed consume on one StreamBus broker beside one Kafka node;
# writes bench/results/transactions.json. TXN_ARGS="--quick", "--no-kafka", ...
bench-transactions: $(STAMP)
	$(BIN)/python -m bench.transactions $(TXN_ARGS)

# Each hardening finding reproduced against a fresh `streambus serve` of this checkout, one line
# per figure (ARGS="--quick" or ARGS="--only huge-fetch,fuzz"); logs in bench/results/logs/hostile/.
bench-hostile: $(STAMP)
	$(BIN)/python -m bench.hostile $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
