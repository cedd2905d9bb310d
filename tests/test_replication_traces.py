"""The acks=all wait for replication in a trace: a `replicate` span under the broker's produce
span, on a three-broker cluster whose leader exports its spans to stdout (the SDK's console
exporter, chosen with OTEL_TRACES_EXPORTER as an operator would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ClusterProcesses, wait_until
from tests.test_cluster import wait_cluster_size
from tests.test_replication import REPL_ENV, create_replicated, send_batch, wait_in_sync

pytestmark = pytest.mark.slow

TOPIC = "traced"


def exported_spans(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (one indented JSON object each) among log lines."""
    decoder = json.JSONDecoder()
    spans = []
    pos = text.find("{\n")
    while pos >= 0:
        try:
            span, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            end = pos + 1
        else:
            if isinstance(span, dict) and "context" in span:
                spans.append(span)
        pos = text.find("{\n", end)
    return spans


def test_the_wait_for_the_isr_is_a_child_span_of_produce(tmp_path: Path) -> None:
    env = {**REPL_ENV, "OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with ClusterProcesses(tmp_path, 3, env=env) as cluster:
        wait_cluster_size(cluster, 3)
        create_replicated(cluster.bootstrap, TOPIC, 1)
        leader = cluster.brokers[wait_in_sync(cluster, TOPIC, 1)[0].leader]
        assert send_batch(leader, TOPIC, [b"a", b"b"]).error_code == 0
        assert send_batch(leader, TOPIC, [b"c"], acks=1).error_code == 0

        def produce_spans() -> list[dict[str, Any]] | None:
            spans = exported_spans(leader.log_text())
            produced = [s for s in spans if s["name"] == f"produce {TOPIC}"]
            waits = [s for s in spans if s["name"] == "replicate"]
            return spans if len(produced) >= 2 and waits else None

        spans = wait_until(produce_spans, 30, 0.2)
    produced = sorted(
        (s for s in spans if s["name"] == f"produce {TOPIC}"), key=lambda s: s["start_time"]
    )
    waits = [s for s in spans if s["name"] == "replicate"]
    acks_all, acks_one = produced[-2], produced[-1]
    children = {s["parent_id"] for s in waits}
    assert acks_all["context"]["span_id"] in children, (acks_all, waits)
    assert acks_one["context"]["span_id"] not in children
    wait = next(s for s in waits if s["parent_id"] == acks_all["context"]["span_id"])
    assert wait["context"]["trace_id"] == acks_all["context"]["trace_id"]
    assert wait["kind"] == "SpanKind.INTERNAL"
    assert wait["status"]["status_code"] == "UNSET"
