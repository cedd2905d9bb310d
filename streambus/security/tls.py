"""TLS for SSL and SASL_SSL listeners, with the standard library's ``ssl``.

TLS 1.2 and later only. ``ssl.client.auth``: ``required`` refuses a client
without a certificate the CA file vouches for, ``requested`` asks for one and
accepts a client without, ``none`` never asks. The principal of a TLS client
without SASL is its certificate's subject as Kafka's default principal builder
writes it: the full distinguished name in RFC 2253 order
(``User:CN=alice,O=Example``); without a certificate it is ``User:ANONYMOUS``.

The context is built once per start; :func:`server_context` reloads the files,
so a restart picks up renewed certificates.
"""

from __future__ import annotations

import enum
import os
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streambus.errors import InvalidConfigError

ANONYMOUS = "User:ANONYMOUS"


class ClientAuth(enum.StrEnum):
    REQUIRED = "required"
    REQUESTED = "requested"
    NONE = "none"


def server_context(
    certfile: Path | None, keyfile: Path | None, cafile: Path | None, client_auth: str
) -> ssl.SSLContext:
    """A server context for the certificate and key (PEM); raises InvalidConfigError."""
    if certfile is None:
        raise InvalidConfigError("an SSL or SASL_SSL listener needs --ssl-certfile")
    try:
        auth = ClientAuth(client_auth.lower())
    except ValueError:
        raise InvalidConfigError(
            f"ssl.client.auth is required, requested or none, not {client_auth!r}"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
        if cafile is not None:
            context.load_verify_locations(cafile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    if auth is not ClientAuth.NONE and cafile is None:
        raise InvalidConfigError(f"ssl.client.auth={auth.value} needs --ssl-cafile")
    context.verify_mode = {
        ClientAuth.REQUIRED: ssl.CERT_REQUIRED,
        ClientAuth.REQUESTED: ssl.CERT_OPTIONAL,
        ClientAuth.NONE: ssl.CERT_NONE,
    }[auth]
    return context


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def file_stamps(paths: Iterable[str | os.PathLike[str]]) -> tuple[tuple[int, int], ...]:
    """(mtime ns, size) of each file, (-1, -1) for one that cannot be read: what a reload
    compares to tell that certificates were renewed."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((-1, -1))
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    return out[:-1] + "\\ " if out.endswith(" ") else out


def principal_from_cert(peercert: dict[str, Any] | None) -> str:
    """``User:`` and the subject in RFC 2253 order (last RDN first), as Java's
    ``X500Principal.getName()`` gives it; ``User:ANONYMOUS`` without a certificate."""
    if not peercert or not peercert.get("subject"):
        return ANONYMOUS
    rdns = []
    for rdn in reversed(peercert["subject"]):
        rdns.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return "User:" + ",".join(rdns)
