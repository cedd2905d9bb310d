"""The bounded table of produce-time payload sizes that Fetch reuses."""

from __future__ import annotations

from streambus.payload_sizes import PayloadSizes
from streambus.structs import TopicPartition

TP = TopicPartition("t", 0)


def test_a_batch_is_known_by_position_and_crc() -> None:
    sizes = PayloadSizes()
    sizes.remember(TP, 0, 1234, 500)
    assert sizes.get(TP, 0, 1234) == 500
    assert sizes.get(TP, 0, 9999) is None, "a rewritten batch (other CRC) is not mistaken for it"
    assert sizes.get(TopicPartition("t", 1), 0, 1234) is None


def test_oldest_entries_go_first() -> None:
    sizes = PayloadSizes(max_entries=3)
    for offset in range(5):
        sizes.remember(TP, offset, offset, offset * 10)
    assert [sizes.get(TP, o, o) for o in range(5)] == [None, None, 20, 30, 40]
