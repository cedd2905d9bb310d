"""``streambus traces FILE``: the traces in an OpenTelemetry Collector ``file`` exporter's output.

For looking at spans without a trace backend: point a collector's ``file`` exporter
(``format: json``) at a file, then render it as one tree per trace::

    streambus traces spans.json --limit 5
    streambus traces spans.json --trace 5ecfcb58

The file holds one OTLP/JSON export request per line (``{"resourceSpans": [...]}``), as the
Collector writes it: ids as hex strings, times and 64-bit integers as decimal strings, span
kinds and status codes as integers. Lines of other signals (``resourceMetrics``,
``resourceLogs``) are skipped; a line that is not such an object is an error naming its line.

Each span is one line: name, ``[KIND]``, duration, ``(service.name)``, then the messaging
attributes it carries (``topic=``, ``partition=``, ``offset=``, ``messages=``, ``group=``).
Children are indented under their parents, siblings in order of start time; a span whose parent
is not in the file is a root of its trace. Links follow their span as
``↔ linked: <trace id prefix>/<span name>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Link",
    "Span",
    "TraceFileError",
    "add_traces_parser",
    "load_spans",
    "render",
    "run_traces",
]

#: OTLP ``Span.SpanKind`` by its integer value; JSON may also spell it ``SPAN_KIND_SERVER``.
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
#: Characters of a trace or span id shown where the whole id would be noise.
SHORT_ID = 8

# The messaging attributes shown on a span line, each with the names older semantic
# conventions (and older instrumentations) give it; the first one present wins.
MESSAGING_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("topic", ("messaging.destination.name", "messaging.destination")),
    (
        "partition",
        (
            "messaging.destination.partition.id",
            "messaging.kafka.destination.partition",
            "messaging.kafka.partition",
        ),
    ),
    ("offset", ("messaging.kafka.offset", "messaging.kafka.message.offset")),
    ("messages", ("messaging.batch.message_count",)),
    ("group", ("messaging.consumer.group.name", "messaging.kafka.consumer.group")),
)


class TraceFileError(ValueError):
    """A line of the file is not an OTLP/JSON export request; the message names the line."""

    def __init__(self, line_number: int, problem: str) -> None:
        super().__init__(f"line {line_number}: {problem}")
        self.line_number = line_number
        self.problem = problem


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str
    attributes: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """One span as the file holds it, with its resource's ``service.name``."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int | None
    service: str | None
    scope: str | None
    attributes: Mapping[str, object]
    links: tuple[Link, ...]
    status_code: int
    status_message: str
    line_number: int

    @property
    def duration_ms(self) -> float | None:
        if self.end_ns is None:
            return None
        return max(0, self.end_ns - self.start_ns) / 1e6


# ------------------------------------------------------------------------------------ parsing


class _LineError(Exception):
    """What is wrong with the line being read; becomes a TraceFileError with its number."""


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _LineError(f"{what} is {type(value).__name__}, expected an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _LineError(f"{what} is {type(value).__name__}, expected a list")
    return value


def _hex_id(value: object, what: str, length: int) -> str | None:
    """A lower-case hex id, or None when absent (OTLP/JSON omits or empties unset ids)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _LineError(f"{what} is {type(value).__name__}, expected a hex string")
    text = value.lower()
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise _LineError(f"{what} {value!r} is not {length} hex digits")
    return text


def _required_id(value: object, what: str, length: int) -> str:
    text = _hex_id(value, what, length)
    if text is None:
        raise _LineError(f"{what} is missing")
    return text


def _nanos(value: object, what: str) -> int | None:
    # OTLP/JSON writes fixed64 as a decimal string; protobuf's JSON also accepts a number.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _LineError(f"{what} is {type(value).__name__}, expected nanoseconds")
    try:
        return int(value)
    except ValueError:
        raise _LineError(f"{what} {value!r} is not an integer") from None


def _any_value(value: object) -> object:
    """An OTLP ``AnyValue`` as a Python value (``intValue`` arrives as a string)."""
    if not isinstance(value, dict) or not value:
        return None
    if "stringValue" in value:
        return str(value["stringValue"])
    if "intValue" in value:
        try:
            return int(value["intValue"])
        except (TypeError, ValueError):
            return value["intValue"]
    if "doubleValue" in value:
        return value["doubleValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        array = value["arrayValue"]
        items = array.get("values") if isinstance(array, dict) else None
        return [_any_value(item) for item in items] if isinstance(items, list) else []
    if "kvlistValue" in value:
        kvlist = value["kvlistValue"]
        return _attributes(kvlist.get("values") if isinstance(kvlist, dict) else None, "kvlist")
    if "bytesValue" in value:
        return value["bytesValue"]  # base64, as the file holds it
    return None


def _attributes(value: object, what: str) -> dict[str, object]:
    attributes: dict[str, object] = {}
    for item in _list(value, what):
        entry = _object(item, f"an entry of {what}")
        key = entry.get("key")
        if not isinstance(key, str):
            raise _LineError(f"an entry of {what} has no string key")
        attributes[key] = _any_value(entry.get("value"))
    return attributes


def _kind(value: object) -> str:
    if value is None:
        return KINDS[0]
    if isinstance(value, int) and not isinstance(value, bool) and value in KINDS:
        return KINDS[value]
    if isinstance(value, str):
        name = value.upper().removeprefix("SPAN_KIND_")
        if name in KINDS.values():
            return name
    raise _LineError(f"span kind {value!r} is not one of 0-5")


def _span(raw: object, service: str | None, scope: str | None, line_number: int) -> Span:
    span = _object(raw, "a span")
    trace_id = _required_id(span.get("traceId"), "traceId", 32)
    span_id = _required_id(span.get("spanId"), "spanId", 16)
    name = span.get("name", "")
    if not isinstance(name, str):
        raise _LineError(f"span {span_id}: name is {type(name).__name__}, expected a string")
    start = _nanos(span.get("startTimeUnixNano"), f"span {span_id}: startTimeUnixNano")
    if start is None:
        raise _LineError(f"span {span_id}: startTimeUnixNano is missing")
    links = []
    for item in _list(span.get("links"), f"span {span_id}: links"):
        link = _object(item, f"span {span_id}: a link")
        link_trace = _required_id(link.get("traceId"), f"span {span_id}: link traceId", 32)
        link_span = _required_id(link.get("spanId"), f"span {span_id}: link spanId", 16)
        attributes = _attributes(link.get("attributes"), f"span {span_id}: link attributes")
        links.append(Link(link_trace, link_span, attributes))
    status = span.get("status") or {}
    status = _object(status, f"span {span_id}: status")
    code = status.get("code", 0)
    if isinstance(code, str):  # protobuf JSON also accepts the enum's name
        code = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}.get(code, 0)
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=_hex_id(span.get("parentSpanId"), f"span {span_id}: parentSpanId", 16),
        name=name,
        kind=_kind(span.get("kind")),
        start_ns=start,
        end_ns=_nanos(span.get("endTimeUnixNano"), f"span {span_id}: endTimeUnixNano"),
        service=service,
        scope=scope,
        attributes=_attributes(span.get("attributes"), f"span {span_id}: attributes"),
        links=tuple(links),
        status_code=code if isinstance(code, int) else 0,
        status_message=str(status.get("message") or ""),
        line_number=line_number,
    )


def _spans_of_line(text: str, line_number: int) -> Iterator[Span]:
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    request = _object(request, "the line")
    if "resourceSpans" not in request:
        if request.keys() & {"resourceMetrics", "resourceLogs", "resourceProfiles"}:
            return  # another signal written to the same file
        raise _LineError('no "resourceSpans": not an OTLP/JSON trace export request')
    for raw_resource_spans in _list(request["resourceSpans"], "resourceSpans"):
        resource_spans = _object(raw_resource_spans, "an entry of resourceSpans")
        resource = _object(resource_spans.get("resource") or {}, "resource")
        service = _attributes(resource.get("attributes"), "resource attributes").get("service.name")
        for raw_scope_spans in _list(resource_spans.get("scopeSpans"), "scopeSpans"):
            scope_spans = _object(raw_scope_spans, "an entry of scopeSpans")
            scope = _object(scope_spans.get("scope") or {}, "scope").get("name")
            for raw in _list(scope_spans.get("spans"), "spans"):
                yield _span(
                    raw,
                    str(service) if service is not None else None,
                    str(scope) if scope else None,
                    line_number,
                )


def load_spans(lines: Iterable[str]) -> list[Span]:
    """Every span in the file's lines, in file order; blank lines are skipped.

    Raises TraceFileError, naming the line, for a line that is not an OTLP/JSON trace export
    request. A span exported twice (same trace and span id) is kept once.
    """
    spans: list[Span] = []
    seen: set[tuple[str, str]] = set()
    for line_number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            for span in _spans_of_line(text, line_number):
                if (span.trace_id, span.span_id) not in seen:
                    seen.add((span.trace_id, span.span_id))
                    spans.append(span)
        except _LineError as exc:
            raise TraceFileError(line_number, str(exc)) from None
    return spans


# ---------------------------------------------------------------------------------- selecting


@dataclass
class _Trace:
    trace_id: str
    spans: list[Span]

    @property
    def start_ns(self) -> int:
        return min(span.start_ns for span in self.spans)

    @property
    def end_ns(self) -> int:
        return max(span.end_ns or span.start_ns for span in self.spans)


def _group(spans: Iterable[Span]) -> list[_Trace]:
    traces: dict[str, _Trace] = {}
    for span in spans:
        traces.setdefault(span.trace_id, _Trace(span.trace_id, [])).spans.append(span)
    return sorted(traces.values(), key=lambda t: (t.start_ns, t.trace_id))


class _NoMatchError(Exception):
    pass


def _select(traces: list[_Trace], trace_id: str | None, limit: int | None) -> list[_Trace]:
    if trace_id is not None:
        wanted = trace_id.strip().lower()
        exact = [t for t in traces if t.trace_id == wanted]
        matches = exact or [t for t in traces if t.trace_id.startswith(wanted)]
        if not wanted or not matches:
            raise _NoMatchError(f"no trace {trace_id} in the file ({_count(len(traces), 'trace')})")
        if len(matches) > 1:
            ids = ", ".join(t.trace_id for t in matches[:5])
            raise _NoMatchError(f"{trace_id} names {len(matches)} traces ({ids}): give more digits")
        traces = matches
    if limit is not None:
        # The most recent N (by their first span's start), still shown oldest first.
        traces = traces[-limit:] if limit > 0 else []
    return traces


# ---------------------------------------------------------------------------------- rendering


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(duration_ms: float | None) -> str:
    return "? ms" if duration_ms is None else f"{duration_ms:.2f} ms"


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _describe(span: Span) -> str:
    parts = [f"{span.name} [{span.kind}] {_ms(span.duration_ms)}"]
    parts.append(f"({span.service})" if span.service else "(unknown service)")
    for label, keys in MESSAGING_FIELDS:
        for key in keys:
            value = span.attributes.get(key)
            if value is not None and value != "":
                parts.append(f"{label}={_scalar(value)}")
                break
    if span.status_code == 2:
        parts.append(f"ERROR: {span.status_message}" if span.status_message else "ERROR")
    return " ".join(parts)


def _render_trace(trace: _Trace, names: Mapping[tuple[str, str], str]) -> list[str]:
    def order(span: Span) -> tuple[int, str, str]:
        return (span.start_ns, span.name, span.span_id)

    by_id = {span.span_id: span for span in trace.spans}
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for span in trace.spans:
        parent = span.parent_span_id
        if parent is not None and parent in by_id and parent != span.span_id:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    for siblings in children.values():
        siblings.sort(key=order)
    roots.sort(key=order)

    duration = (trace.end_ns - trace.start_ns) / 1e6
    services = sorted({span.service or "unknown service" for span in trace.spans})
    lines = [
        f"trace {trace.trace_id}  {_count(len(trace.spans), 'span')}, {_ms(duration)}, "
        f"{', '.join(services)}"
    ]
    emitted: set[str] = set()

    def emit(span: Span, own_prefix: str, child_prefix: str) -> None:
        # Iterative over the tree (a deep chain of spans must not hit the recursion limit).
        stack = [(span, own_prefix, child_prefix)]
        while stack:
            node, prefix, below = stack.pop()
            if node.span_id in emitted:
                continue
            emitted.add(node.span_id)
            line = prefix + _describe(node)
            if node.parent_span_id is not None and node.parent_span_id not in by_id:
                line += f"  (parent {node.parent_span_id[:SHORT_ID]} not in the file)"
            lines.append(line)
            kids = [kid for kid in children.get(node.span_id, []) if kid.span_id not in emitted]
            link_prefix = below + ("│ " if kids else "  ")
            for link in node.links:
                name = names.get((link.trace_id, link.span_id))
                target = name if name is not None else f"{link.span_id} (not in the file)"
                lines.append(f"{link_prefix}↔ linked: {link.trace_id[:SHORT_ID]}/{target}")
            for index in reversed(range(len(kids))):
                last = index == len(kids) - 1
                stack.append(
                    (
                        kids[index],
                        below + ("└─ " if last else "├─ "),
                        below + ("   " if last else "│  "),
                    )
                )

    for root in roots:
        emit(root, "", "")
    # Spans caught in a parent cycle (malformed input) are reached from no root: show them too.
    for span in sorted(trace.spans, key=order):
        if span.span_id not in emitted:
            emit(span, "", "")
    return lines


def _render_spans(spans: Sequence[Span], trace_id: str | None, limit: int | None) -> str:
    if not spans:
        return "no spans in the file"
    traces = _select(_group(spans), trace_id, limit)
    if not traces:
        return "no traces selected"
    names = {(span.trace_id, span.span_id): span.name for span in spans}
    blocks = ["\n".join(_render_trace(trace, names)) for trace in traces]
    return "\n\n".join(blocks)


def render(lines: Iterable[str], *, trace_id: str | None = None, limit: int | None = None) -> str:
    """The traces in a Collector ``file`` exporter's lines, one indented tree per trace.

    ``trace_id`` picks one trace (its full id or a unique prefix); ``limit`` keeps the N most
    recent traces (by start time; shown oldest first). Raises TraceFileError for a malformed
    line, and ValueError when ``trace_id`` matches no trace or several.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spans = load_spans(lines)
    try:
        return _render_spans(spans, trace_id, limit)
    except _NoMatchError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------- CLI


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of traces, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_traces_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``traces FILE [--trace ID] [--limit N]`` to ``streambus``'s subcommands."""
    parser = subparsers.add_parser(
        "traces",
        help="show the traces in an OpenTelemetry Collector file exporter's output",
        description="Render the spans in an OpenTelemetry Collector `file` exporter's JSON "
        "output (one OTLP/JSON request per line) as one tree per trace, oldest first.",
    )
    parser.add_argument("file", type=Path, help="the file exporter's output ('-' for stdin)")
    parser.add_argument("--trace", metavar="ID", help="only this trace (full id or unique prefix)")
    parser.add_argument("--limit", metavar="N", type=_limit, help="only the N most recent traces")
    return parser


def run_traces(args: argparse.Namespace) -> int:
    """``streambus traces``: print the trees; 1 (with a message) for an unreadable file, a
    malformed line, or a ``--trace`` matching no trace."""
    path: Path = args.file
    try:
        if str(path) == "-":
            text = render(sys.stdin, trace_id=args.trace, limit=args.limit)
        else:
            with path.open(encoding="utf-8") as handle:
                text = render(handle, trace_id=args.trace, limit=args.limit)
    except TraceFileError as exc:
        print(f"streambus traces: {path}: {exc}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as exc:
        print(f"streambus traces: {path}: not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"streambus traces: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"streambus traces: {path}: {exc}", file=sys.stderr)
        return 1
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `streambus traces FILE | head`: the reader left; not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
