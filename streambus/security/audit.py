"""The audit log: one JSON line per authentication and per audited authorization decision.

Lines go to a rotating file (``--audit-log PATH``, ``audit_log_max_bytes`` per file,
``audit_log_backup_count`` old files kept) and, when the process runs an
OpenTelemetry logs pipeline (``OTEL_LOGS_EXPORTER=otlp``), to it as log records with
the same fields as attributes. The event loop never writes the file: an event is
queued (``logging.handlers.QueueHandler``) and a ``QueueListener`` thread writes it.
The queue is bounded; an event that does not fit is dropped and counted (a broker
whose disk stalls keeps serving).

A line names who did what from where, never a secret: the authentication side hands
in a principal, a mechanism, a listener, the client address, the outcome and a short
reason; passwords, tokens and SASL payloads are never passed here.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import _logs

if TYPE_CHECKING:
    from streambus.instrumentation import BrokerTelemetry

log = logging.getLogger("streambus.audit")

AUTHENTICATION = "authentication"
AUTHORIZATION = "authorization"
QUEUE_MAX = 10_000  # events waiting for the writer thread, at most


def _otel_logger() -> _logs.Logger | None:
    """The OpenTelemetry logger when an SDK logs pipeline is installed, else None
    (the API's own providers are no-ops: forwarding to them would cost for nothing)."""
    provider = _logs.get_logger_provider()
    if type(provider).__module__.startswith("opentelemetry._logs"):
        return None
    return provider.get_logger("streambus.audit")


class AuditLog:
    def __init__(
        self,
        path: Path | None,
        telemetry: BrokerTelemetry,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        backup_count: int = 10,
    ) -> None:
        self.path = path
        self._telemetry = telemetry
        self._max_bytes = max_bytes
        self._backup_count = backup_count
        self._otel = _otel_logger()
        self._queue: queue.Queue[logging.LogRecord] | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._file: logging.Handler | None = None
        self.dropped = 0

    def open(self) -> None:
        """Start the file's writer thread (no-op without a path, or when open)."""
        if self.path is None or self._listener is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=self._max_bytes, backupCount=self._backup_count, encoding="utf-8"
        )
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._queue = queue.Queue(QUEUE_MAX)
        self._listener = logging.handlers.QueueListener(self._queue, self._file)
        self._listener.start()

    @property
    def enabled(self) -> bool:
        return self._queue is not None or self._otel is not None

    def close(self) -> None:
        """Write what is queued, then stop the writer thread (blocks: call off the loop
        or at shutdown)."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._queue = None

    # -- events ---------------------------------------------------------------------------
    def authentication(  # noqa: PLR0917 - the authentication side calls it positionally
        self,
        principal: str,
        mechanism: str,
        listener: str,
        client: str,
        success: bool,
        reason: str | None = None,
    ) -> None:
        """One authentication attempt. ``reason`` is a short cause ("bad_password",
        "unknown_user"), never the credential."""
        self._event(
            AUTHENTICATION,
            {
                "principal": principal,
                "mechanism": mechanism,
                "listener": listener,
                "client": client,
                "success": success,
                "reason": reason,
            },
        )

    def authorization(
        self,
        *,
        principal: str,
        client: str,
        listener: str,
        api: int,
        operation: str,
        resource_type: str,
        resource_name: str,
        allowed: bool,
    ) -> None:
        self._event(
            AUTHORIZATION,
            {
                "principal": principal,
                "client": client,
                "listener": listener,
                "api_key": api,
                "operation": operation,
                "resource_type": resource_type,
                "resource_name": resource_name,
                "allowed": allowed,
            },
        )

    def _event(self, kind: str, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        written = False
        if self._queue is not None:
            line = json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                    + f".{int(now * 1000) % 1000:03d}Z",
                    "type": kind,
                    **fields,
                },
                separators=(",", ":"),
            )
            record = logging.makeLogRecord({"msg": line, "levelno": logging.INFO})
            try:
                self._queue.put_nowait(record)
                written = True
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.warning(
                        "audit log %s falls behind: %d events dropped", self.path, self.dropped
                    )
        if self._otel is not None:
            attributes = {k: v for k, v in fields.items() if v is not None}
            self._otel.emit(
                timestamp=int(now * 1e9),
                severity_number=_logs.SeverityNumber.INFO,
                severity_text="INFO",
                body=f"{kind} {fields.get('principal')}",
                attributes={"audit.type": kind, **attributes},
                event_name=f"streambus.audit.{kind}",
            )
            written = True
        if written:
            self._telemetry.audit_event(kind)
