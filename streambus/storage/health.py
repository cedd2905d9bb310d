"""Whether the data directory currently takes writes: a full disk seen once, not per request.

Every write path (produce appends and segment rolls, offset commits, topic
creation, producer id blocks, meta files) reports its outcome here. The first
failure of a run logs one WARNING naming the file and the reason; the next
success logs one INFO line saying writes resumed. In between, failing requests
answer KAFKA_STORAGE_ERROR without a log line each, and the counts are read by
the broker's metrics at scrape time.

Storage keeps no metrics of its own: this is plain state the telemetry facade
reads.
"""

from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger("streambus.storage")


def reason_of(exc: BaseException) -> str:
    """``ENOSPC``, ``EDQUOT``, ``EIO``, ... for the OSError behind ``exc``; else ``OTHER``."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return errno.errorcode.get(cause.errno, f"ERRNO_{cause.errno}")
    return "OTHER"


class WriteHealth:
    """Counts of failed writes by reason, and whether the last write failed."""

    def __init__(self) -> None:
        self.failing = False  # read on every append: a plain attribute, no property
        self._errors: dict[str, int] = {}
        self._since = 0.0
        self._failed_in_run = 0

    def failed(self, what: str, exc: BaseException) -> None:
        reason = reason_of(exc)
        self._errors[reason] = self._errors.get(reason, 0) + 1
        self._failed_in_run += 1
        if not self.failing:
            self.failing = True
            self._since = time.monotonic()
            log.warning(
                "storage writes failing (%s) at %s: %s; writes answer KAFKA_STORAGE_ERROR "
                "until they succeed again",
                reason,
                what,
                exc,
            )

    def succeeded(self) -> None:
        if self.failing:
            self.failing = False
            log.info(
                "storage writes succeed again after %d failed writes over %.1f s",
                self._failed_in_run,
                time.monotonic() - self._since,
            )
            self._failed_in_run = 0

    def errors(self) -> dict[str, int]:
        """Failed writes since start, by reason (a copy, for a scrape)."""
        return dict(self._errors)
