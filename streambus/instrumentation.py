"""The broker's telemetry facade: every metric and span StreamBus emits goes through here.

The broker calls domain-named methods (``produced``, ``fetched``, ``request_done``)
and never touches an instrument. Instruments are created once from the
``MeterProvider`` handed in (the OpenTelemetry API only; the SDK lives in the
``telemetry`` package), so with no SDK installed each call is a no-op costing a
fraction of a microsecond.

Cost rules (see DESIGN.md): one ``add``/``record`` per request or per batch,
never per message; state the broker already keeps (uptime, connections, topics,
disk usage) is read by observable instruments when a reader collects.

Every series carries ``broker_id``; attribute dicts are built once per
(topic, partition) and cached, because building them per request would cost as
much as the ``add`` itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

log = logging.getLogger("streambus.telemetry")

SCOPE = "streambus"
MAX_LINKS = 32  # a span linking to every record of a 10k-record fetch would be useless and costly
# Bytes of records searched for trace context per request or response: a span needs at most
# MAX_LINKS traceparents, and the search must stay linear and bounded in the request's size.
TRACE_SCAN_BYTES = 4 * 1024 * 1024
# streambus_transaction_duration_seconds buckets (seconds): transactions last up to minutes.
TXN_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THROTTLE_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Attrs = Mapping[str, AttributeValue]


class BrokerStats(Protocol):
    """What the observable instruments read from the broker at collection time."""

    def uptime_seconds(self) -> float: ...
    def status_code(self) -> int: ...
    def connection_count(self) -> int: ...
    def active_request_count(self) -> int: ...
    def request_memory_bytes(self) -> int: ...
    def topic_count(self) -> int: ...
    def partition_count(self) -> int: ...
    def segment_count(self) -> int: ...
    def storage_used_bytes(self) -> int: ...
    def storage_available_bytes(self) -> int: ...
    def group_count(self) -> int: ...
    def group_member_counts(self) -> Iterable[tuple[str, int]]: ...
    def group_rebalances(self) -> Iterable[tuple[str, int]]: ...  # group, rebalances completed
    def group_lags(self) -> Iterable[tuple[str, str, int, int]]: ...  # group, topic, partition, lag
    def storage_corruptions(self) -> Iterable[tuple[str, int, int]]: ...  # topic, partition, count
    def offline_partition_count(self) -> int: ...
    def cluster_size(self) -> int: ...  # live (registered, unfenced) brokers
    def cluster_leader(self) -> int: ...  # 1 while this node is the Raft leader
    def controller_id(self) -> int: ...  # -1 while there is none
    def raft_term(self) -> int: ...
    def raft_commit_index(self) -> int: ...
    def partitions_led(self) -> int: ...
    def replica_count(self) -> int: ...  # partition replicas this broker hosts
    def under_replicated_count(self) -> int: ...  # led here, ISR smaller than replicas
    def under_min_isr_count(self) -> int: ...  # led here, ISR below min.insync.replicas
    def replica_lags(self) -> Iterable[tuple[str, int, int]]: ...  # topic, partition, messages
    def storage_write_failing(self) -> int: ...  # 1 while writes to the data dir fail
    def storage_write_errors(self) -> Iterable[tuple[str, int]]: ...  # reason, failed writes
    def transactions_active(self) -> int: ...  # Ongoing + Prepare* held by this coordinator
    def transaction_oldest_open_seconds(self) -> float: ...  # 0 when none is open
    def schema_count(self) -> int: ...  # schema ids the registry holds
    def schema_subject_count(self) -> int: ...  # subjects with a live version


class BrokerTelemetry:
    def __init__(
        self,
        stats: BrokerStats,
        broker_id: int,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._stats = stats
        self._base: dict[str, AttributeValue] = {"broker_id": str(broker_id)}
        self._tp_attrs: dict[tuple[str, int], Attrs] = {}
        self._topic_attrs: dict[str, Attrs] = {}
        self._api_attrs: dict[str, Attrs] = {}
        self._error_attrs: dict[tuple[str, str], Attrs] = {}
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE)
        self.tracer: Tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()

        counter = meter.create_counter
        self._messages_produced = counter(
            "streambus.messages.produced", "{message}", "Total number of messages produced"
        )
        self._bytes_produced = counter(
            "streambus.bytes.produced",
            "{byte}",
            "Total record bytes produced (key + value + header bytes)",
        )
        self._messages_consumed = counter(
            "streambus.messages.consumed", "{message}", "Total number of messages consumed"
        )
        self._bytes_consumed = counter(
            "streambus.bytes.consumed",
            "{byte}",
            "Total record bytes consumed (key + value + header bytes)",
        )
        self._messages_stored = counter(
            "streambus.messages.stored", "{message}", "Total number of messages stored"
        )
        self._bytes_stored = counter(
            "streambus.bytes.stored",
            "{byte}",
            "Total record bytes stored (key + value + header bytes)",
        )
        self._net_in = counter(
            "streambus.network.bytes_in", "{byte}", "Total bytes received from clients"
        )
        self._net_out = counter(
            "streambus.network.bytes_out", "{byte}", "Total bytes sent to clients"
        )
        self._requests = counter(
            "streambus.network.requests", "{request}", "Total Kafka protocol requests, by API"
        )
        self._errors = counter(
            "streambus.network.errors",
            "{error}",
            "Total errors returned or raised while serving requests, by API and Kafka error",
        )
        self._compactions = counter(
            "streambus.compactions", "{compaction}", "Total log compactions run"
        )
        self._auth_attempts = counter(
            "streambus.authentication.attempts",
            "{attempt}",
            "SASL authentications and TLS client certificates presented, by mechanism and listener",
        )
        self._auth_failures = counter(
            "streambus.authentication.failures",
            "{attempt}",
            "Authentications refused, by mechanism, listener and reason",
        )
        self._rejected = counter(
            "streambus.connections.rejected",
            "{connection}",
            "Connections closed on accept for a connection limit, by limit",
        )
        self._idle_closed = counter(
            "streambus.connections.idle_closed",
            "{connection}",
            "Connections closed after connections.max.idle.ms without traffic",
        )
        self._loop_lag = meter.create_histogram(
            "streambus.event_loop.lag",
            "s",
            "How late the event loop ran a timer due now: its stalls, every client waits them",
        )
        self._reason_attrs: dict[str, Attrs] = {}
        # Authorization (streambus.security): counted per request and resource
        self._authz_checks = counter(
            "streambus.authorization.checks",
            "{check}",
            "ACL authorization checks, by operation and resource type",
        )
        self._authz_denials = counter(
            "streambus.authorization.denials",
            "{check}",
            "ACL authorization checks denied, by operation and resource type",
        )
        self._audit_events = counter(
            "streambus.audit.events_logged",
            "{event}",
            "Audit events logged (file or OpenTelemetry logs), by type",
        )
        self._authz_attrs: dict[tuple[str, str], Attrs] = {}
        # Schema validation of produced records (streambus.schemas.validation)
        self._schema_validations = counter(
            "streambus.schema.validations",
            "{record}",
            "Produced records checked against the schema registry, by topic",
        )
        self._schema_validation_errors = counter(
            "streambus.schema.validation_errors",
            "{record}",
            "Produced records refused by schema validation, by topic and reason",
        )
        self._schema_error_attrs: dict[tuple[str, str], Attrs] = {}
        self._produce_latency = meter.create_histogram(
            "streambus.produce.latency", "s", "Produce request latency in seconds"
        )
        self._consume_latency = meter.create_histogram(
            "streambus.consume.latency", "s", "Consume (Fetch) request latency in seconds"
        )
        self._replication_latency = meter.create_histogram(
            "streambus.replication.latency",
            "s",
            "Time from a leader's append of a batch until every in-sync replica has it "
            "(the high watermark covers it), one observation per batch",
        )
        self._isr_changes = counter(
            "streambus.isr.changes",
            "{change}",
            "ISR changes this broker made as leader, by kind (shrink, expand)",
        )
        self._replicated_messages = counter(
            "streambus.replication.messages",
            "{message}",
            "Messages this broker copied from leaders as a follower",
        )
        self._replicated_bytes = counter(
            "streambus.replication.bytes",
            "{byte}",
            "Record batch bytes this broker copied from leaders as a follower",
        )
        meter.create_observable_gauge(
            "streambus.replica.lag",
            [self._observe_many("replica lag", self._replica_lags)],
            unit="{message}",
            description="Messages the slowest follower of a partition led here is behind",
        )
        self._commit_latency = meter.create_histogram(
            "streambus.commit.latency", "s", "Offset commit (OffsetCommit) latency in seconds"
        )
        meter.create_observable_gauge(
            "streambus.consumer_group.members.total",
            [self._observe_many("group members", self._group_members)],
            unit="{member}",
            description="Consumer group members",
        )
        meter.create_observable_counter(
            "streambus.consumer_group.rebalances",
            [self._observe_many("group rebalances", self._group_rebalances)],
            unit="{rebalance}",
            description="Consumer group rebalances completed (classic generations, "
            "consumer-protocol target assignments)",
        )
        meter.create_observable_counter(
            "streambus.storage.corruptions",
            [self._observe_many("storage corruptions", self._corruptions)],
            unit="{region}",
            description="Corrupt regions found in partition logs (skipped, never served)",
        )
        meter.create_observable_gauge(
            "streambus.consumer_group.lag",
            [self._observe_many("group lag", self._group_lags)],
            unit="{message}",
            description="Consumer group lag: log end offset minus committed offset",
        )
        meter.create_observable_counter(
            "streambus.storage.write_errors",
            [self._observe_many("storage write errors", self._storage_write_errors)],
            unit="{error}",
            description="Failed writes to the data directory, by errno name (ENOSPC, EIO, ...)",
        )

        # Transactions (the coordinator's): ended ones counted as their markers complete.
        self._txn_committed = counter(
            "streambus.transactions.committed",
            "{transaction}",
            "Transactions committed by this coordinator (markers written)",
        )
        self._txn_aborted = counter(
            "streambus.transactions.aborted",
            "{transaction}",
            "Transactions aborted by this coordinator, by reason (client, timeout, fenced)",
        )
        # Unit-less name ending in _seconds: the latency view (unit "s") would otherwise
        # replace these buckets, which span minutes where latency buckets stop at 5 s.
        self._txn_duration = meter.create_histogram(
            "streambus.transaction.duration_seconds",
            "",
            "Transaction duration: first AddPartitionsToTxn to its markers complete",
            explicit_bucket_boundaries_advisory=TXN_DURATION_BUCKETS,
        )
        self._txn_attrs: dict[tuple[bool, str], Attrs] = {}
        # Unit-less for the same reason: a throttle lasts up to the whole quota window.
        self._throttle_time = meter.create_histogram(
            "streambus.throttle_time_seconds",
            "",
            "Throttle time given to clients under a quota, one observation per request "
            "(0 when within it), by type (produce, fetch)",
            explicit_bucket_boundaries_advisory=THROTTLE_BUCKETS,
        )
        # The schema registry: registrations, and its REST requests by route and status.
        self._schemas_registered = counter(
            "streambus.schemas.registered",
            "{schema}",
            "Schema versions registered (a re-registration of a subject's schema is not one)",
        )
        self._registry_requests = counter(
            "streambus.schema_registry.requests",
            "{request}",
            "Schema registry REST requests, by route template, method and HTTP status",
        )
        self._registry_duration = meter.create_histogram(
            "streambus.schema_registry.request_duration",
            "s",
            "Schema registry REST request latency, by route template and method",
        )
        self._registry_attrs: dict[tuple[str, str, int], Attrs] = {}
        self._schema_type_attrs: dict[str, Attrs] = {}
        gauges: Sequence[tuple[str, str, str, Callable[[], float]]] = (
            ("streambus.broker.uptime", "s", "Broker uptime in seconds", stats.uptime_seconds),
            (
                "streambus.broker.status",
                "{status}",
                "Broker status (0=stopped, 1=starting, 2=running, 3=stopping)",
                stats.status_code,
            ),
            (
                "streambus.broker.connections",
                "{connection}",
                "Active client connections",
                stats.connection_count,
            ),
            (
                "streambus.broker.active_requests",
                "{request}",
                "Requests being processed",
                stats.active_request_count,
            ),
            (
                "streambus.network.request_memory",
                "By",
                "Bytes reserved by request frames being read or handled (queued.max.request.bytes)",
                stats.request_memory_bytes,
            ),
            ("streambus.topics.total", "{topic}", "Total number of topics", stats.topic_count),
            (
                "streambus.partitions.total",
                "{partition}",
                "Total number of partitions",
                stats.partition_count,
            ),
            (
                "streambus.replicas.total",
                "{replica}",
                "Partition replicas hosted by this broker (led and followed)",
                stats.replica_count,
            ),
            (
                "streambus.under_replicated.partitions",
                "{partition}",
                "Partitions led here whose ISR is smaller than their replica set",
                stats.under_replicated_count,
            ),
            (
                "streambus.under_min_isr.partitions",
                "{partition}",
                "Partitions led here whose ISR is below min.insync.replicas (acks=all refused)",
                stats.under_min_isr_count,
            ),
            ("streambus.segments.total", "{segment}", "Total log segments", stats.segment_count),
            (
                "streambus.consumer_groups.total",
                "{group}",
                "Total consumer groups",
                stats.group_count,
            ),
            (
                "streambus.storage.used",
                "By",
                "Bytes used by partition logs in the data directory",
                stats.storage_used_bytes,
            ),
            (
                "streambus.offline.partitions",
                "{partition}",
                "Partitions that cannot be served: found on disk unreadable, or without a leader",
                stats.offline_partition_count,
            ),
            ("streambus.cluster.size", "{broker}", "Live registered brokers", stats.cluster_size),
            (
                "streambus.cluster.leader",
                "{state}",
                "1 on the broker that is the Raft leader (the controller), else 0",
                stats.cluster_leader,
            ),
            (
                "streambus.controller.id",
                "{node}",
                "Node id of the controller as this broker knows it, -1 if none",
                stats.controller_id,
            ),
            ("streambus.raft.term", "{term}", "The Raft term", stats.raft_term),
            (
                "streambus.raft.commit_index",
                "{entry}",
                "Index of the last committed Raft log entry",
                stats.raft_commit_index,
            ),
            (
                "streambus.partitions.leader",
                "{partition}",
                "Partitions this broker leads",
                stats.partitions_led,
            ),
            (
                "streambus.storage.write_failing",
                "{state}",
                "1 while writes to the data directory fail (disk full, I/O error), else 0",
                stats.storage_write_failing,
            ),
            (
                "streambus.transactions.active",
                "{transaction}",
                "Open transactions (Ongoing, PrepareCommit, PrepareAbort) this coordinator holds",
                stats.transactions_active,
            ),
            (
                "streambus.transaction.oldest_open",
                "s",
                "Age of the oldest open transaction this coordinator holds (0: none)",
                stats.transaction_oldest_open_seconds,
            ),
            (
                "streambus.schemas",
                "{schema}",
                "Schemas (distinct ids) held by the schema registry",
                stats.schema_count,
            ),
            (
                "streambus.schema_subjects",
                "{subject}",
                "Schema registry subjects with at least one version not deleted",
                stats.schema_subject_count,
            ),
            (
                "streambus.storage.available",
                "By",
                "Bytes available on the data directory's filesystem",
                stats.storage_available_bytes,
            ),
        )
        for name, unit, description, read in gauges:
            meter.create_observable_gauge(
                name, [self._observe(name, read)], unit=unit, description=description
            )

    # -- attribute caches ------------------------------------------------------------
    def tp_attrs(self, topic: str, partition: int) -> Attrs:
        key = (topic, partition)
        attrs = self._tp_attrs.get(key)
        if attrs is None:
            attrs = self._tp_attrs[key] = {
                **self._base,
                "topic": topic,
                "partition": str(partition),
            }
        return attrs

    def topic_attrs(self, topic: str) -> Attrs:
        attrs = self._topic_attrs.get(topic)
        if attrs is None:
            attrs = self._topic_attrs[topic] = {**self._base, "topic": topic}
        return attrs

    def forget_topic(self, topic: str) -> None:
        self._topic_attrs.pop(topic, None)
        for schema_key in [k for k in self._schema_error_attrs if k[0] == topic]:
            del self._schema_error_attrs[schema_key]
        for key in [k for k in self._tp_attrs if k[0] == topic]:
            del self._tp_attrs[key]

    def _observe(
        self, name: str, read: Callable[[], float]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        base = self._base

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return [Observation(read(), base)]
            except Exception:  # a failed reading must not break the scrape of every other metric
                log.exception("reading %s failed", name)
                return []

        return callback

    def _observe_many(
        self, what: str, read: Callable[[], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return list(read())
            except Exception:  # a failed reading must not break the scrape of every other metric
                log.exception("reading %s failed", what)
                return []

        return callback

    def _group_members(self) -> Iterable[Observation]:
        for group, count in self._stats.group_member_counts():
            yield Observation(count, {**self._base, "group": group})

    def _replica_lags(self) -> Iterable[Observation]:
        for topic, partition, lag in self._stats.replica_lags():
            yield Observation(lag, self.tp_attrs(topic, partition))

    def _corruptions(self) -> Iterable[Observation]:
        for topic, partition, count in self._stats.storage_corruptions():
            yield Observation(count, self.tp_attrs(topic, partition))

    def _group_rebalances(self) -> Iterable[Observation]:
        for group, count in self._stats.group_rebalances():
            yield Observation(count, {**self._base, "group": group})

    def _group_lags(self) -> Iterable[Observation]:
        for group, topic, partition, lag in self._stats.group_lags():
            attrs = {**self._base, "group": group, "topic": topic, "partition": str(partition)}
            yield Observation(lag, attrs)

    def _storage_write_errors(self) -> Iterable[Observation]:
        for reason, count in self._stats.storage_write_errors():
            yield Observation(count, {**self._base, "reason": reason})

    # -- events the broker reports ------------------------------------------------------
    def request_done(self, api: str, bytes_in: int, bytes_out: int) -> None:
        attrs = self._api_attrs.get(api)
        if attrs is None:
            attrs = self._api_attrs[api] = {**self._base, "api": api}
        self._requests.add(1, attrs)
        self._net_in.add(bytes_in, self._base)
        if bytes_out:
            self._net_out.add(bytes_out, self._base)

    def error(self, api: str, error: str, count: int = 1) -> None:
        key = (api, error)
        attrs = self._error_attrs.get(key)
        if attrs is None:
            attrs = self._error_attrs[key] = {**self._base, "api": api, "error": error}
        self._errors.add(count, attrs)

    def produced(self, topic: str, partition: int, messages: int, payload: int) -> None:
        attrs = self.tp_attrs(topic, partition)
        self._messages_produced.add(messages, attrs)
        self._bytes_produced.add(payload, attrs)

    def stored(self, topic: str, partition: int, messages: int, payload: int) -> None:
        attrs = self.tp_attrs(topic, partition)
        self._messages_stored.add(messages, attrs)
        self._bytes_stored.add(payload, attrs)

    def consumed(self, topic: str, partition: int, messages: int, payload: int) -> None:
        attrs = self.tp_attrs(topic, partition)
        self._messages_consumed.add(messages, attrs)
        self._bytes_consumed.add(payload, attrs)

    def produce_latency(self, topic: str, seconds: float) -> None:
        self._produce_latency.record(seconds, self.topic_attrs(topic))

    def consume_latency(self, topic: str, seconds: float) -> None:
        self._consume_latency.record(seconds, self.topic_attrs(topic))

    def replication_latency(self, topic: str, seconds: float) -> None:
        self._replication_latency.record(seconds, self.topic_attrs(topic))

    def replicated(self, topic: str, messages: int, nbytes: int) -> None:
        attrs = self.topic_attrs(topic)
        self._replicated_messages.add(messages, attrs)
        self._replicated_bytes.add(nbytes, attrs)

    def isr_changed(self, kind: str, count: int = 1) -> None:
        attrs = self._reason_attrs.get("isr:" + kind)
        if attrs is None:
            attrs = self._reason_attrs["isr:" + kind] = {**self._base, "kind": kind}
        self._isr_changes.add(count, attrs)

    def child_span(self, name: str, parent: trace.Span, attributes: Attrs) -> trace.Span:
        """An INTERNAL span under ``parent`` (a step of the request it serves)."""
        context = trace.set_span_in_context(parent)
        return self.tracer.start_span(name, context, SpanKind.INTERNAL, attributes)

    def transaction_ended(self, committed: bool, reason: str, seconds: float | None) -> None:
        """One transaction completed (its markers written): counted, and its duration."""
        key = (committed, reason)
        attrs = self._txn_attrs.get(key)
        if attrs is None:
            attrs = self._txn_attrs[key] = (
                self._base if committed else {**self._base, "reason": reason}
            )
        (self._txn_committed if committed else self._txn_aborted).add(1, attrs)
        if seconds is not None:
            self._txn_duration.record(max(seconds, 0.0), self._base)

    def start_txn_span(
        self, transactional_id: str, outcome: str, reason: str, partitions: Sequence[str]
    ) -> trace.Span:
        """The span of one transaction's end (EndTxn, or the coordinator's own abort);
        marker writes are its children."""
        return self.tracer.start_span(
            "EndTxn",
            Context(),
            SpanKind.SERVER if reason == "client" else SpanKind.INTERNAL,
            {
                "messaging.system": "kafka",
                "streambus.txn.id": transactional_id,
                "streambus.txn.outcome": outcome,
                "streambus.txn.reason": reason,
                "streambus.txn.partitions": list(partitions),
            },
        )

    def commit_latency(self, group: str, seconds: float) -> None:
        self._commit_latency.record(seconds, {**self._base, "group": group})

    @contextlib.contextmanager
    def group_span(self, operation: str, group: str, member_id: str) -> Iterator[trace.Span]:
        """A span for one group round trip (join, sync, commit), so rebalances show in traces."""
        span = self.tracer.start_span(
            f"{operation} {group}",
            Context(),
            SpanKind.SERVER,
            {
                "messaging.system": "kafka",
                "messaging.operation.name": operation,
                "messaging.consumer.group.name": group,
                "streambus.member_id": member_id,
            },
        )
        try:
            yield span
        finally:
            span.end()

    def connection_rejected(self, reason: str) -> None:
        attrs = self._reason_attrs.get(reason)
        if attrs is None:
            attrs = self._reason_attrs[reason] = {**self._base, "reason": reason}
        self._rejected.add(1, attrs)

    def authentication(self, mechanism: str, listener: str, failure: str | None) -> None:
        """One authentication finished; ``failure`` is its reason (None: it succeeded)."""
        key = f"auth:{mechanism}:{listener}:{failure}"
        attrs = self._reason_attrs.get(key)
        if attrs is None:
            attrs = {**self._base, "mechanism": mechanism, "listener": listener}
            if failure is not None:
                attrs["reason"] = failure
            self._reason_attrs[key] = attrs
        self._auth_attempts.add(1, {k: v for k, v in attrs.items() if k != "reason"})
        if failure is not None:
            self._auth_failures.add(1, attrs)

    def throttle_time(self, kind: str, seconds: float) -> None:
        attrs = self._reason_attrs.get("throttle:" + kind)
        if attrs is None:
            attrs = self._reason_attrs["throttle:" + kind] = {**self._base, "type": kind}
        self._throttle_time.record(seconds, attrs)

    def authorization_checked(self, operation: str, resource_type: str, denied: bool) -> None:
        key = (operation, resource_type)
        attrs = self._authz_attrs.get(key)
        if attrs is None:
            attrs = self._authz_attrs[key] = {
                **self._base,
                "operation": operation,
                "resource_type": resource_type,
            }
        self._authz_checks.add(1, attrs)
        if denied:
            self._authz_denials.add(1, attrs)

    def audit_event(self, kind: str) -> None:
        attrs = self._reason_attrs.get("audit:" + kind)
        if attrs is None:
            attrs = self._reason_attrs["audit:" + kind] = {**self._base, "type": kind}
        self._audit_events.add(1, attrs)

    def connections_idle_closed(self, count: int) -> None:
        self._idle_closed.add(count, self._base)

    def event_loop_lag(self, seconds: float) -> None:
        self._loop_lag.record(seconds, self._base)

    def schema_validated(self, topic: str, records: int, errors: Mapping[str, int]) -> None:
        """One batch's schema checks: records checked, and the refused ones by reason."""
        self._schema_validations.add(records, self.topic_attrs(topic))
        for reason, count in errors.items():
            key = (topic, reason)
            attrs = self._schema_error_attrs.get(key)
            if attrs is None:
                attrs = self._schema_error_attrs[key] = {
                    **self.topic_attrs(topic),
                    "reason": reason,
                }
            self._schema_validation_errors.add(count, attrs)

    def compactions(self, count: int) -> None:
        if count:
            self._compactions.add(count, self._base)

    def schema_registered(self, schema_type: str) -> None:
        attrs = self._schema_type_attrs.get(schema_type)
        if attrs is None:
            attrs = self._schema_type_attrs[schema_type] = {**self._base, "type": schema_type}
        self._schemas_registered.add(1, attrs)

    def registry_span(self, method: str, route: str) -> trace.Span:
        """The SERVER span of one schema registry REST request, named by its route."""
        return self.tracer.start_span(
            f"{method} {route}",
            Context(),
            SpanKind.SERVER,
            {"http.request.method": method, "http.route": route},
        )

    def registry_request(
        self, method: str, route: str, status: int, seconds: float, span: trace.Span
    ) -> None:
        """One schema registry REST request answered: counted, timed, its span ended."""
        key = (method, route, status)
        attrs = self._registry_attrs.get(key)
        if attrs is None:
            attrs = self._registry_attrs[key] = {
                **self._base,
                "method": method,
                "route": route,
                "status": str(status),
            }
        self._registry_requests.add(1, attrs)
        self._registry_duration.record(seconds, attrs)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(trace.StatusCode.ERROR)
        span.end()

    # -- trace context carried in record headers ---------------------------------------
    def tracing_enabled(self) -> bool:
        """False when no SDK tracer provider is installed, so nothing is worth parsing."""
        return not isinstance(self.tracer, trace.NoOpTracer) and not (
            isinstance(self.tracer, trace.ProxyTracer)
            and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        )

    def contexts_from_traceparents(self, values: Iterable[bytes]) -> list[trace.SpanContext]:
        """Distinct valid span contexts from W3C ``traceparent`` header values."""
        seen: dict[tuple[int, int], trace.SpanContext] = {}
        for raw in values:
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                continue
            ctx = self._propagator.extract({"traceparent": text})
            span_ctx = trace.get_current_span(ctx).get_span_context()
            if span_ctx.is_valid:
                seen.setdefault((span_ctx.trace_id, span_ctx.span_id), span_ctx)
                if len(seen) >= MAX_LINKS:
                    break
        return list(seen.values())

    def start_record_span(
        self,
        operation: str,
        operation_type: str,
        partitions: Sequence[tuple[str, int]],
        message_count: int,
        producer_contexts: Sequence[trace.SpanContext] = (),
    ) -> trace.Span:
        """The span of one Produce or Fetch request, named and attributed by the OTel
        messaging conventions: ``<operation> <topic>`` when one topic is involved, with the
        partition when there is one."""
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "kafka",
            "messaging.operation.name": operation,
            "messaging.operation.type": operation_type,
            "messaging.batch.message_count": message_count,
        }
        name = operation
        topics = {topic for topic, _ in partitions}
        if len(topics) == 1:
            (topic,) = topics
            attributes["messaging.destination.name"] = topic
            name = f"{operation} {topic}"
        if len(partitions) == 1:
            attributes["messaging.destination.partition.id"] = str(partitions[0][1])
        return self.start_span(name, attributes, producer_contexts)

    def start_span(
        self, name: str, attributes: Attrs, producer_contexts: Sequence[trace.SpanContext]
    ) -> trace.Span:
        """A SERVER span; a child of the one producer context, or linked to several."""
        if len(producer_contexts) == 1:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(producer_contexts[0]))
            return self.tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        links = [Link(c) for c in producer_contexts]
        return self.tracer.start_span(name, Context(), SpanKind.SERVER, attributes, links)
