"""Listeners, named and written as Kafka writes them.

``--listeners PLAINTEXT://0.0.0.0:9092,SASL_SSL://0.0.0.0:9093``: a listener is
``NAME://host:port``; its security protocol is the one
``listener.security.protocol.map`` gives the name (``INTERNAL:PLAINTEXT,...``),
or the name itself when it is one of the four protocols. ``--advertised-listeners``
tells clients where each listener is reached (same names; a listener without an
advertised entry advertises its own host, ``localhost`` for a wildcard).
Without ``--listeners``, ``--host``/``--port`` is one PLAINTEXT listener.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from streambus.errors import InvalidConfigError

PLAIN = "PLAIN"
# The SASL mechanisms a SASL listener can offer (sasl.enabled.mechanisms picks among them).
MECHANISMS = (PLAIN, "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
# What this broker's own client can log in with to other brokers (it holds no token).
INTER_BROKER_MECHANISMS = MECHANISMS[:3]


class SecurityProtocol(enum.StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def tls(self) -> bool:
        return self in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str  # PLAINTEXT, SASL_SSL, or a name of the protocol map (INTERNAL)
    protocol: SecurityProtocol
    host: str  # bound ("" or 0.0.0.0: every interface)
    port: int  # 0: any free port (tests)
    advertised_host: str
    advertised_port: int  # 0: the bound port, once known


def _split(spec: str, what: str) -> list[tuple[str, str, int]]:
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, address = item.partition("://")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not name:
            raise InvalidConfigError(f"{what} entry {item!r} is not NAME://host:port")
        try:
            number = int(port)
        except ValueError:
            raise InvalidConfigError(f"{what} entry {item!r}: port {port!r}") from None
        if not 0 <= number <= 65535:
            raise InvalidConfigError(f"{what} entry {item!r}: port must be 0-65535")
        out.append((name.upper(), host.strip("[]"), number))
    return out


def parse_protocol_map(spec: str | None) -> dict[str, SecurityProtocol]:
    out: dict[str, SecurityProtocol] = {p.value: p for p in SecurityProtocol}
    for item in (part.strip() for part in (spec or "").split(",")):
        if not item:
            continue
        name, _, proto = item.partition(":")
        try:
            out[name.strip().upper()] = SecurityProtocol(proto.strip().upper())
        except ValueError:
            raise InvalidConfigError(
                f"listener.security.protocol.map entry {item!r}: the protocol is one of "
                f"{', '.join(p.value for p in SecurityProtocol)}"
            ) from None
    return out


def parse_listeners(  # noqa: PLR0917 - the six settings, named as the config names them
    listeners: str | None,
    advertised: str | None,
    protocol_map: str | None,
    host: str,
    port: int,
    advertised_host: str | None,
) -> tuple[Listener, ...]:
    """The listeners to serve, in order (raises InvalidConfigError)."""
    protocols = parse_protocol_map(protocol_map)
    bound = _split(listeners, "listeners") if listeners else [("PLAINTEXT", host, port)]
    if not bound:
        raise InvalidConfigError("listeners names no listener")
    adverts = {name: (h, p) for name, h, p in _split(advertised or "", "advertised.listeners")}
    names = [name for name, _, _ in bound]
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"listeners names a listener twice: {listeners}")
    for name in adverts:
        if name not in names:
            raise InvalidConfigError(f"advertised.listeners names {name}, not a listener")
    out = []
    for name, h, p in bound:
        proto = protocols.get(name)
        if proto is None:
            raise InvalidConfigError(
                f"listener {name} is not a security protocol and not in "
                "listener.security.protocol.map"
            )
        default_host = advertised_host or ("localhost" if h in ("", "0.0.0.0", "::") else h)
        ah, ap = adverts.get(name, (default_host, 0))
        out.append(Listener(name, proto, h, p, ah or default_host, ap))
    return tuple(out)


def find(listeners: Sequence[Listener], name: str | None) -> Listener:
    """The listener called ``name``; the first one for None."""
    if name is None:
        return listeners[0]
    for listener in listeners:
        if listener.name == name.upper():
            return listener
    raise InvalidConfigError(
        f"inter.broker.listener.name {name} is not one of the listeners "
        f"({', '.join(x.name for x in listeners)})"
    )
