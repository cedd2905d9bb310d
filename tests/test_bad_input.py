"""Bad input: each gets its Kafka error, or closes that one connection with a log line.

Throughout, a second client connected before the bad one keeps being served,
and records acknowledged before stay readable.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import InitProducerIdRequest, ProduceRequest

from streambus.storage.batch import build_batch
from streambus.structs import TopicPartition
from tests.harness import BrokerThread, RawClient, fetch_request, wait_until

TD = ProduceRequest.TopicProduceData
PD = TD.PartitionProduceData


def produce_request(topic: str, records: bytes, partition: int = 0, acks: int = -1) -> Any:
    return ProduceRequest(
        transactional_id=None,
        acks=acks,
        timeout_ms=5000,
        topic_data=[TD(name=topic, partition_data=[PD(index=partition, records=records)])],
    )


def fetch_all(client: RawClient, topic: str, partition: int = 0) -> bytes:
    response = client.request(fetch_request(topic, partition), 12)
    return bytes(response.responses[0].partitions[0].records or b"")


def one_record(value: bytes, **kw: Any) -> bytes:
    return build_batch([(b"k", value, [], 1_700_000_000_000)], **kw)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data", auto_create_topics_enable=False, max_request_bytes=1024 * 1024
    ) as b:
        b.run(b.broker.create_topic, "good", 1, {"max.message.bytes": "2000"})
        yield b


@pytest.fixture
def bystander(broker: BrokerThread) -> Iterator[RawClient]:
    """Connected before the bad client; must keep working; its acknowledged record must survive."""
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("good", one_record(b"acknowledged")), 9)
        assert response.responses[0].partition_responses[0].error_code == 0
        yield client
        still = client.request(MetadataRequest(topics=None, allow_auto_topic_creation=False), 9)
        assert [t.name for t in still.topics] == ["good"]
        assert b"acknowledged" in fetch_all(client, "good")


def assert_closed_with_log(
    broker: BrokerThread, client: RawClient, caplog: pytest.LogCaptureFixture, words: str
) -> None:
    assert client.is_closed_by_peer(), "the broker closes the offending connection"
    lines = [r.getMessage() for r in caplog.records if r.name == "streambus.server"]
    assert any(words in line for line in lines), lines


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def test_garbage_bytes(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as bad:
        bad.send_bytes(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_closed_with_log(broker, bad, caplog, "frame size")


def test_frame_over_limit(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as bad:
        bad.send_bytes(struct.pack(">i", 2 * 1024 * 1024) + b"\x00" * 64)
        assert_closed_with_log(broker, bad, caplog, "socket.request.max.bytes")


def test_truncated_frame(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    request = produce_request("good", one_record(b"x" * 100))
    request.with_header(correlation_id=1, client_id="bad")
    body = bytes(request.encode(version=9, header=True))[:40]  # cut inside the topic data
    with RawClient(broker.bootstrap) as bad:
        bad.send_bytes(struct.pack(">i", len(body)) + body)
        assert_closed_with_log(broker, bad, caplog, "malformed Produce")


def test_frame_cut_off_by_disconnect(broker: BrokerThread, bystander: RawClient) -> None:
    with RawClient(broker.bootstrap) as bad:
        bad.send_bytes(struct.pack(">i", 500) + b"\x00\x03\x00\x09")  # promises 500 bytes, sends 4
    # nothing to assert on the closed socket: the bystander's checks show the broker is fine


def test_unknown_api_key(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as bad:
        body = struct.pack(">hhih", 999, 0, 7, -1)
        bad.send_bytes(struct.pack(">i", len(body)) + body)
        assert_closed_with_log(broker, bad, caplog, "unknown API key 999")


def test_corrupt_crc(broker: BrokerThread, bystander: RawClient) -> None:
    batch = bytearray(one_record(b"will be corrupted"))
    batch[-1] ^= 0xFF  # a payload byte: the CRC-32C no longer matches
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("good", bytes(batch)), 9)
        part = response.responses[0].partition_responses[0]
        assert part.error_code == 2  # CORRUPT_MESSAGE
        assert "CRC" in (part.error_message or "")
        # the connection stays usable after a per-partition error
        ok = client.request(produce_request("good", one_record(b"after")), 9)
        assert ok.responses[0].partition_responses[0].error_code == 0
        assert b"will be corrupted" not in fetch_all(client, "good")


def test_message_over_max_message_bytes(broker: BrokerThread, bystander: RawClient) -> None:
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("good", one_record(b"x" * 5000)), 9)
        assert response.responses[0].partition_responses[0].error_code == 10  # MESSAGE_TOO_LARGE


def test_produce_to_missing_topic_without_auto_create(
    broker: BrokerThread, bystander: RawClient
) -> None:
    with RawClient(broker.bootstrap) as client:
        meta = client.request(
            MetadataRequest(
                topics=[MetadataRequest.MetadataRequestTopic(name="nope")],
                allow_auto_topic_creation=True,
            ),
            9,
        )
        assert meta.topics[0].error_code == 3  # auto.create.topics.enable=false wins
        response = client.request(produce_request("nope", one_record(b"lost?")), 9)
        assert (
            response.responses[0].partition_responses[0].error_code == 3
        )  # UNKNOWN_TOPIC_OR_PARTITION
    assert "nope" not in broker.run(lambda: dict(broker.broker.logs.topics()))


def test_invalid_acks(broker: BrokerThread, bystander: RawClient) -> None:
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("good", one_record(b"v"), acks=5), 9)
        assert (
            response.responses[0].partition_responses[0].error_code == 21
        )  # INVALID_REQUIRED_ACKS


def test_idempotent_retry_is_stored_once(broker: BrokerThread, bystander: RawClient) -> None:
    with RawClient(broker.bootstrap) as client:
        init = client.request(
            InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 2
        )
        assert init.error_code == 0
        pid, epoch = init.producer_id, init.producer_epoch
        batch = build_batch(
            [(b"k", b"once", [], 1), (b"k", b"twice?", [], 2)],
            producer_id=pid,
            producer_epoch=epoch,
            base_sequence=0,
        )
        first = (
            client.request(produce_request("good", batch), 9).responses[0].partition_responses[0]
        )
        retry = (
            client.request(produce_request("good", batch), 9).responses[0].partition_responses[0]
        )
        assert first.error_code == retry.error_code == 0
        assert retry.base_offset == first.base_offset
        end = broker.run(lambda: broker.broker.logs.log(TopicPartition("good", 0)).log_end_offset)
        assert end == first.base_offset + 2
        assert fetch_all(client, "good").count(b"twice?") == 1
        gap = build_batch(
            [(b"k", b"gap", [], 3)], producer_id=pid, producer_epoch=epoch, base_sequence=7
        )
        out_of_order = (
            client.request(produce_request("good", gap), 9).responses[0].partition_responses[0]
        )
        assert out_of_order.error_code == 45  # OUT_OF_ORDER_SEQUENCE_NUMBER


def test_too_new_api_versions_gets_unsupported_version_with_v0_body(
    broker: BrokerThread, bystander: RawClient
) -> None:
    from kafka.protocol.metadata import ApiVersionsRequest

    with RawClient(broker.bootstrap) as client:
        request = ApiVersionsRequest(client_software_name="raw", client_software_version="1")
        response = client.request(request, 4)
        assert response.error_code == 35  # UNSUPPORTED_VERSION
        served = {k.api_key: (k.min_version, k.max_version) for k in response.api_keys}
        assert served[18] == (0, 3)  # what the client should retry with
        assert served[0] == (3, 9)
        # the connection stays open: negotiate down and carry on
        again = client.request(ApiVersionsRequest(), 3)
        assert again.error_code == 0


def test_too_new_version_of_another_api_closes_the_connection(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as bad:
        body = struct.pack(">hhih", 1, 17, 3, -1)  # Fetch v17: newer than served
        bad.send_bytes(struct.pack(">i", len(body)) + body)
        assert_closed_with_log(broker, bad, caplog, "Fetch v17 not supported")


# -- fields the schema forbids, internal topics, decompression bombs, huge requests --------------

from kafka.protocol.admin import (  # noqa: E402 -- grouped with the tests that use them
    CreateTopicsRequest,
    DeleteTopicsRequest,
    ListGroupsRequest,
)
from kafka.protocol.consumer import (  # noqa: E402
    JoinGroupRequest,
    OffsetCommitRequest,
    OffsetFetchRequest,
)

OC = OffsetCommitRequest.OffsetCommitRequestTopic
OCP = OC.OffsetCommitRequestPartition


def join_request(group_id: str | None) -> Any:
    return JoinGroupRequest(
        group_id=group_id,
        session_timeout_ms=10_000,
        rebalance_timeout_ms=10_000,
        member_id="",
        group_instance_id=None,
        protocol_type="consumer",
        protocols=[JoinGroupRequest.JoinGroupRequestProtocol(name="range", metadata=b"")],
    )


def test_null_where_the_schema_forbids_it_is_answered_invalid_request(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as client:
        response = client.request(join_request(None), 6)  # compact length 0: null
        assert response.error_code == 42  # INVALID_REQUEST, in JoinGroup's own error field
        # the connection stays usable
        assert client.request(ListGroupsRequest(), 2).error_code == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "streambus.server"]
    assert any("non-nullable field group_id was null" in line for line in lines), lines
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_null_in_an_api_without_an_error_field_closes_with_one_warning(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[TD(name="good", partition_data=None)],
    )
    with RawClient(broker.bootstrap) as bad:
        request.with_header(correlation_id=1, client_id="nulls")
        bad.send_bytes(bytes(request.encode(version=9, header=True, framed=True)))
        assert_closed_with_log(broker, bad, caplog, "partition_data was null")
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "nulls" in r.getMessage()
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_oversized_group_id_is_refused_and_group_listing_keeps_working(
    broker: BrokerThread, bystander: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(broker.bootstrap) as client:
        response = client.request(join_request("g" * 40_000), 6)  # compact: length fits a varint
        assert response.error_code == 42
        for version in (0, 1, 2, 3, 4):
            listed = client.request(ListGroupsRequest(), version)
            assert listed.error_code == 0
            assert all(len(g.group_id) < 100 for g in listed.groups)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _commit(client: RawClient, group: str, offset: int) -> int:
    response = client.request(
        OffsetCommitRequest(
            group_id=group,
            generation_id_or_member_epoch=-1,
            member_id="",
            retention_time_ms=-1,
            topics=[OC(name="good", partitions=[OCP(partition_index=0, committed_offset=offset)])],
        ),
        2,
    )
    return int(response.topics[0].partitions[0].error_code)


def _committed(client: RawClient, group: str) -> int:
    OF = OffsetFetchRequest.OffsetFetchRequestTopic
    response = client.request(
        OffsetFetchRequest(group_id=group, topics=[OF(name="good", partition_indexes=[0])]), 2
    )
    return int(response.topics[0].partitions[0].committed_offset)


def test_clients_cannot_write_create_or_delete_internal_topics(
    broker: BrokerThread, bystander: RawClient
) -> None:
    with RawClient(broker.bootstrap) as client:
        # Before the first commit the name is already reserved: no client creates it its way.
        CT = CreateTopicsRequest.CreatableTopic
        created = client.request(
            CreateTopicsRequest(
                topics=[
                    CT(
                        name="__consumer_offsets",
                        num_partitions=1,
                        replication_factor=1,
                        assignments=[],
                        configs=[],
                    )
                ],
                timeout_ms=5000,
                validate_only=False,
            ),
            5,
        )
        assert created.topics[0].error_code == 42
        assert "internal topic" in created.topics[0].error_message

        assert _commit(client, "victim", 100) == 0
        offsets_topic = broker.run(lambda: broker.broker.logs.topics()["__consumer_offsets"])
        assert offsets_topic.internal
        rewrite = build_batch([(b"forged key", b"forged value", [], 1_700_000_000_000)])
        produced = client.request(produce_request("__consumer_offsets", rewrite), 9)
        part = produced.responses[0].partition_responses[0]
        assert part.error_code == 17  # INVALID_TOPIC_EXCEPTION, as Kafka answers
        assert "cannot append to internal topic" in part.error_message

        deleted = client.request(DeleteTopicsRequest(topic_names=["__consumer_offsets"]), 3)
        assert deleted.responses[0].error_code == 42
        assert "__consumer_offsets" in broker.run(lambda: dict(broker.broker.logs.topics()))

        # the coordinator's own writes still go through, and nothing was rewritten
        assert _committed(client, "victim") == 100
        assert _commit(client, "victim", 101) == 0
        assert _committed(client, "victim") == 101


def gzip_batch(records_section: bytes, records_count: int) -> bytes:
    """A v2 batch whose records section is ``records_section`` gzipped as given."""
    import crc32c

    from streambus.storage.batch import HEADER, LOG_OVERHEAD, MIN_BATCH_LENGTH

    buf = bytearray(HEADER.size) + records_section
    HEADER.pack_into(
        buf,
        0,
        0,
        MIN_BATCH_LENGTH + len(records_section),
        -1,
        2,
        0,
        1,  # attributes: gzip
        records_count - 1,
        1_700_000_000_000,
        1_700_000_000_000,
        -1,
        -1,
        -1,
        records_count,
    )
    struct.pack_into(">I", buf, 17, crc32c.crc32c(bytes(buf[21:])))
    assert LOG_OVERHEAD.size == 12
    return bytes(buf)


def gzipped(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)


def test_gzip_bomb_is_refused_without_inflating_it(broker: BrokerThread) -> None:
    broker.run(broker.broker.create_topic, "bombs", 1, {"max.message.bytes": str(1 << 20)})
    # 512 gzip members of 1 MiB of zeros each: about 520 KB that inflate to 512 MiB.
    member = gzipped(b"\0" * (1 << 20))
    bomb = gzip_batch(member * 512, 1)
    assert len(bomb) < 1 << 20
    _reset_peak_rss()
    before = _peak_rss_bytes()
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("bombs", bomb), 9)
        part = response.responses[0].partition_responses[0]
        assert part.error_code == 10  # MESSAGE_TOO_LARGE
        assert f"more than {1 << 20} bytes" in part.error_message
        assert "max.message.bytes" in part.error_message
    assert _peak_rss_bytes() - before < 128 << 20, "the bomb was inflated in memory"
    end = broker.run(lambda: broker.broker.logs.log(TopicPartition("bombs", 0)).log_end_offset)
    assert end == 0


def test_large_gzip_batch_on_a_compacted_topic_still_needs_keys(broker: BrokerThread) -> None:
    import os

    broker.run(broker.broker.create_topic, "compacted", 1, {"cleanup.policy": "compact"})
    plain = build_batch([(None, os.urandom(60_000), [], 1_700_000_000_000)])
    from streambus.storage.batch import HEADER

    batch = gzip_batch(gzipped(plain[HEADER.size :]), 1)
    assert len(batch) > 32 * 1024  # large enough to be checked in a worker thread
    with RawClient(broker.bootstrap) as client:
        response = client.request(produce_request("compacted", batch), 9)
        part = response.responses[0].partition_responses[0]
        assert part.error_code == 87  # INVALID_RECORD
        assert "without key" in part.error_message


def test_gzip_batches_from_real_clients_round_trip(broker: BrokerThread) -> None:
    import os

    from confluent_kafka import Consumer, Producer
    from kafka import KafkaProducer

    broker.run(broker.broker.create_topic, "gz", 1, {})
    small = [f"value-{i}".encode() * 20 for i in range(200)]
    large = [os.urandom(1000) for _ in range(150)]  # incompressible: one batch over 32 KiB
    kp = KafkaProducer(
        bootstrap_servers=broker.bootstrap,
        compression_type="gzip",
        batch_size=400_000,
        linger_ms=200,
        max_request_size=900_000,
    )
    for value in small:
        kp.send("gz", value)
    kp.flush()
    for value in large:
        kp.send("gz", value)
    kp.flush()
    kp.close()
    cp = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "gzip"})
    tail = [f"confluent-{i}".encode() for i in range(100)]
    for value in tail:
        cp.produce("gz", value)
    assert cp.flush(15) == 0
    expected = small + large + tail
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "gz-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(["gz"])
    seen: list[bytes] = []
    try:

        def done() -> bool:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                seen.append(msg.value())
            return len(seen) >= len(expected)

        wait_until(done, timeout=30, interval=0)
    finally:
        consumer.close()
    assert seen == expected


def test_produce_to_many_partitions_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    count = 100_000
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[
            TD(name="wide", partition_data=[PD(index=i, records=None) for i in range(count)])
        ],
    )
    with (
        BrokerThread(tmp_path / "data", auto_create_topics_enable=False) as broker,
        RawClient(broker.bootstrap, timeout=60) as client,
    ):
        broker.run(broker.broker.create_topic, "wide", 1, {})
        caplog.clear()
        response = client.request(request, 9)
        parts = response.responses[0].partition_responses
        assert len(parts) == count
        assert {p.error_code for p in parts} == {42}  # INVALID_REQUEST: no records
        # the broker served others between slices, and is fine afterwards
        ok = client.request(produce_request("wide", one_record(b"after")), 9)
        assert ok.responses[0].partition_responses[0].error_code == 0
    produce_lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "streambus.protocol" and "produce" in r.getMessage()
    ]
    assert len(produce_lines) == 1, produce_lines[:3]
    assert f"{count} partition(s) rejected" in produce_lines[0]
    assert "and 99995 more" in produce_lines[0]
