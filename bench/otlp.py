"""A tiny OTLP/HTTP trace receiver, so a broker's spans are really exported somewhere."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class _QuietServer(ThreadingHTTPServer):
    """A broker killed mid-export resets its connection: expected, not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OtlpSink:
    """A tiny OTLP/HTTP receiver: 200 to ``POST /v1/traces``, counting requests and bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.spans = 0
        self.bad_bodies = 0
        self.other_requests = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                ok = self.path.rstrip("/") == "/v1/traces"
                spans = 0
                if ok:
                    try:
                        request = ExportTraceServiceRequest.FromString(body)
                        spans = sum(
                            len(scope.spans)
                            for resource in request.resource_spans
                            for scope in resource.scope_spans
                        )
                    except Exception:
                        spans = -1
                with sink.lock:
                    if ok:
                        sink.requests += 1
                        sink.bytes += len(body)
                        if spans >= 0:
                            sink.spans += spans
                        else:
                            sink.bad_bodies += 1
                    else:
                        sink.other_requests += 1
                # An empty body is a valid (empty) ExportTraceServiceResponse.
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="otlp-sink", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1/traces"

    def snapshot(self) -> tuple[int, int, int]:
        """(requests, bytes, spans) received on /v1/traces so far."""
        with self.lock:
            return self.requests, self.bytes, self.spans

    def __enter__(self) -> OtlpSink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
