"""Connections that end: limits, idle timeout, bounded frame memory, long polls and shutdown.

Everything goes through real sockets: a broker on its own loop thread (or a
``streambus serve`` process), raw Kafka frames, and real scrapes of /metrics.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.consumer import FetchRequest
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest
from kafka.protocol.producer import ProduceRequest

from streambus.cli import build_parser, config_from_args
from streambus.config import BrokerConfig
from streambus.errors import InvalidConfigError
from streambus.records.batch import build_batch
from streambus.server import FD_RESERVE
from tests.harness import (
    BrokerProcess,
    BrokerThread,
    RawClient,
    fetch_request,
    scrape,
    total,
    wait_until,
)

FOREVER_MS = 2**31 - 1
TD = ProduceRequest.TopicProduceData
PD = TD.PartitionProduceData


def api_versions_ok(client: RawClient) -> bool:
    return bool(client.request(ApiVersionsRequest(), 3).error_code == 0)


def produce(client: RawClient, topic: str, values: list[bytes]) -> None:
    records = build_batch([(b"k", v, [], 1_700_000_000_000) for v in values])
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[TD(name=topic, partition_data=[PD(index=0, records=records)])],
    )
    response = client.request(request, 9)
    assert response.responses[0].partition_responses[0].error_code == 0


def fetch_of_nothing(max_wait_ms: int) -> Any:
    """A Fetch naming no topic at all: nothing can ever wake it but its deadline or a stop."""
    request = fetch_request("unused", max_wait_ms=max_wait_ms, min_bytes=1)
    request.topics = []
    return request


def send_only(client: RawClient, request: Any, version: int, correlation_id: int) -> None:
    request.with_header(correlation_id=correlation_id, client_id="raw-test")
    client.send_bytes(bytes(request.encode(version=version, header=True, framed=True)))


def connect_from(source_ip: str, bootstrap: str) -> socket.socket:
    host, port = bootstrap.rsplit(":", 1)
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source_ip, 0))
    sock.connect((host, int(port)))
    return sock


def closed_by_peer(sock: socket.socket, wait: float = 10) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def settle(b: BrokerThread) -> None:
    """Let the broker's loop turn a few times, so bytes already sent to it have been seen."""
    for _ in range(3):
        b.run(lambda: None)


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="streambus")
    return caplog


# -- limits ------------------------------------------------------------------------------------
def test_max_connections_refuses_the_excess_and_keeps_serving(
    tmp_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    with BrokerThread(tmp_path / "data", max_connections=3) as b, contextlib.ExitStack() as held:
        clients = [held.enter_context(RawClient(b.bootstrap)) for _ in range(3)]
        assert all(api_versions_ok(c) for c in clients)
        flood = [held.enter_context(RawClient(b.bootstrap)) for _ in range(50)]
        assert all(c.is_closed_by_peer() for c in flood)
        samples = scrape(b.metrics_url)
        assert (
            total(samples, "streambus_connections_rejected_total", reason="max_connections") == 50
        )
        assert total(samples, "streambus_broker_connections") == 3
        assert all(api_versions_ok(c) for c in clients)  # the admitted ones are still served
        refusals = [r for r in caplog_info.records if "refused connection" in r.getMessage()]
        # One line per cause per few seconds, not one per refused connection.
        assert 1 <= len(refusals) <= 3, [r.getMessage() for r in refusals]
        assert "max.connections=3" in refusals[0].getMessage()
        # A slot freed is a slot given: close one admitted client, a new one is served.
        clients[0].close()
        with RawClient(b.bootstrap) as again:
            assert api_versions_ok(again)


def test_max_connections_per_ip_counts_each_address(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", max_connections_per_ip=2) as b:
        first = [connect_from("127.0.0.1", b.bootstrap) for _ in range(2)]
        over = connect_from("127.0.0.1", b.bootstrap)
        other = connect_from("127.0.0.2", b.bootstrap)  # another address has its own quota
        try:
            assert closed_by_peer(over)
            assert not closed_by_peer(other, wait=0.2)
            assert not closed_by_peer(first[0], wait=0.2)
            samples = scrape(b.metrics_url)
            assert (
                total(
                    samples, "streambus_connections_rejected_total", reason="max_connections_per_ip"
                )
                == 1
            )
            assert total(samples, "streambus_broker_connections") == 3
        finally:
            for sock in [*first, over, other]:
                sock.close()


def test_connection_flood_at_a_low_descriptor_limit(tmp_path: Path) -> None:
    """With ``ulimit -n`` 1024 the automatic max.connections keeps descriptors in reserve: a
    flood of 1,200 connections is refused, not answered with EMFILE tracebacks, and both the
    clients already connected and /metrics keep being served."""
    limit = 1024

    def low_open_files_limit() -> None:  # in the child: soft and hard, so it cannot be raised
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = BrokerProcess(tmp_path / "data", preexec_fn=low_open_files_limit)
    proc.start()
    admitted = (limit - FD_RESERVE) // 2
    metrics_url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with contextlib.ExitStack() as held:
        held.callback(proc.__exit__, None, None, None)
        before = held.enter_context(RawClient(proc.bootstrap))
        assert api_versions_ok(before)
        flood = [held.enter_context(RawClient(proc.bootstrap)) for _ in range(1200)]

        def refused() -> float:
            return total(
                scrape(metrics_url),
                "streambus_connections_rejected_total",
                reason="max_connections",
            )

        assert wait_for(lambda: refused() == 1201 - admitted)
        assert total(scrape(metrics_url), "streambus_broker_connections") == admitted
        assert api_versions_ok(before)
        for client in flood:
            client.close()
        assert proc.stop() == 0
    text = proc.log_text()
    assert "Traceback" not in text
    assert "accept()" not in text
    assert "cannot accept" not in text
    assert text.count("refused connection") <= 5, text[-2000:]


# -- idleness ----------------------------------------------------------------------------------
def test_idle_and_stalled_connections_are_closed_but_long_polls_are_not(
    tmp_path: Path, caplog_info: pytest.LogCaptureFixture
) -> None:
    with BrokerThread(tmp_path / "data", connections_max_idle_ms=300) as b:
        b.run(b.broker.create_topic, "quiet", 1, {})
        with RawClient(b.bootstrap) as idle, RawClient(b.bootstrap) as stalled:
            stalled.send_bytes(struct.pack(">i", 1000) + b"\x00\x03\x00\x09")  # 8 of 1004 bytes
            assert idle.is_closed_by_peer(10)
            assert stalled.is_closed_by_peer(10)
        with RawClient(b.bootstrap) as polling:
            # A long poll three times the idle timeout is a request being handled, not idleness.
            response = polling.request(fetch_request("quiet", max_wait_ms=900, min_bytes=1), 12)
            assert response.responses[0].partitions[0].error_code == 0
            assert api_versions_ok(polling)
        samples = scrape(b.metrics_url)
        assert total(samples, "streambus_connections_idle_closed_total") >= 2
        # the ticker that looks for idle connections also measures the loop's lateness
        assert total(samples, "streambus_event_loop_lag_seconds_count") >= 1
    messages = [r.getMessage() for r in caplog_info.records if r.name == "streambus.server"]
    assert any("idle" in m for m in messages)
    assert not [r for r in caplog_info.records if r.levelno >= logging.WARNING]


def test_idle_timeout_closes_a_client_that_stops_reading_its_response(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", connections_max_idle_ms=300) as b:
        b.run(b.broker.create_topic, "big", 1, {})
        with RawClient(b.bootstrap) as writer:
            for _ in range(20):
                produce(writer, "big", [b"x" * 100_000] * 10)
        sock = small_receive_buffer_socket(b.bootstrap)
        try:
            request = fetch_request("big")
            request.with_header(correlation_id=1, client_id="raw-test")
            sock.sendall(bytes(request.encode(version=12, header=True, framed=True)))
            # 20 MB cannot fit the socket buffers: the broker waits on this client (which
            # reads nothing), then gives up on it.
            url = b.metrics_url
            assert wait_for(
                lambda: total(scrape(url), "streambus_connections_idle_closed_total") >= 1
            )
            samples = scrape(url)
            assert total(samples, "streambus_broker_connections") == 0
            assert total(samples, "streambus_network_request_memory_bytes") == 0
        finally:
            sock.close()


def small_receive_buffer_socket(bootstrap: str) -> socket.socket:
    host, port = bootstrap.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def read_frame(sock: socket.socket) -> bytearray:
    """One response frame, read into one buffer (a 20 MB frame arrives in 4 kB pieces)."""
    head = bytearray(4)
    receive_into(sock, memoryview(head))
    frame = bytearray(int.from_bytes(head, "big"))
    receive_into(sock, memoryview(frame))
    return frame


def receive_into(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("closed by the broker")
        view = view[n:]


# -- memory for frames in progress ------------------------------------------------------------
def test_partial_frames_hold_at_most_the_request_memory_pool(tmp_path: Path) -> None:
    size = 600_000
    with BrokerThread(
        tmp_path / "data",
        max_request_bytes=1024 * 1024,
        queued_max_request_bytes=2 * size,
        connections_max_idle_ms=3000,
    ) as b:
        b.run(b.broker.create_topic, "t", 1, {})
        stallers = [RawClient(b.bootstrap) for _ in range(2)]
        for client in stallers:
            # a frame announced at 600 kB, 300 kB of it sent, then nothing
            client.send_bytes(struct.pack(">ihhi", size, 0, 9, 1) + b"\x00" * 300_000)
        assert wait_for(lambda: b.run(lambda: b.broker._server.memory.used) == 2 * size)
        with RawClient(b.bootstrap) as third:
            records = build_batch([(b"k", b"v" * 500_000, [], 1_700_000_000_000)])
            request = ProduceRequest(
                transactional_id=None,
                acks=-1,
                timeout_ms=5000,
                topic_data=[TD(name="t", partition_data=[PD(index=0, records=records)])],
            )
            request.with_header(correlation_id=7, client_id="raw-test")
            frame = bytes(request.encode(version=9, header=True, framed=True))
            assert size >= len(frame) - 4 > size // 2  # it fits the pool only alone
            third.send_bytes(frame)

            def state() -> tuple[int, list[str]]:
                server = b.broker._server
                return server.memory.used, sorted(c.phase for c in server.connections)

            # Both stallers hold their reservations; the third frame waits, unread.
            waiting = (2 * size, ["queued", "reading", "reading"])
            assert wait_for(lambda: state() == waiting)
            settle(b)
            assert state() == waiting
            assert (
                total(scrape(b.metrics_url), "streambus_network_request_memory_bytes") == 2 * size
            )
            # The idle timeout closes the stallers; their memory goes to the waiting frame.
            response = third.read_response(type(request), 9)
            assert response.responses[0].partition_responses[0].error_code == 0
            assert all(c.is_closed_by_peer() for c in stallers)
        for client in stallers:
            client.close()
        assert wait_for(lambda: b.run(lambda: b.broker._server.memory.used) == 0)


def test_pipelined_requests_are_read_one_at_a_time(tmp_path: Path) -> None:
    """A client that sends five Fetches and reads nothing: the broker decodes the first,
    blocks writing its 20 MB answer, and reads none of the others meanwhile."""
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "big", 1, {})
        with RawClient(b.bootstrap) as writer:
            for _ in range(20):
                produce(writer, "big", [b"x" * 100_000] * 10)
        sock = small_receive_buffer_socket(b.bootstrap)
        try:
            frames = b""
            for correlation_id in range(1, 6):
                request = fetch_request("big")
                request.with_header(correlation_id=correlation_id, client_id="raw-test")
                frames += bytes(request.encode(version=12, header=True, framed=True))
            sock.sendall(frames)
            url = b.metrics_url
            assert wait_for(lambda: total(scrape(url), "streambus_messages_consumed_total") >= 200)
            settle(b)
            samples = scrape(url)
            assert total(samples, "streambus_network_requests_total", api="Fetch") == 0
            assert total(samples, "streambus_messages_consumed_total") == 200
            assert total(samples, "streambus_network_request_memory_bytes") == len(frames) // 5 - 4
            # Reading the answers lets the broker go on, one request after another.
            sock.settimeout(30)
            ids = [int.from_bytes(read_frame(sock)[:4], "big") for _ in range(5)]
            assert ids == [1, 2, 3, 4, 5]  # each frame starts with its correlation id
            assert total(scrape(url), "streambus_messages_consumed_total") == 1000
        finally:
            sock.close()


# -- long polls --------------------------------------------------------------------------------
def test_a_client_closing_during_a_long_poll_leaves_no_waiter(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "quiet", 1, {})
        url = b.metrics_url
        with RawClient(b.bootstrap) as one, RawClient(b.bootstrap) as two:
            send_only(one, fetch_request("quiet", max_wait_ms=FOREVER_MS, min_bytes=1), 12, 1)
            send_only(two, fetch_of_nothing(FOREVER_MS), 12, 1)
            assert wait_for(lambda: total(scrape(url), "streambus_broker_active_requests") == 2)
        assert wait_for(lambda: total(scrape(url), "streambus_broker_active_requests") == 0)
        assert wait_for(lambda: total(scrape(url), "streambus_broker_connections") == 0)
        waits = b.broker.partitions  # long polls wait in the partition service

        # (the schema registry's own tail of _schemas waits there too, and stays)
        def clients() -> tuple[dict[Any, Any], set[Any]]:
            waiting = waits._waiters.items()
            registry = {w for tp, ws in waiting if tp.topic == "_schemas" for w in ws}
            return (
                {tp: w for tp, w in waits._waiters.items() if tp.topic != "_schemas"},
                set(waits._long_polls) - registry,
            )

        assert b.run(clients) == ({}, set())


def test_sigterm_ends_long_polls_and_exits_cleanly(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data") as proc:
        url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
        with RawClient(proc.bootstrap) as one, RawClient(proc.bootstrap) as two:
            topic = MetadataRequest.MetadataRequestTopic(name="quiet")
            one.request(MetadataRequest(topics=[topic], allow_auto_topic_creation=True), 9)
            send_only(one, fetch_request("quiet", max_wait_ms=FOREVER_MS, min_bytes=1), 12, 9)
            send_only(two, fetch_of_nothing(FOREVER_MS), 12, 9)
            assert wait_for(lambda: total(scrape(url), "streambus_broker_active_requests") == 2)
            assert proc.stop(signal.SIGTERM) == 0
            # Both polls were answered (empty) before the connections closed.
            assert one.read_response(FetchRequest, 12).header.correlation_id == 9
            assert two.read_response(FetchRequest, 12).header.correlation_id == 9
    text = proc.log_text()
    assert "Traceback" not in text
    assert "CancelledError" not in text
    assert "still running" not in text  # nothing waited out the shutdown grace period


# -- configuration -----------------------------------------------------------------------------
def test_limits_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBUS_CONNECTIONS_MAX_IDLE_MS", "1000")
    monkeypatch.setenv("STREAMBUS_MAX_CONNECTIONS", "50")
    args = build_parser().parse_args(
        ["serve", "--max-connections-per-ip", "5", "--queued-max-request-bytes", "209715200"]
    )
    config = config_from_args(args)
    assert config.connections_max_idle_ms == 1000
    assert config.max_connections == 50
    assert config.max_connections_per_ip == 5
    assert config.queued_max_request_bytes == 200 * 1024 * 1024
    defaults = BrokerConfig.load(env={})
    assert defaults.connections_max_idle_ms == 600_000
    assert defaults.queued_max_request_bytes == 256 * 1024 * 1024


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"STREAMBUS_MAX_CONNECTIONS": "-1"}, "max.connections"),
        ({"STREAMBUS_QUEUED_MAX_REQUEST_BYTES": "1000"}, "queued.max.request.bytes"),
    ],
)
def test_bad_limits_say_what_is_wrong(env: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidConfigError, match=words.replace(".", r"\.")):
        BrokerConfig.load(env=env)


def wait_for(predicate: Any, timeout: float = 20) -> bool:
    return bool(wait_until(predicate, timeout))
