"""The ``streambus`` command.

``streambus serve`` runs a broker with the telemetry pipeline: Prometheus
metrics at ``/metrics`` on the metrics port and, when the standard
``OTEL_*`` variables ask for it, OTLP export towards a collector. SIGINT and
SIGTERM stop it gracefully; the exit code is then 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from streambus.broker import Broker
from streambus.config import BrokerConfig
from streambus.errors import StreamBusError
from streambus.security.cli import (
    add_security_arguments,
    add_users_parser,
    run_users,
    security_overrides,
)
from streambus.storage.datadir import DataDirError
from streambus.tracefile import add_traces_parser, run_traces
from telemetry import TelemetryConfig, WebConfigError, load_web_config, start_pipeline

log = logging.getLogger("streambus")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _topic_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. retention.ms=60000), got {text!r}"
        )
    return key.strip(), value.strip()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _version() -> str:
    try:
        return importlib.metadata.version("streambus")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streambus", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run a broker",
        description="Run a broker. Every option can also be set as STREAMBUS_<OPTION> "
        "(STREAMBUS_DATA_DIR, STREAMBUS_PORT, ...); topic defaults as "
        "STREAMBUS_TOPIC_<KAFKA NAME> (STREAMBUS_TOPIC_RETENTION_MS).",
    )
    serve.add_argument("--data-dir", type=Path, help="directory for logs and metadata")
    serve.add_argument("--host", help="address to listen on for Kafka clients (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="Kafka protocol port (default 9092)")
    serve.add_argument("--advertised-host", help="host name clients are told to connect to")
    serve.add_argument(
        "--broker-id",
        "--node-id",
        dest="broker_id",
        type=int,
        help="this broker's node id (default 1)",
    )
    serve.add_argument(
        "--controller-quorum",
        metavar="ID@HOST:PORT,...",
        help="the Raft voters, e.g. 1@h1:9193,2@h2:9193,3@h3:9193 (default: none, a one-node "
        "cluster of this broker); this node must be one of them",
    )
    serve.add_argument(
        "--raft-port", type=int, help="Raft port for quorum entries given without one (9193)"
    )
    serve.add_argument(
        "--cluster-secret",
        help="shared secret that encrypts and authenticates Raft traffic; required with more "
        "than one voter (prefer STREAMBUS_CLUSTER_SECRET: flags show in ps)",
    )
    serve.add_argument(
        "--broker-session-timeout-ms",
        type=int,
        metavar="MS",
        help="Kafka's broker.session.timeout.ms: a broker silent this long is fenced (9000)",
    )
    serve.add_argument(
        "--replica-lag-time-max-ms",
        type=int,
        metavar="MS",
        help="Kafka's replica.lag.time.max.ms: a follower behind this long leaves the ISR (30000)",
    )
    serve.add_argument(
        "--broker-heartbeat-interval-ms",
        type=int,
        metavar="MS",
        help="Kafka's broker.heartbeat.interval.ms (2000)",
    )
    serve.add_argument("--metrics-host", help="address of the /metrics endpoint (default 0.0.0.0)")
    serve.add_argument("--metrics-port", type=int, help="/metrics port (default 9090; 0 = off)")
    serve.add_argument(
        "--metrics-web-config",
        type=Path,
        metavar="PATH",
        help="Prometheus' web config YAML (tls_server_config, basic_auth_users) for /metrics",
    )
    serve.add_argument(
        "--schema-registry-port",
        type=int,
        metavar="PORT",
        help="schema registry REST port, on --host (default 8081; 0 = off)",
    )
    serve.add_argument(
        "--schema-registry-authentication",
        choices=("none", "basic"),
        help="'basic': the registry's REST API takes HTTP Basic auth against the SCRAM users "
        "(default none)",
    )
    serve.add_argument("--num-partitions", type=int, help="Kafka's num.partitions (default 1)")
    serve.add_argument(
        "--auto-create-topics-enable",
        type=_bool,
        metavar="BOOL",
        help="Kafka's auto.create.topics.enable (default true)",
    )
    serve.add_argument(
        "--connections-max-idle-ms",
        type=int,
        metavar="MS",
        help="Kafka's connections.max.idle.ms: close connections idle this long "
        "(default 600000; 0 or less: never)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="Kafka's max.connections: refuse connections beyond N (default 0: half of what "
        "the open-file limit leaves after 256 descriptors)",
    )
    serve.add_argument(
        "--max-connections-per-ip",
        type=int,
        metavar="N",
        help="Kafka's max.connections.per.ip (default 0: max.connections)",
    )
    serve.add_argument(
        "--queued-max-request-bytes",
        type=int,
        metavar="BYTES",
        help="Kafka's queued.max.request.bytes: memory for request frames being read or "
        "handled, broker-wide (default 268435456)",
    )
    serve.add_argument(
        "--topic-config",
        type=_topic_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a topic default as Kafka names it, e.g. retention.ms=3600000 (repeatable)",
    )
    serve.add_argument(
        "--authorizer",
        nargs="?",
        const="acl",
        help="'acl' turns on Kafka's ACL authorizer (default none; STREAMBUS_AUTHORIZER)",
    )
    serve.add_argument("--super-users", help="Kafka's super.users, e.g. 'User:admin;User:ops'")
    serve.add_argument("--audit-log", type=Path, help="path of the rotating JSON audit log")
    add_security_arguments(serve)
    serve.add_argument("--no-tracing", action="store_true", help="build no tracer provider")
    serve.add_argument(
        "--log-level",
        type=_log_level,
        default=None,
        help="DEBUG, INFO, WARNING or ERROR (default INFO; also STREAMBUS_LOG_LEVEL)",
    )
    add_traces_parser(sub)
    add_users_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    overrides = {
        "data_dir": args.data_dir,
        "host": args.host,
        "port": args.port,
        "advertised_host": args.advertised_host,
        "broker_id": args.broker_id,
        "metrics_host": args.metrics_host,
        "metrics_port": args.metrics_port,
        "metrics_web_config": args.metrics_web_config,
        "schema_registry_port": args.schema_registry_port,
        "schema_registry_authentication": args.schema_registry_authentication,
        "num_partitions": args.num_partitions,
        "auto_create_topics_enable": args.auto_create_topics_enable,
        "tracing": False if args.no_tracing else None,
        "connections_max_idle_ms": args.connections_max_idle_ms,
        "max_connections": args.max_connections,
        "max_connections_per_ip": args.max_connections_per_ip,
        "queued_max_request_bytes": args.queued_max_request_bytes,
        "controller_quorum": args.controller_quorum,
        "raft_port": args.raft_port,
        "cluster_secret": args.cluster_secret,
        "broker_session_timeout_ms": args.broker_session_timeout_ms,
        "replica_lag_time_max_ms": args.replica_lag_time_max_ms,
        "broker_heartbeat_interval_ms": args.broker_heartbeat_interval_ms,
        "authorizer": args.authorizer,
        "super_users": args.super_users,
        "audit_log": args.audit_log,
        **security_overrides(args),
    }
    return BrokerConfig.load(overrides, dict(args.topic_config))


async def serve(config: BrokerConfig) -> int:
    pipeline = start_pipeline(
        TelemetryConfig(
            metrics_host=config.metrics_host,
            metrics_port=config.metrics_port,
            web_config=(
                load_web_config(config.metrics_web_config) if config.metrics_web_config else None
            ),
            broker_id=str(config.broker_id),
            tracing=config.tracing,
        )
    )
    broker = Broker(
        config, meter_provider=pipeline.meter_provider, tracer_provider=pipeline.tracer_provider
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await broker.start()
        # What start-up built (protocol schemas, logs, instruments) lives as long as the
        # process: freezing it keeps the garbage collector from re-scanning it on every
        # full collection, which showed as ~30 ms pauses under load.
        gc.freeze()
        stopping = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(broker.wait_failed())
        await asyncio.wait((stopping, failed), return_when=asyncio.FIRST_COMPLETED)
        for task in (stopping, failed):
            task.cancel()
        if broker.failure is not None:  # logged by the broker, once
            return 2
        log.info("signal received; shutting down")
    finally:
        await broker.stop()
        pipeline.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "traces":
        return run_traces(args)
    if args.command == "users":
        return run_users(args)
    level = args.log_level
    if level is None:
        try:
            level = _log_level(os.environ.get("STREAMBUS_LOG_LEVEL", "INFO"))
        except argparse.ArgumentTypeError as exc:
            print(f"streambus: STREAMBUS_LOG_LEVEL: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        return asyncio.run(serve(config))
    except DataDirError as exc:  # locked, not a directory, unreadable meta.properties
        log.error("cannot start: %s", exc)
        return 1
    except StreamBusError as exc:
        log.error("%s", exc)
        return 2
    except WebConfigError as exc:  # --metrics-web-config unreadable or unservable
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
