"""The data directory itself: its lock, ``meta.properties``, and what the process may open.

``DATA_DIR/.lock`` (Kafka's name) holds an exclusive ``flock`` for as long as a
broker serves the directory, and that broker's pid as text, so a second broker
started on the same directory stops at once and names the holder. The lock is
taken before anything else in the directory is read or written and released
when the broker stops; the kernel drops it if the process dies, so a stale
file never blocks a restart.

``meta.properties`` is Java-properties text, one ``key=value`` per line, as
Kafka writes it::

    version=1
    cluster.id=<22 characters, url-safe base64 of a UUID>
    node.id=<broker id>
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import resource
import uuid
from pathlib import Path

from streambus.errors import StreamBusError

log = logging.getLogger("streambus.storage")

LOCK_FILE = ".lock"
META_FILE = "meta.properties"

# Descriptors an open partition holds: the active segment's .log, .index and .timeindex.
FDS_PER_PARTITION = 3
# Descriptors kept out of both budgets below: the listener, /metrics and its scrapes,
# telemetry export, sockets accepted in one batch before they can be refused, the segment
# being created while the old one awaits its fsync, files read by Fetch. What is left of
# the open-files limit is split in half between client connections and open partitions,
# so neither can starve the other.
FD_RESERVE = 256


class DataDirError(StreamBusError):
    """The data directory cannot be used: locked by another broker, not a directory,
    unreadable metadata. Never sent to a client (it stops start-up), so it keeps the
    root's code and is left out of the code table."""


class DataDirLock:
    """An exclusive ``flock`` on ``DATA_DIR/.lock``, holding the owner's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirError(
                f"data directory {self.path.parent} is in use by another broker: "
                f"{self.path} is locked by pid {holder}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the pid is a courtesy; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            # The file stays: removing it would let a third broker lock a new inode
            # while a second one still waits on the old.
            os.close(self._fd)
            self._fd = -1


def prepare_data_dir(data_dir: Path) -> None:
    """Create the directory if needed; refuse a path that is something else, naming what is
    in the way rather than passing on an errno ("File exists", "Not a directory")."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"data directory {data_dir} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in data_dir.parents if p.exists() and not p.is_dir()), None)
        where = f"{blocker} is a file" if blocker else "a parent is not a directory"
        raise DataDirError(f"data directory {data_dir} cannot be created: {where}") from None


def write_atomically(path: Path, content: bytes) -> None:
    """Write a temporary file, fsync it, rename it over ``path``, fsync the directory.

    A failure (ENOSPC, EIO, ...) leaves ``path`` as it was and no temporary file behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_cluster_id(data_dir: Path, broker_id: int) -> str:
    """The cluster id from ``meta.properties``, made and written once if the file is absent.

    A file that exists but cannot be read as Kafka writes it stops start-up with a
    ``DataDirError`` naming it: guessing would give the data a new cluster id.
    """
    path = data_dir / META_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        content = f"version=1\ncluster.id={cluster_id}\nnode.id={broker_id}\n"
        write_atomically(path, content.encode())
        return cluster_id
    except IsADirectoryError:
        raise DataDirError(f"{path} is a directory, not a properties file") from None
    props = _parse_properties(path, raw)
    cluster_id = props.get("cluster.id", "")
    if not cluster_id:
        raise DataDirError(f"{path} is corrupt: it has no cluster.id")
    if not all(c.isalnum() or c in "-_" for c in cluster_id):
        raise DataDirError(f"{path} is corrupt: cluster.id {cluster_id!r} is not a cluster id")
    if props.get("version", "1") not in ("0", "1"):
        raise DataDirError(f"{path}: version {props['version']!r} is not one this broker reads")
    if props.get("node.id", str(broker_id)) != str(broker_id):
        log.warning(
            "data dir %s belonged to broker %s; now serving as broker %d",
            data_dir,
            props.get("node.id"),
            broker_id,
        )
    return cluster_id


def _parse_properties(path: Path, raw: bytes) -> dict[str, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataDirError(f"{path} is corrupt: not UTF-8 text ({exc.reason})") from None
    props: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#!":
            continue
        key, sep, value = stripped.partition("=")
        if not sep or not key.strip():
            raise DataDirError(f"{path} is corrupt: line {number} is not key=value: {line[:60]!r}")
        props[key.strip()] = value.strip()
    return props


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what Kafka's docs ask operators to
    do); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if target == resource.RLIM_INFINITY:
            target = 1 << 20  # Linux's default nr_open: above it setrlimit fails
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-files limit from %d to %d", soft, target)
            soft = target
    return soft


def _shared_fds() -> int:
    """Half of what the open-files limit leaves after FD_RESERVE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, (soft - FD_RESERVE) // 2)


def partition_fd_budget() -> int:
    """How many open partitions the current RLIMIT_NOFILE leaves room for."""
    return _shared_fds() // FDS_PER_PARTITION


def connection_fd_budget() -> int:
    """How many client connections the current RLIMIT_NOFILE leaves room for."""
    return max(1, _shared_fds())
