"""streambus/tracefile.py: an OpenTelemetry Collector `file` exporter's output as trace trees.

The sample is written the way the Collector's file exporter writes it (format: json): one
compact OTLP/JSON export request per line, the resource's SDK attributes, the scope's name and
version, hex ids, times and intValue as decimal strings, kind and flags as integers, an empty
`status` object for an unset status, and requests written in whatever order batches arrived
(here the broker's span comes before its parent's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from streambus.tracefile import TraceFileError, add_traces_parser, load_spans, render, run_traces

T0 = 1_795_764_924_221_397_432  # ns since the epoch

# Trace 1: checkout in order-service sends two messages; the broker's Produce spans are children
# of the producer spans (the traceparent header). Trace 2: the broker's Fetch span, linked to
# both producer spans. Trace 3: the consumer's process span, linked to the first producer span
# and to a span the file does not hold. Trace 4: a JoinGroup span, and a SyncGroup span whose
# parent is not in the file.
TRACE_1 = "5ecfcb5801c6a9da9de5e3569718812f"
TRACE_2 = "a3e33a9a803426ee04b36b726e99fa80"
TRACE_3 = "e9e847c93daa181964f2fcfecb6b045c"
TRACE_4 = "0badc0ffee0ddf00d15ea5e0123abcde"
CHECKOUT, SEND_1, SEND_2 = "1111111111111111", "2222222222222222", "3333333333333333"
PRODUCE_1, PRODUCE_2 = "4444444444444444", "5555555555555555"
FETCH, PROCESS = "6666666666666666", "7777777777777777"
JOIN, SYNC, ABSENT = "8888888888888888", "9999999999999999", "abcdefabcdefabcd"


def _value(value: object) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}  # OTLP/JSON writes 64-bit integers as strings
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value}


def _attributes(**attributes: object) -> list[dict[str, Any]]:
    return [{"key": key.replace("__", "."), "value": _value(v)} for key, v in attributes.items()]


def span(
    trace_id: str,
    span_id: str,
    name: str,
    kind: int,
    when_us: tuple[int, int],
    *,
    parent: str | None = None,
    attributes: dict[str, object] | None = None,
    links: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """A span in OTLP/JSON; `when_us` is (start, duration) in microseconds after T0."""
    start_us, duration_us = when_us
    raw: dict[str, Any] = {"traceId": trace_id, "spanId": span_id}
    if parent is not None:
        raw["parentSpanId"] = parent
    raw.update(
        {
            "flags": 256,
            "name": name,
            "kind": kind,
            "startTimeUnixNano": str(T0 + start_us * 1000),
            "endTimeUnixNano": str(T0 + (start_us + duration_us) * 1000),
        }
    )
    if attributes:
        raw["attributes"] = _attributes(**attributes)
    if links:
        raw["links"] = [
            {
                "traceId": t,
                "spanId": s,
                "attributes": _attributes(messaging__operation__name="send"),
                "flags": 256,
            }
            for t, s in links
        ]
    raw["status"] = {}
    return raw


def request(service: str, scope: str, version: str | None, *spans: dict[str, Any]) -> str:
    """One export request as the file exporter writes it: one compact JSON line."""
    scope_obj: dict[str, Any] = {"name": scope}
    if version:
        scope_obj["version"] = version
    resource = _attributes(
        telemetry__sdk__language="python",
        telemetry__sdk__name="opentelemetry",
        telemetry__sdk__version="1.45.1",
        service__name=service,
    )
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": resource},
                "scopeSpans": [{"scope": scope_obj, "spans": list(spans)}],
            }
        ]
    }
    return json.dumps(body, separators=(",", ":"))


KAFKA_CLIENT = "opentelemetry.instrumentation.confluent_kafka"
BROKER_ATTRS = {"messaging__system": "kafka", "messaging__destination__name": "orders"}


def sample_lines() -> list[str]:
    broker_produce = request(
        "streambus",
        "streambus",
        None,
        span(
            TRACE_1,
            PRODUCE_1,
            "produce orders",
            2,
            (200, 350),
            parent=SEND_1,
            attributes={
                **BROKER_ATTRS,
                "messaging__operation__name": "produce",
                "messaging__destination__partition__id": "0",
                "messaging__kafka__offset": 0,
                "messaging__batch__message_count": 39,
            },
        ),
        span(
            TRACE_1,
            PRODUCE_2,
            "produce orders",
            2,
            (1_400, 120),
            parent=SEND_2,
            attributes={
                **BROKER_ATTRS,
                "messaging__destination__partition__id": "2",
                "messaging__kafka__offset": 17,
                "messaging__batch__message_count": 1,
            },
        ),
    )
    client_produce = request(
        "order-service",
        KAFKA_CLIENT,
        "0.66b1",
        # The confluent-kafka instrumentation still writes the older attribute names.
        span(
            TRACE_1,
            SEND_1,
            "orders send",
            4,
            (100, 600),
            parent=CHECKOUT,
            attributes={"messaging__destination": "orders", "messaging__kafka__partition": 0},
        ),
        span(
            TRACE_1,
            SEND_2,
            "orders send",
            4,
            (1_300, 400),
            parent=CHECKOUT,
            attributes={"messaging__destination": "orders", "messaging__kafka__partition": 2},
        ),
    )
    checkout = request(
        "order-service",
        "checkout",
        "1.0",
        span(TRACE_1, CHECKOUT, "checkout", 1, (0, 2_500), attributes={"order.items": 3}),
    )
    broker_fetch = request(
        "streambus",
        "streambus",
        None,
        span(
            TRACE_2,
            FETCH,
            "fetch orders",
            2,
            (3_000, 16_340),
            attributes={
                **BROKER_ATTRS,
                "messaging__operation__name": "fetch",
                "messaging__batch__message_count": 100,
            },
            links=[(TRACE_1, SEND_1), (TRACE_1, SEND_2)],
        ),
    )
    consumer = request(
        "billing",
        KAFKA_CLIENT,
        "0.66b1",
        span(
            TRACE_3,
            PROCESS,
            "orders process",
            5,
            (20_000, 90),
            attributes={
                "messaging__destination__name": "orders",
                "messaging__destination__partition__id": "0",
                "messaging__kafka__offset": 0,
                "messaging__consumer__group__name": "billing",
            },
            links=[(TRACE_1, SEND_1), ("ffffffffffffffffffffffffffffffff", ABSENT)],
        ),
    )
    groups = request(
        "streambus",
        "streambus",
        None,
        span(
            TRACE_4,
            JOIN,
            "join billing",
            2,
            (-5_000, 3_001_250),
            attributes={"messaging__consumer__group__name": "billing"},
        ),
        span(
            TRACE_4,
            SYNC,
            "sync billing",
            2,
            (-1_000, 800),
            parent=ABSENT,
            attributes={"messaging__consumer__group__name": "billing"},
        ),
    )
    # A metrics request in the same file (a file exporter on a metrics pipeline too): skipped.
    metrics = json.dumps({"resourceMetrics": [{"resource": {}, "scopeMetrics": []}]})
    return [broker_produce, client_produce, "", checkout, metrics, broker_fetch, consumer, groups]


EXPECTED = f"""\
trace {TRACE_4}  2 spans, 3001.25 ms, streambus
join billing [SERVER] 3001.25 ms (streambus) group=billing
sync billing [SERVER] 0.80 ms (streambus) group=billing  (parent abcdefab not in the file)

trace {TRACE_1}  5 spans, 2.50 ms, order-service, streambus
checkout [INTERNAL] 2.50 ms (order-service)
├─ orders send [PRODUCER] 0.60 ms (order-service) topic=orders partition=0
│  └─ produce orders [SERVER] 0.35 ms (streambus) topic=orders partition=0 offset=0 messages=39
└─ orders send [PRODUCER] 0.40 ms (order-service) topic=orders partition=2
   └─ produce orders [SERVER] 0.12 ms (streambus) topic=orders partition=2 offset=17 messages=1

trace {TRACE_2}  1 span, 16.34 ms, streambus
fetch orders [SERVER] 16.34 ms (streambus) topic=orders messages=100
  ↔ linked: 5ecfcb58/orders send
  ↔ linked: 5ecfcb58/orders send

trace {TRACE_3}  1 span, 0.09 ms, billing
orders process [CONSUMER] 0.09 ms (billing) topic=orders partition=0 offset=0 group=billing
  ↔ linked: 5ecfcb58/orders send
  ↔ linked: ffffffff/{ABSENT} (not in the file)"""


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "spans.json"
    path.write_text("\n".join(sample_lines()) + "\n", encoding="utf-8")
    return path


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="streambus")
    add_traces_parser(parser.add_subparsers(dest="command", required=True))
    return run_traces(parser.parse_args(["traces", *argv]))


def test_load_spans_reads_the_collector_format() -> None:
    spans = {s.span_id: s for s in load_spans(sample_lines())}
    assert len(spans) == 9
    produce = spans[PRODUCE_1]
    assert produce.trace_id == TRACE_1
    assert produce.parent_span_id == SEND_1
    assert produce.kind == "SERVER"
    assert produce.service == "streambus"
    assert produce.scope == "streambus"
    assert produce.duration_ms == pytest.approx(0.35)
    assert produce.attributes["messaging.kafka.offset"] == 0  # intValue "0" -> 0
    assert produce.attributes["messaging.batch.message_count"] == 39
    assert produce.line_number == 1
    assert spans[CHECKOUT].parent_span_id is None
    assert spans[CHECKOUT].line_number == 4  # line numbers count blank lines too
    fetch = spans[FETCH]
    assert [(link.trace_id, link.span_id) for link in fetch.links] == [
        (TRACE_1, SEND_1),
        (TRACE_1, SEND_2),
    ]
    assert fetch.links[0].attributes == {"messaging.operation.name": "send"}


def test_render_draws_one_tree_per_trace_in_start_order() -> None:
    assert render(sample_lines()) == EXPECTED


def test_cli_prints_the_trees(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(str(sample)) == 0
    out, err = capsys.readouterr()
    assert out == EXPECTED + "\n"
    assert err == ""


def test_trace_option_selects_one_trace(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected_fetch = EXPECTED.split("\n\n")[2]
    assert render(sample_lines(), trace_id=TRACE_2) == expected_fetch
    # A unique prefix is enough (the short ids in link lines are prefixes), any case.
    assert render(sample_lines(), trace_id=TRACE_2[:8].upper()) == expected_fetch
    assert run(str(sample), "--trace", TRACE_2[:8]) == 0
    assert capsys.readouterr().out == expected_fetch + "\n"


def test_unknown_trace_is_an_error(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no trace 12345678 in the file \\(4 traces\\)"):
        render(sample_lines(), trace_id="12345678")
    assert run(str(sample), "--trace", "12345678") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"streambus traces: {sample}: no trace 12345678 in the file (4 traces)\n"


def test_ambiguous_prefix_names_the_candidates() -> None:
    lines = [
        request("a", "s", None, span("ab" * 16, CHECKOUT, "one", 1, (0, 1))),
        request("a", "s", None, span("ab" + "cd" * 15, CHECKOUT, "two", 1, (5, 1))),
    ]
    with pytest.raises(ValueError, match="ab names 2 traces") as info:
        render(lines, trace_id="ab")
    assert "ab" * 16 in str(info.value)
    assert render(lines, trace_id="abab").startswith(f"trace {'ab' * 16} ")


def test_limit_keeps_the_most_recent_traces(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = EXPECTED.split("\n\n")
    assert render(sample_lines(), limit=2) == "\n\n".join(blocks[2:])
    assert render(sample_lines(), limit=10) == EXPECTED
    assert run(str(sample), "--limit", "1") == 0
    assert capsys.readouterr().out == blocks[3] + "\n"
    with pytest.raises(SystemExit):
        run(str(sample), "--limit", "0")
    assert "expected at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"resourceSpans": [', "line 3: not valid JSON (Expecting value at column 20)"),
        ("[1, 2]", "line 3: the line is list, expected an object"),
        ('{"spans": []}', 'line 3: no "resourceSpans": not an OTLP/JSON trace export request'),
        (
            request("a", "s", None, span("xyz", CHECKOUT, "n", 1, (0, 1))),
            "line 3: traceId 'xyz' is not 32 hex digits",
        ),
        (
            request("a", "s", None, {"traceId": TRACE_1, "spanId": CHECKOUT, "name": "n"}),
            f"line 3: span {CHECKOUT}: startTimeUnixNano is missing",
        ),
    ],
)
def test_malformed_line_is_reported_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad_line: str, problem: str
) -> None:
    lines = [*sample_lines()[:2], bad_line, *sample_lines()[3:]]
    with pytest.raises(TraceFileError) as info:
        render(lines)
    assert str(info.value) == problem
    assert info.value.line_number == 3

    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run(str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"streambus traces: {path}: {problem}\n"
    assert "Traceback" not in err


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert render([]) == "no spans in the file"
    path = tmp_path / "empty.json"
    path.write_text("", encoding="utf-8")
    assert run(str(path)) == 0
    assert capsys.readouterr().out == "no spans in the file\n"
    path.write_text("\n\n", encoding="utf-8")
    assert run(str(path)) == 0
    assert capsys.readouterr().out == "no spans in the file\n"


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.json"
    assert run(str(path)) == 1
    assert capsys.readouterr().err == (
        f"streambus traces: cannot read {path}: No such file or directory\n"
    )


def test_a_span_exported_twice_is_shown_once() -> None:
    lines = sample_lines()
    assert render([*lines, lines[3]]) == EXPECTED


def test_other_attribute_encodings() -> None:
    """Kind by enum name, error status, missing end time and service, deep chains."""
    root = {
        "traceId": TRACE_1,
        "spanId": CHECKOUT,
        "name": "root",
        "kind": "SPAN_KIND_CLIENT",
        "startTimeUnixNano": T0,  # a number, which protobuf's JSON mapping also allows
        "status": {"code": 2, "message": "timed out"},
    }
    chain = [root] + [
        span(TRACE_1, f"{i:016x}", f"level {i}", 1, (i, 1), parent=f"{i - 1:016x}")
        for i in range(2, 1_500)
    ]
    chain[1]["parentSpanId"] = CHECKOUT
    line = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": chain}]}]})
    lines = render([line]).splitlines()
    assert lines[1] == "root [CLIENT] ? ms (unknown service) ERROR: timed out"
    assert lines[2] == "└─ level 2 [INTERNAL] 0.00 ms (unknown service)"
    assert lines[3] == "   └─ level 3 [INTERNAL] 0.00 ms (unknown service)"
    assert len(lines) == 1 + 1_499  # a chain deeper than the recursion limit


def test_links_of_a_span_with_children_keep_the_tree_lines() -> None:
    lines = [
        request(
            "billing",
            KAFKA_CLIENT,
            "0.66b1",
            span(TRACE_3, PROCESS, "orders process", 5, (0, 900), links=[(TRACE_1, SEND_1)]),
            span(TRACE_3, JOIN, "charge", 3, (100, 300), parent=PROCESS),
            span(TRACE_3, SYNC, "ledger write", 3, (500, 200), parent=PROCESS),
        ),
        request("order-service", KAFKA_CLIENT, "0.66b1", span(TRACE_1, SEND_1, "s", 4, (0, 1))),
    ]
    assert render(lines, trace_id=TRACE_3).splitlines()[1:] == [
        "orders process [CONSUMER] 0.90 ms (billing)",
        "│ ↔ linked: 5ecfcb58/s",
        "├─ charge [CLIENT] 0.30 ms (billing)",
        "└─ ledger write [CLIENT] 0.20 ms (billing)",
    ]
