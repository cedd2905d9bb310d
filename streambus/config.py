"""Broker configuration: one typed object from defaults, ``STREAMBUS_*`` variables, then flags.

Every field of :class:`BrokerConfig` can be set by the environment variable
``STREAMBUS_<FIELD>`` (``STREAMBUS_PORT=9093``). Topic defaults are a nested
section named the way Kafka names them: ``retention.ms`` is
``STREAMBUS_TOPIC_RETENTION_MS``, or ``--topic-config retention.ms=...`` on
the command line; a topic created with CreateTopics configs overrides them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streambus.cluster.config import ClusterConfig, parse_quorum
from streambus.errors import InvalidConfigError
from streambus.schemas.tls import RegistryTls, registry_tls
from streambus.security.broker_client import InterBrokerSecurity
from streambus.security.listeners import (
    INTER_BROKER_MECHANISMS,
    MECHANISMS,
    Listener,
    find,
    parse_listeners,
)
from streambus.security.oauthbearer import OAUTHBEARER, OAuthBearerValidator, validator_from
from streambus.security.tls import server_context
from streambus.topic_config import KAFKA_NAMES, TopicConfig

ENV_PREFIX = "STREAMBUS_"
TOPIC_ENV_PREFIX = ENV_PREFIX + "TOPIC_"
AUTHORIZER_ON = ("acl", "on", "true", "1")
AUTHORIZER_OFF = ("none", "off", "false", "0", "")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    data_dir: Path = Path("./streambus-data")
    host: str = "0.0.0.0"
    port: int = 9092
    advertised_host: str | None = (
        None  # what Metadata tells clients; defaults to host, or localhost
    )
    broker_id: int = 1
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090  # 0 turns the /metrics endpoint off
    # Prometheus' web config file (--web.config.file): TLS and basic auth for /metrics
    metrics_web_config: Path | None = None
    # Confluent-compatible schema registry REST API, bound to ``host``; 0 turns it off.
    schema_registry_port: int = 8081
    # "basic": every REST request needs HTTP Basic auth against the SCRAM users (none:
    # Confluent's default, every caller is User:ANONYMOUS); ACLs apply when the authorizer is on.
    schema_registry_authentication: str = "none"
    # "https" serves the REST API over TLS (Confluent's listeners=https://...), forwarded
    # writes between brokers too; each file defaults to the Kafka listener's ssl_* one.
    schema_registry_protocol: str = "http"
    schema_registry_ssl_certfile: Path | None = None
    schema_registry_ssl_keyfile: Path | None = None
    schema_registry_ssl_cafile: Path | None = None  # also what forwarding checks leaders by
    # Confluent's ssl.client.authentication: REQUIRED, REQUESTED or NONE
    schema_registry_ssl_client_auth: str = "none"
    tracing: bool = True
    num_partitions: int = 1  # Kafka's num.partitions: for auto-created and -1 requests
    auto_create_topics_enable: bool = True  # Kafka's auto.create.topics.enable
    max_request_bytes: int = 100 * 1024 * 1024  # Kafka's socket.request.max.bytes
    # Kafka's queued.max.request.bytes: request frames being read or handled hold at most
    # this much memory broker-wide; a connection whose next frame does not fit is not read
    # until memory is released. At least max_request_bytes, so any one frame fits.
    queued_max_request_bytes: int = 256 * 1024 * 1024
    connections_max_idle_ms: int = 600_000  # Kafka's connections.max.idle.ms; <= 0: never
    # Kafka's max.connections. 0: automatic, half of what the open-file limit leaves after
    # datadir.FD_RESERVE descriptors, so log segments, /metrics and telemetry export keep theirs.
    max_connections: int = 0
    max_connections_per_ip: int = 0  # Kafka's max.connections.per.ip; 0: max_connections
    # Kafka's max.connection.creation.rate (KIP-612): new connections per second across
    # every address; a connection over it is held unread up to one quota window, then
    # closed. 0: unlimited (Kafka's default, Int.MaxValue).
    max_connection_creation_rate: int = 0
    fetch_max_bytes: int = 55 * 1024 * 1024  # Kafka's fetch.max.bytes: caps every Fetch response
    maintenance_interval_ms: int = 30_000  # retention, compaction and flush.ms checks
    shutdown_timeout_s: float = 30.0
    # Consumer groups, named as Kafka names them (group.initial.rebalance.delay.ms, ...)
    group_initial_rebalance_delay_ms: int = 3000
    group_min_session_timeout_ms: int = 6000
    group_max_session_timeout_ms: int = 1_800_000
    # The consumer group protocol (KIP-848): a member sends no heartbeat for the session
    # timeout and is removed; the heartbeat interval is what members are told to keep.
    group_consumer_session_timeout_ms: int = 45_000
    group_consumer_heartbeat_interval_ms: int = 5000
    offsets_retention_minutes: int = 7 * 24 * 60
    offsets_topic_num_partitions: int = 50  # Kafka's default
    # The cluster (see streambus/cluster): without a controller quorum the broker is a
    # one-node cluster of itself. ``broker_id`` is the node id (``--node-id``).
    controller_quorum: str | None = None  # "1@host:9193,2@host:9193,3@host:9193"
    raft_port: int = 9193  # for quorum entries given without a port
    cluster_secret: str | None = None  # required with more than one voter
    broker_session_timeout_ms: int = 9000  # Kafka's broker.session.timeout.ms
    broker_heartbeat_interval_ms: int = 2000  # Kafka's broker.heartbeat.interval.ms
    # Replication, named as Kafka names it. min.insync.replicas and
    # unclean.leader.election.enable are topic configs (topic defaults and overrides).
    replica_lag_time_max_ms: int = 30_000  # an ISR follower this far behind is taken out
    replica_fetch_wait_max_ms: int = 500  # a follower's Fetch long-polls this long
    replica_fetch_max_bytes: int = 1024 * 1024  # per partition, per follower Fetch
    replica_fetch_response_max_bytes: int = 10 * 1024 * 1024  # per follower Fetch
    # Partitions this broker hosts at most (internal ones included); CreateTopics beyond it
    # is refused. The open-files limit may allow fewer (3 descriptors per partition).
    max_partitions: int = 10_000
    # Replica placement and leadership (Kafka's names): default.replication.factor for
    # CreateTopics with -1 and auto-created topics; __consumer_offsets is created with
    # min(offsets.topic.replication.factor, live brokers) replicas; the controller moves
    # leaders back to preferred replicas every leader.imbalance.check.interval.seconds.
    default_replication_factor: int = 1
    offsets_topic_replication_factor: int = 3
    auto_leader_rebalance_enable: bool = True
    leader_imbalance_check_interval_seconds: int = 300
    # Transactions (Kafka's names): __transaction_state is created with
    # min(transaction.state.log.replication.factor, live brokers) replicas.
    transaction_state_log_num_partitions: int = 50
    transaction_state_log_replication_factor: int = 3
    transaction_state_log_min_isr: int = 2
    transaction_max_timeout_ms: int = 900_000
    transaction_abort_timed_out_transaction_cleanup_interval_ms: int = 10_000
    # Client quotas (Kafka's quota.window.num, quota.window.size.seconds): byte rates are
    # measured over this many samples of this many seconds each.
    quota_window_num: int = 11
    quota_window_size_seconds: float = 1.0
    # Kafka's max.incremental.fetch.session.cache.slots: fetch sessions (KIP-227) kept
    max_incremental_fetch_session_cache_slots: int = 1000
    # Authorization (Kafka's names): "acl" turns the ACL authorizer on (off: everyone may do
    # everything, as before); super_users is Kafka's super.users ("User:a;User:b").
    authorizer: str = "none"
    super_users: str = ""
    allow_everyone_if_no_acl_found: bool = False
    # The audit log: JSON lines, rotated at audit_log_max_bytes, audit_log_backup_count kept.
    # Denials are always audited, allowed checks when audit_log_allowed is on.
    audit_log: Path | None = None
    audit_log_allowed: bool = False
    audit_log_max_bytes: int = 100 * 1024 * 1024
    audit_log_backup_count: int = 10
    # Listeners and security (Kafka's names; see streambus.security). ``listeners``
    # ("PLAINTEXT://0.0.0.0:9092,SASL_SSL://0.0.0.0:9093") replaces host/port when set.
    listeners: str | None = None
    advertised_listeners: str | None = None
    listener_security_protocol_map: str | None = None  # "INTERNAL:PLAINTEXT,EXTERNAL:SASL_SSL"
    inter_broker_listener_name: str | None = None  # default: the first listener
    ssl_certfile: Path | None = None  # PEM server certificate (chain)
    ssl_keyfile: Path | None = None  # PEM private key; None: in the certificate file
    ssl_cafile: Path | None = None  # PEM CAs that client certificates are checked against
    ssl_client_auth: str = "none"  # Kafka's ssl.client.auth: required, requested or none
    sasl_enabled_mechanisms: str = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    # This broker's own connections to other brokers (replica fetches, transaction markers)
    # speak the inter-broker listener's protocol: on SASL with this mechanism (Kafka's
    # sasl.mechanism.inter.broker.protocol) as this user, whose password is given either
    # way (the file's first line, read at each login, keeps it out of the environment).
    sasl_mechanism_inter_broker_protocol: str = "PLAIN"
    inter_broker_sasl_username: str | None = None
    inter_broker_sasl_password: str | None = None
    inter_broker_sasl_password_file: Path | None = None
    # Kafka's ssl.endpoint.identification.algorithm: "https" checks that a broker's
    # certificate names the host it was dialed at; "" only checks that the CA signed it.
    ssl_endpoint_identification_algorithm: str = "https"
    connection_failed_authentication_delay_ms: int = 100
    connections_max_reauth_ms: int = 0  # 0: a SASL session never expires
    # SASL/OAUTHBEARER (KIP-768's names): JWTs checked against the issuer's JWKS
    # (file://, http://, https://), refetched every refresh.ms and on an unknown kid (at
    # most once per retry.backoff.ms); expected_audience is a comma-separated list.
    sasl_oauthbearer_jwks_endpoint_url: str | None = None
    sasl_oauthbearer_jwks_endpoint_refresh_ms: int = 3_600_000
    sasl_oauthbearer_jwks_endpoint_retry_backoff_ms: int = 100
    sasl_oauthbearer_clock_skew_seconds: int = 30
    sasl_oauthbearer_expected_audience: str | None = None
    sasl_oauthbearer_expected_issuer: str | None = None
    sasl_oauthbearer_sub_claim_name: str = "sub"
    sasl_oauthbearer_scope_claim_name: str = "scope"
    topic_defaults: TopicConfig = dataclasses.field(default_factory=TopicConfig)

    @property
    def authorizer_enabled(self) -> bool:
        return self.authorizer.lower() in AUTHORIZER_ON

    @property
    def advertised(self) -> str:
        if self.listeners:  # the inter-broker listener's: what this broker registers
            return self.inter_broker_listener().advertised_host
        if self.advertised_host:
            return self.advertised_host
        return "localhost" if self.host in ("0.0.0.0", "::", "") else self.host

    def listener_list(self) -> tuple[Listener, ...]:
        """The listeners to serve, in order (raises InvalidConfigError)."""
        return parse_listeners(
            self.listeners,
            self.advertised_listeners,
            self.listener_security_protocol_map,
            self.host,
            self.port,
            self.advertised_host,
        )

    def schema_registry_tls(self) -> RegistryTls | None:
        """The registry's HTTPS settings, each file defaulting to the Kafka listener's;
        None: plain HTTP (raises InvalidConfigError)."""
        return registry_tls(
            self.schema_registry_protocol,
            self.schema_registry_ssl_certfile or self.ssl_certfile,
            self.schema_registry_ssl_keyfile or self.ssl_keyfile,
            self.schema_registry_ssl_cafile or self.ssl_cafile,
            self.schema_registry_ssl_client_auth,
        )

    def inter_broker_listener(self) -> Listener:
        return find(self.listener_list(), self.inter_broker_listener_name)

    def sasl_mechanisms(self) -> tuple[str, ...]:
        names = tuple(
            m.strip().upper() for m in self.sasl_enabled_mechanisms.split(",") if m.strip()
        )
        for name in names:
            if name not in MECHANISMS:
                raise InvalidConfigError(
                    f"sasl.enabled.mechanisms: {name} is not one of {', '.join(MECHANISMS)}"
                )
        return names

    def oauthbearer_validator(self) -> OAuthBearerValidator | None:
        """The token validator when OAUTHBEARER is enabled (raises InvalidConfigError)."""
        if OAUTHBEARER not in self.sasl_mechanisms():
            return None
        return validator_from(
            self.sasl_oauthbearer_jwks_endpoint_url,
            self.sasl_oauthbearer_jwks_endpoint_refresh_ms,
            self.sasl_oauthbearer_jwks_endpoint_retry_backoff_ms,
            self.sasl_oauthbearer_clock_skew_seconds,
            self.sasl_oauthbearer_expected_audience,
            self.sasl_oauthbearer_expected_issuer,
            self.sasl_oauthbearer_sub_claim_name,
            self.sasl_oauthbearer_scope_claim_name,
            self.ssl_cafile,
        )

    def cluster(self) -> ClusterConfig:
        """The cluster core's view of these settings (raises InvalidConfigError)."""
        voters = (
            parse_quorum(self.controller_quorum, self.raft_port) if self.controller_quorum else ()
        )
        return ClusterConfig(
            node_id=self.broker_id,
            voters=voters,
            secret=self.cluster_secret or None,
            raft_dir=Path(self.data_dir) / "raft",
            session_timeout_ms=self.broker_session_timeout_ms,
            heartbeat_interval_ms=self.broker_heartbeat_interval_ms,
            auto_leader_rebalance_enable=self.auto_leader_rebalance_enable,
            leader_imbalance_check_interval_s=float(self.leader_imbalance_check_interval_seconds),
        )

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        topic_overrides: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> BrokerConfig:
        """Defaults, then ``STREAMBUS_*`` from ``env``, then ``overrides`` (flags; None = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        # KRaft's name for the broker id, as operators write it in compose files.
        node_id = env.get(ENV_PREFIX + "NODE_ID")
        if node_id is not None:
            values["broker_id"] = _convert("node_id", "int", node_id)
        for field in dataclasses.fields(cls):
            if field.name == "topic_defaults":
                continue
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = _convert(field.name, field.type, raw)
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        topic: dict[str, str] = {}
        for key in KAFKA_NAMES:
            raw = env.get(TOPIC_ENV_PREFIX + key.replace(".", "_").upper())
            if raw is not None:
                topic[key] = raw
        topic.update(topic_overrides or {})
        config = cls(**values, topic_defaults=TopicConfig().with_overrides(topic))
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("port", "metrics_port", "schema_registry_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise InvalidConfigError(f"{name} must be 0-65535, got {port}")
        if self.num_partitions < 1:
            raise InvalidConfigError(
                f"num.partitions must be at least 1, got {self.num_partitions}"
            )
        if self.fetch_max_bytes < 1:
            raise InvalidConfigError(
                f"fetch.max.bytes must be at least 1, got {self.fetch_max_bytes}"
            )
        if self.max_partitions < 1:
            raise InvalidConfigError(f"max partitions must be >= 1, got {self.max_partitions}")
        if self.broker_id < 0:
            raise InvalidConfigError(f"broker id must be >= 0, got {self.broker_id}")
        if self.max_connection_creation_rate < 0:
            raise InvalidConfigError(
                "max.connection.creation.rate must be >= 0 (0: unlimited), "
                f"got {self.max_connection_creation_rate}"
            )
        for name in ("max_connections", "max_connections_per_ip"):
            if getattr(self, name) < 0:
                raise InvalidConfigError(
                    f"{name.replace('_', '.')} must be >= 0 (0: automatic), "
                    f"got {getattr(self, name)}"
                )
        if not 0 < self.raft_port < 65536:
            raise InvalidConfigError(f"raft port must be 1-65535, got {self.raft_port}")
        if self.offsets_topic_num_partitions < 1:
            raise InvalidConfigError("offsets.topic.num.partitions must be at least 1")
        for name in (
            "transaction_state_log_num_partitions",
            "transaction_state_log_replication_factor",
            "transaction_state_log_min_isr",
            "transaction_max_timeout_ms",
            "transaction_abort_timed_out_transaction_cleanup_interval_ms",
        ):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name.replace('_', '.')} must be at least 1")
        for name in (
            "default_replication_factor",
            "offsets_topic_replication_factor",
            "replica_lag_time_max_ms",
            "replica_fetch_wait_max_ms",
            "replica_fetch_max_bytes",
            "replica_fetch_response_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name.replace('_', '.')} must be at least 1")
        if self.quota_window_num < 1 or not self.quota_window_size_seconds > 0:
            raise InvalidConfigError("quota.window.num and quota.window.size.seconds must be > 0")
        if self.max_incremental_fetch_session_cache_slots < 0:
            raise InvalidConfigError("max.incremental.fetch.session.cache.slots must be >= 0")
        if self.authorizer.lower() not in AUTHORIZER_ON + AUTHORIZER_OFF:
            raise InvalidConfigError(f"authorizer is 'acl' or 'none', not {self.authorizer!r}")
        if self.schema_registry_authentication not in ("none", "basic"):
            raise InvalidConfigError(
                "schema registry authentication is 'none' or 'basic', not "
                f"{self.schema_registry_authentication!r}"
            )
        tls = self.schema_registry_tls()
        if tls is not None and self.schema_registry_port:
            tls.server()  # the files load and the client auth is known
        if self.audit_log_max_bytes < 1 or self.audit_log_backup_count < 0:
            raise InvalidConfigError("audit log max bytes must be >= 1 and backup count >= 0")
        self.cluster()  # quorum syntax, secret, timings
        listeners = self.listener_list()
        self.sasl_mechanisms()
        self.oauthbearer_validator()
        inter_broker = self.sasl_mechanism_inter_broker_protocol.strip().upper()
        if inter_broker not in INTER_BROKER_MECHANISMS:
            raise InvalidConfigError(
                f"sasl.mechanism.inter.broker.protocol: {inter_broker} is not one of "
                f"{', '.join(INTER_BROKER_MECHANISMS)}"
            )
        if any(x.protocol.tls for x in listeners):
            server_context(
                self.ssl_certfile, self.ssl_keyfile, self.ssl_cafile, self.ssl_client_auth
            )
        if self.controller_quorum:
            # this broker dials the others on the inter-broker listener: its credentials
            # and TLS files must be usable now, not at the first replica fetch
            InterBrokerSecurity.from_config(self)
        if self.connection_failed_authentication_delay_ms < 0 or self.connections_max_reauth_ms < 0:
            raise InvalidConfigError(
                "connection.failed.authentication.delay.ms and connections.max.reauth.ms "
                "must be >= 0"
            )
        if self.queued_max_request_bytes < self.max_request_bytes:
            raise InvalidConfigError(
                f"queued.max.request.bytes ({self.queued_max_request_bytes}) must be at least "
                f"socket.request.max.bytes ({self.max_request_bytes}), or no frame of that "
                "size could ever be read"
            )


def _convert(name: str, kind: Any, raw: str) -> Any:
    text = str(kind)
    try:
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "Path" in text:
            return Path(raw)
        if "float" in text:
            return float(raw)
        if "int" in text:
            return int(raw)
    except ValueError:
        raise InvalidConfigError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}"
        ) from None
    return raw
