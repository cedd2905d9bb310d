"""HTTPS for the registry's REST API, like Confluent's ``listeners=https://...``.

``schema_registry_protocol=https`` serves TLS with the broker's own TLS helper
(``streambus.security.tls.server_context``: TLS 1.2 and later). Each of the registry's
certificate, key and CA files defaults to the Kafka listener's (``ssl_certfile``, ...),
so one set of certificates serves both. ``schema_registry_ssl_client_auth`` is
Confluent's ``ssl.client.authentication``: ``REQUIRED`` refuses a client without a
certificate the CA vouches for, ``REQUESTED`` asks for one, ``NONE`` (the default)
never asks. Authentication and ACLs stay Basic's (``auth.py``): a certificate gates the
connection, it does not name the caller.

A broker forwarding a write to the ``_schemas`` leader speaks HTTPS too (every broker of
a cluster serves the registry the same way) and checks the leader's certificate against
the CA file, host name included. Under ``REQUIRED`` it presents its own certificate,
which must then allow client authentication (extended key usage ``clientAuth``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from streambus.errors import InvalidConfigError
from streambus.security.tls import ClientAuth, server_context

HTTP, HTTPS = "http", "https"
PROTOCOLS = (HTTP, HTTPS)


@dataclass(frozen=True, slots=True)
class RegistryTls:
    """The registry's certificate files (the config defaults each to the broker's)."""

    certfile: Path | None
    keyfile: Path | None
    cafile: Path | None
    client_auth: str = ClientAuth.NONE.value

    def server(self) -> ssl.SSLContext:
        """The listener's context (raises InvalidConfigError)."""
        try:
            return server_context(self.certfile, self.keyfile, self.cafile, self.client_auth)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"schema registry HTTPS: {exc}") from exc

    def client(self) -> ssl.SSLContext:
        """What a forwarding broker dials the leader's registry with (InvalidConfigError)."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.cafile) if self.cafile is not None else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if (
                self.certfile is not None
                and ClientAuth(self.client_auth.lower()) is ClientAuth.REQUIRED
            ):
                context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise InvalidConfigError(f"schema registry HTTPS client: {exc}") from exc
        return context


def registry_tls(
    protocol: str,
    certfile: Path | None,
    keyfile: Path | None,
    cafile: Path | None,
    client_auth: str,
) -> RegistryTls | None:
    """The registry's TLS settings; None when it serves plain HTTP (InvalidConfigError)."""
    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise InvalidConfigError(f"schema registry protocol is 'http' or 'https', not {protocol!r}")
    if protocol == HTTP:
        return None
    return RegistryTls(certfile, keyfile, cafile, client_auth)
