"""The inter-broker client's TLS context follows its files: two tiny TLS servers that require
client certificates, one under the old CA and one under the new, record the certificate each
dial presents; the broker's CA, certificate and key are replaced on disk, and a later dial
verifies the new CA's server and presents the new certificate without a restart. A
certificate caught half-written keeps the old context and logs one ERROR."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from streambus.security.broker_client import BrokerDialer, ClientTls, InterBrokerSecurity
from streambus.security.listeners import SecurityProtocol
from tests.security_certs import Certs, make_certs


def der(pem: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)


async def _rotate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    # the files the broker is configured with, overwritten in place at rotation
    live = tmp_path / "live"
    live.mkdir()
    ca, cert, key = live / "ca.pem", live / "client.pem", live / "client.key"
    ca.write_bytes(old.ca.read_bytes())
    cert.write_bytes(old.client_cert.read_bytes())
    key.write_bytes(old.client_key.read_bytes())

    def server_context(certs: Certs) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        context.load_verify_locations(certs.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    presented: list[bytes] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        presented.append(obj.getpeercert(binary_form=True) if obj is not None else b"")
        writer.close()

    old_server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_context(old))
    new_server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=server_context(new))
    old_port = old_server.sockets[0].getsockname()[1]
    new_port = new_server.sockets[0].getsockname()[1]
    tls = ClientTls(ca, cert, key, present_certificate=True, check_hostname=True)
    dialer = BrokerDialer(InterBrokerSecurity(SecurityProtocol.SSL, tls=tls))

    async def dial(port: int) -> bytes:
        before = len(presented)
        conn = await dialer.connect(1, "127.0.0.1", port, client_id="t", timeout_s=10)
        await conn.close()
        deadline = time.monotonic() + 10
        while len(presented) == before:  # the server side of the handshake ends after ours
            assert time.monotonic() < deadline, "the server never saw the connection"
            await asyncio.sleep(0.01)
        return presented[-1]

    async def dial_until(port: int, check: Callable[[bytes], bool], what: str) -> bytes:
        deadline = time.monotonic() + 20
        while True:
            try:
                got = await dial(port)
            except ssl.SSLError:
                got = b""  # the old CA does not vouch for the new server: not reloaded yet
            if check(got):
                return got
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    try:
        async with old_server, new_server:
            assert await dial(old_port) == der(old.client_cert)
            with pytest.raises(ssl.SSLError):  # the new CA's server, not yet trusted
                await dial(new_port)

            # half-written: the certificate cut in the middle (the old key still beside it)
            text = new.client_cert.read_bytes()
            cert.write_bytes(text[: len(text) // 2])
            with caplog.at_level(logging.INFO, logger="streambus.security"):
                await dial_until(
                    old_port,
                    lambda _got: any(r.levelno == logging.ERROR for r in caplog.records),
                    "no ERROR line for the half-written certificate",
                )
                assert await dial(old_port) == der(old.client_cert)  # the old context stays
                errors = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert len(errors) == 1, errors
                assert "not reloaded" in errors[0].getMessage()

                # the rotation completes: the new CA, certificate and key
                ca.write_bytes(new.ca.read_bytes())
                cert.write_bytes(new.client_cert.read_bytes())
                key.write_bytes(new.client_key.read_bytes())
                await dial_until(
                    new_port,
                    lambda got: got == der(new.client_cert),
                    "the new certificate never presented",
                )
                assert any("reloaded" in r.getMessage() for r in caplog.records)
                assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    finally:
        old_server.close()
        new_server.close()


def test_the_dialer_presents_a_rotated_client_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_rotate(tmp_path, caplog))


def test_unchanged_files_keep_the_same_context(tmp_path: Path) -> None:
    certs: Certs = make_certs(tmp_path)
    tls = ClientTls(
        certs.ca, certs.client_cert, certs.client_key, present_certificate=True, check_hostname=True
    )
    first = tls.context

    async def look() -> ssl.SSLContext:
        tls._checked = 0.0  # as if the last look were long ago
        return await tls.current()

    assert asyncio.run(look()) is first
