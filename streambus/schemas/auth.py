"""Who may use the registry's REST API: HTTP Basic authentication and subject ACLs.

Authentication (``schema_registry_authentication``): ``none`` (Confluent's default)
makes every caller ``User:ANONYMOUS``; ``basic`` requires ``Authorization: Basic`` on
every request, checked against the broker's SCRAM credentials (the same users as SASL),
and answers 401 with Confluent's 40101 and a ``WWW-Authenticate`` challenge otherwise
(wrong or malformed credentials after a fixed delay, as Kafka's SASL does).
A password is PBKDF2-derived off the event loop; a password that matched is remembered
by its keyed digest (never the text) for as long as the user's credential stays the
same, so a client's every request does not pay the derivation again.

Authorization follows Confluent's topic-based ACLs (``TopicAclAuthorizer``) through the
broker's own authorizer, when it is on: a subject ``<topic>-key`` / ``<topic>-value``
is the TOPIC ``<topic>``, any other subject the TOPIC of its own name. Reading a
subject needs READ, changing it WRITE; the global ``/config`` and ``/mode`` need
DESCRIBE_CONFIGS / ALTER_CONFIGS on the CLUSTER, a subject's those on its topic.
Listings show only the subjects the caller may read (hidden entries are not audited,
as Kafka's Metadata does not audit the topics it leaves out).

Both read the broker's ACLs and credentials, which a cluster member loads from the
Raft log after its listeners open (``streambus.security.readiness``). A request that
needs them waits for them, bounded, as the Kafka port does; still not loaded, it is
answered 503 with Confluent's 50002 (operation timed out) and ``Retry-After``, a
status Confluent's clients retry, never decided against an empty set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streambus.cluster import acls
from streambus.schemas.errors import ForbiddenError, SchemaRegistryError, UnauthorizedError
from streambus.security.authorizer import ANONYMOUS

if TYPE_CHECKING:
    from streambus.cluster.scram_credentials import ScramCredential
    from streambus.instrumentation import BrokerTelemetry
    from streambus.security.audit import AuditLog
    from streambus.security.authorizer import Authorizer
    from streambus.security.credentials import CredentialStore
    from streambus.security.readiness import SecurityState

log = logging.getLogger("streambus.schemas")

NONE, BASIC = "none", "basic"
MODES = (NONE, BASIC)
MECHANISM = "BASIC"
LISTENER = "schema-registry"
REALM = 'Basic realm="StreamBus Schema Registry"'
API_KEY = -1  # a REST request has no Kafka API key; audit lines say -1
FAILED_LOGIN_DELAY_S = 0.3  # before a wrong or malformed login is answered 401
_REMEMBERED_MAX = 1024  # (user, password digest) pairs that matched, at most
# How long a request waits for the ACLs and credentials: below the timeouts of
# Confluent's clients, which then retry the 503.
NOT_READY_WAIT_S = 5.0
RETRY_AFTER_S = 1  # the Retry-After of that 503
_NOT_READY_LOG_EVERY_S = 10.0  # one warning line per this, not one per request


class RegistryNotReadyError(SchemaRegistryError):
    """The broker's ACLs or credentials are not loaded yet: retry (Retry-After)."""

    http_status = 503
    error_code = 50002  # Confluent's OPERATION_TIMEOUT_ERROR_CODE
    description = "The broker has not loaded its ACLs and credentials yet"


# What a route needs of its subject (the routes without a subject are handled apart).
_SUBJECT_ROUTES: dict[tuple[str, str], int] = {
    ("GET", "/subjects/{subject}/versions"): acls.READ,
    ("POST", "/subjects/{subject}/versions"): acls.WRITE,
    ("GET", "/subjects/{subject}/versions/{version}"): acls.READ,
    ("DELETE", "/subjects/{subject}/versions/{version}"): acls.WRITE,
    ("GET", "/subjects/{subject}/versions/{version}/schema"): acls.READ,
    ("GET", "/subjects/{subject}/versions/{version}/referencedby"): acls.READ,
    ("POST", "/subjects/{subject}"): acls.READ,
    ("DELETE", "/subjects/{subject}"): acls.WRITE,
    ("POST", "/compatibility/subjects/{subject}/versions/{version}"): acls.READ,
    ("POST", "/compatibility/subjects/{subject}/versions"): acls.READ,
}
_CONFIG_ROUTES = ("/config", "/config/{subject}", "/mode", "/mode/{subject}")


@dataclass(frozen=True, slots=True)
class RestRequester:
    """The authorizer's view of a REST request (its ``Requester``)."""

    principal: str
    peer: str
    api_key: int = API_KEY
    listener: str = LISTENER


def subject_topic(subject: str) -> str:
    """The TOPIC resource a subject is authorized as (TopicNameStrategy's suffixes off)."""
    for suffix in ("-key", "-value"):
        if subject.endswith(suffix) and len(subject) > len(suffix):
            return subject[: -len(suffix)]
    return subject


def _denied(ctx: RestRequester, operation: int, resource_type: int, name: str) -> ForbiddenError:
    return ForbiddenError(
        f"User is denied operation {acls.OPERATION_NAMES[operation]} on "
        f"{acls.RESOURCE_NAMES[resource_type]} {name} ({ctx.principal})"
    )


class RegistrySecurity:
    def __init__(
        self,
        mode: str,
        credentials: CredentialStore | None,
        authorizer: Authorizer | None,
        telemetry: BrokerTelemetry,
        audit: AuditLog | None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"schema registry authentication is 'none' or 'basic', not {mode!r}")
        if mode == BASIC and credentials is None:
            raise ValueError("basic authentication needs the credential store")
        self.mode = mode
        self._credentials = credentials
        self._authorizer = authorizer
        self._telemetry = telemetry
        self._audit = audit
        self._key = os.urandom(32)  # keys the digests of remembered passwords
        self._remembered: OrderedDict[tuple[str, bytes], ScramCredential] = OrderedDict()
        self._not_ready_logged = float("-inf")
        self._not_ready_count = 0

    @property
    def _state(self) -> SecurityState | None:
        """What this security reads, when it reads anything (None: nothing to wait for)."""
        if self.authorizing:
            assert self._authorizer is not None
            return self._authorizer.state
        if self.mode == BASIC:
            assert self._credentials is not None
            return self._credentials.state
        return None

    async def ready(self, method: str, path: str, peer: str) -> None:
        """Hold a request until the ACLs and credentials are loaded; raise 503 at the bound."""
        state = self._state
        if state is None or state.loaded or await state.wait(NOT_READY_WAIT_S):
            return
        raise self.not_ready(method, path, peer)

    def not_ready(self, method: str, path: str, peer: str) -> RegistryNotReadyError:
        """The 503 for a request that met the ACLs or credentials unloaded; logged a few
        lines at a time, as the Kafka port logs the connections it closes for it."""
        self._not_ready_count += 1
        now = time.monotonic()
        if now - self._not_ready_logged >= _NOT_READY_LOG_EVERY_S:
            self._not_ready_logged = now
            log.warning(
                "schema registry: answering 503 to %s %s from %s: this broker has not "
                "loaded its ACLs and credentials yet (%d such answers so far)",
                method,
                path,
                peer,
                self._not_ready_count,
            )
        return RegistryNotReadyError(
            "The broker has not loaded its ACLs and credentials yet; retry shortly"
        )

    @property
    def authorizing(self) -> bool:
        return self._authorizer is not None and self._authorizer.enabled

    # -- authentication -------------------------------------------------------------------
    async def authenticate(self, authorization: str | None, peer: str) -> RestRequester:
        """The caller of a request with this ``Authorization`` header (raises 401)."""
        if self.mode == NONE:
            return RestRequester(ANONYMOUS, peer)
        user, reason = "", "missing"
        if authorization:
            user, password, reason = _parse_basic(authorization)
            if not reason and not await self._matches(user, password):
                reason = "invalid_credentials"
        principal = "User:" + user if user else ANONYMOUS
        self._telemetry.authentication(MECHANISM, LISTENER, reason or None)
        if self._audit is not None:
            self._audit.authentication(
                principal, MECHANISM, LISTENER, peer, not reason, reason or None
            )
        if reason:
            if reason != "missing":  # a client's first try without credentials is routine
                log.warning(
                    "schema registry: authentication of %s from %s failed: %s",
                    principal,
                    peer,
                    reason.replace("_", " "),
                )
                # Fixed, and awaited: slows a password guesser down without holding the
                # loop or any other request (Kafka's connection.failed.authentication.delay.ms).
                await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            raise UnauthorizedError(
                "Unauthorized: "
                + ("no credentials" if reason == "missing" else "invalid credentials")
            )
        return RestRequester(principal, peer)

    async def _matches(self, user: str, password: str) -> bool:
        assert self._credentials is not None
        digest = hmac.digest(self._key, password.encode(), hashlib.sha256)
        key = (user, digest)
        seen = self._remembered.get(key)
        current = [self._credentials.lookup(user, m) for m in ("SCRAM-SHA-256", "SCRAM-SHA-512")]
        if seen is not None and any(seen is c for c in current):
            self._remembered.move_to_end(key)
            return True
        self._remembered.pop(key, None)
        if not await self._credentials.check_plain(user, password):
            return False
        credential = next((c for c in current if c is not None), None)
        if credential is not None:
            self._remembered[key] = credential
            while len(self._remembered) > _REMEMBERED_MAX:
                self._remembered.popitem(last=False)
        return True

    # -- authorization --------------------------------------------------------------------
    def check_route(
        self, ctx: RestRequester, method: str, route: str, match: Mapping[str, str]
    ) -> None:
        """Raise 403 unless ``ctx`` may call this route (listings filter in their handlers)."""
        if not self.authorizing:
            return
        operation = _SUBJECT_ROUTES.get((method, route))
        if operation is not None:
            self.require_subject(ctx, operation, match["subject"])
            return
        if route in _CONFIG_ROUTES:
            operation = acls.DESCRIBE_CONFIGS if method == "GET" else acls.ALTER_CONFIGS
            subject = match.get("subject")
            if subject is None:
                self._require(ctx, operation, acls.CLUSTER, acls.CLUSTER_NAME)
            else:
                self._require(ctx, operation, acls.TOPIC, subject_topic(subject))

    def require_subject(self, ctx: RestRequester, operation: int, subject: str) -> None:
        self._require(ctx, operation, acls.TOPIC, subject_topic(subject))

    def _require(self, ctx: RestRequester, operation: int, resource_type: int, name: str) -> None:
        assert self._authorizer is not None
        if not self._authorizer.authorize(ctx, operation, resource_type, name):
            raise _denied(ctx, operation, resource_type, name)

    def readable(self, ctx: RestRequester, subjects: Iterable[str]) -> list[str]:
        """The subjects ``ctx`` may read, in their order (unaudited: a listing hides)."""
        subjects = list(subjects)
        if not self.authorizing:
            return subjects
        assert self._authorizer is not None
        allowed: dict[str, bool] = {}
        out = []
        for subject in subjects:
            topic = subject_topic(subject)
            if topic not in allowed:
                allowed[topic] = self._authorizer.authorize(
                    ctx, acls.READ, acls.TOPIC, topic, quiet=True
                )
            if allowed[topic]:
                out.append(subject)
        return out

    def require_any_subject(self, ctx: RestRequester, subjects: list[str]) -> None:
        """A schema by id: READ on at least one subject that holds it."""
        if not self.authorizing or not subjects or self.readable(ctx, subjects):
            return
        self.require_subject(ctx, acls.READ, subjects[0])  # counted, audited, raises


def _parse_basic(header: str) -> tuple[str, str, str]:
    """(user, password, failure reason or "") of an ``Authorization`` header."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return "", "", "unsupported_scheme"
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", "", "malformed"
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return "", "", "malformed"
    return user, password, ""
