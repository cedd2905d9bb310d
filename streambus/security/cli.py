"""``streambus serve``'s security flags, and ``streambus users add|list|delete``.

``users`` manages SCRAM credentials two ways:

* ``--bootstrap HOST:PORT``: through a running broker, with Kafka's
  AlterUserScramCredentials / DescribeUserScramCredentials (kafka-python's admin
  client), so the change goes through the cluster's metadata like any other.
  The admin connection's own security is given with ``--security-protocol``,
  ``--sasl-mechanism``, ``--sasl-username``/``--sasl-password`` and ``--ssl-cafile``.
* ``--data-dir DIR``: a stopped single broker's directory, written directly
  (the broker holds the directory lock while it runs, so this refuses then). This
  is how the first user of a SASL-only broker is made. A cluster member's
  credentials live in its Raft log: use ``--bootstrap``.

The password is read from ``--password``, else from standard input (one line), so
it need not appear in ``ps``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kafka.admin import (
    KafkaAdminClient,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from streambus.cluster.quorum import LocalQuorum
from streambus.cluster.scram_credentials import SCRAM_MECHANISMS, record_for
from streambus.errors import StreamBusError
from streambus.security.credentials import (
    DEFAULT_ITERATIONS,
    FILE_NAME,
    encode_file,
    load_file,
    make_credential,
)
from streambus.storage.datadir import DataDirError, DataDirLock, write_atomically

log = logging.getLogger("streambus")

_SECURITY_FLAGS = {
    "listeners": "Kafka's listeners: NAME://HOST:PORT,... (PLAINTEXT, SSL, SASL_PLAINTEXT, "
    "SASL_SSL); replaces --host/--port",
    "advertised_listeners": "Kafka's advertised.listeners: NAME://HOST:PORT,...",
    "listener_security_protocol_map": "Kafka's listener.security.protocol.map: NAME:PROTOCOL,...",
    "inter_broker_listener_name": "the listener brokers register and use between themselves "
    "(default: the first)",
    "ssl_certfile": "PEM server certificate (chain) for SSL and SASL_SSL listeners",
    "ssl_keyfile": "PEM private key of the certificate",
    "ssl_cafile": "PEM CA certificates that client certificates are checked against",
    "ssl_client_auth": "Kafka's ssl.client.auth: required, requested or none (default none)",
    "sasl_enabled_mechanisms": "Kafka's sasl.enabled.mechanisms "
    "(default PLAIN,SCRAM-SHA-256,SCRAM-SHA-512)",
    "sasl_mechanism_inter_broker_protocol": "Kafka's sasl.mechanism.inter.broker.protocol: "
    "how this broker logs in to the others on a SASL inter-broker listener (default PLAIN)",
    "inter_broker_sasl_username": "the user this broker logs in to the others as",
    "inter_broker_sasl_password_file": "a file whose first line is that user's password "
    "(or STREAMBUS_INTER_BROKER_SASL_PASSWORD)",
    "ssl_endpoint_identification_algorithm": "Kafka's ssl.endpoint.identification.algorithm: "
    "https (default) checks a broker certificate's name, empty does not",
    "sasl_oauthbearer_jwks_endpoint_url": "Kafka's sasl.oauthbearer.jwks.endpoint.url: the "
    "JWKS (file://, http://, https://) OAUTHBEARER tokens are checked against",
    "sasl_oauthbearer_expected_audience": "Kafka's sasl.oauthbearer.expected.audience: "
    "audiences a token's aud must name one of (comma-separated; default: not checked)",
    "sasl_oauthbearer_expected_issuer": "Kafka's sasl.oauthbearer.expected.issuer "
    "(default: not checked)",
    "sasl_oauthbearer_sub_claim_name": "Kafka's sasl.oauthbearer.sub.claim.name: the claim "
    "that names the principal (default sub)",
    "sasl_oauthbearer_scope_claim_name": "Kafka's sasl.oauthbearer.scope.claim.name: the "
    "claim holding a token's scopes, a string or a list (default scope)",
}
_INT_FLAGS = {
    "connection_failed_authentication_delay_ms": "Kafka's "
    "connection.failed.authentication.delay.ms: answer a failed login this late (default 100)",
    "connections_max_reauth_ms": "Kafka's connections.max.reauth.ms: a SASL session lasts "
    "this long (default 0: forever)",
    "sasl_oauthbearer_jwks_endpoint_refresh_ms": "Kafka's "
    "sasl.oauthbearer.jwks.endpoint.refresh.ms: refetch the JWKS this often (default 3600000)",
    "sasl_oauthbearer_jwks_endpoint_retry_backoff_ms": "at most one JWKS refetch this often "
    "for tokens naming an unknown kid (default 100)",
    "sasl_oauthbearer_clock_skew_seconds": "Kafka's sasl.oauthbearer.clock.skew.seconds: "
    "leeway for exp, nbf and iat (default 30)",
}


def add_security_arguments(serve: argparse.ArgumentParser) -> None:
    for name, text in _SECURITY_FLAGS.items():
        kind: Any = Path if name.endswith("file") else str
        serve.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    for name, text in _INT_FLAGS.items():
        unit = "SECONDS" if name.endswith("seconds") else "MS"
        serve.add_argument("--" + name.replace("_", "-"), type=int, metavar=unit, help=text)


def security_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in (*_SECURITY_FLAGS, *_INT_FLAGS)}


def add_users_parser(sub: Any) -> None:
    users = sub.add_parser(
        "users",
        help="manage SCRAM credentials",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = users.add_subparsers(dest="action", required=True)
    for action in ("add", "list", "delete"):
        p = actions.add_parser(action, help=f"{action} SCRAM credentials")
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--bootstrap", metavar="HOST:PORT", help="a running broker")
        where.add_argument("--data-dir", type=Path, help="a stopped single broker's directory")
        p.add_argument("--security-protocol", default="PLAINTEXT")
        p.add_argument("--sasl-mechanism", default="SCRAM-SHA-256")
        p.add_argument("--sasl-username")
        p.add_argument("--sasl-password")
        p.add_argument("--ssl-cafile")
        if action != "list":
            p.add_argument("name", help="the user name")
            p.add_argument(
                "--mechanism",
                choices=(*SCRAM_MECHANISMS, "all"),
                default="all",
                help="which SCRAM credential (default: all)",
            )
        if action == "add":
            p.add_argument("--password", help="the password (default: read from stdin)")
            p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)


def run_users(args: argparse.Namespace) -> int:
    mechanisms: tuple[str, ...] = ()
    if args.action != "list":
        mechanisms = SCRAM_MECHANISMS if args.mechanism == "all" else (args.mechanism,)
    password = ""
    if args.action == "add":
        password = args.password if args.password is not None else sys.stdin.readline()
        password = password.rstrip("\n")
        if not password:
            print("streambus users add: empty password", file=sys.stderr)
            return 2
    try:
        if args.bootstrap:
            return _via_broker(args, mechanisms, password)
        return _via_data_dir(args, mechanisms, password)
    except (StreamBusError, OSError) as exc:
        print(f"streambus users {args.action}: {exc}", file=sys.stderr)
        return 1


def _via_data_dir(args: argparse.Namespace, mechanisms: tuple[str, ...], password: str) -> int:
    data_dir: Path = args.data_dir
    if (data_dir / "raft").exists():
        raise DataDirError(f"{data_dir} belongs to a cluster member: use --bootstrap")
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    lock.acquire()  # DataDirError while a broker runs on it
    try:
        quorum = LocalQuorum(0)
        path = data_dir / FILE_NAME
        load_file(quorum, path)
        if args.action == "list":
            for user, mechs in sorted(quorum.state.scram_credentials.items()):
                for mechanism, cred in sorted(mechs.items()):
                    print(f"{user}\t{mechanism}\titerations={cred.iterations}")
            return 0
        for mechanism in mechanisms:
            if args.action == "add":
                cred = make_credential(mechanism, password, args.iterations)
                result = quorum.apply_now(record_for(args.name, mechanism, cred))
            else:
                result = quorum.apply_now(record_for(args.name, mechanism, None))
            if not result.ok and not (args.action == "delete" and args.mechanism == "all"):
                print(f"{args.name} {mechanism}: {result.message}", file=sys.stderr)
                return 1
        write_atomically(path, encode_file(quorum, path))
    finally:
        lock.release()
    return 0


def _via_broker(args: argparse.Namespace, mechanisms: tuple[str, ...], password: str) -> int:
    options: dict[str, Any] = {
        "bootstrap_servers": args.bootstrap,
        "security_protocol": args.security_protocol,
    }
    if "SASL" in args.security_protocol:
        options.update(
            sasl_mechanism=args.sasl_mechanism,
            sasl_plain_username=args.sasl_username,
            sasl_plain_password=args.sasl_password,
        )
    if args.ssl_cafile:
        options["ssl_cafile"] = args.ssl_cafile
    admin = KafkaAdminClient(**options)
    try:
        if args.action == "list":
            described = admin.describe_user_scram_credentials()
            for user, info in sorted(described.items()):
                for ci in info["credential_infos"]:
                    name = ci["mechanism"].name.replace("_", "-")
                    print(f"{user}\t{name}\titerations={ci['iterations']}")
            return 0
        if args.action == "add":
            changes: list[Any] = [
                UserScramCredentialUpsertion(args.name, m, password, iterations=args.iterations)
                for m in mechanisms
            ]
        else:
            existing = admin.describe_user_scram_credentials([args.name]).get(args.name, {})
            have = {
                ci["mechanism"].name.replace("_", "-")
                for ci in existing.get("credential_infos", [])
            }
            changes = [UserScramCredentialDeletion(args.name, m) for m in mechanisms if m in have]
            if not changes:
                print(
                    f"streambus users delete: {args.name} has no such credential", file=sys.stderr
                )
                return 1
        errors = admin.alter_user_scram_credentials(changes)
    finally:
        admin.close()
    failed = {user: err for user, err in errors.items() if err}
    for user, err in failed.items():
        print(f"{user}: {err}", file=sys.stderr)
    return 1 if failed else 0
