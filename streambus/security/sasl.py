"""One connection's SASL authentication: PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER.

A SASL listener serves ApiVersions, SaslHandshake and SaslAuthenticate only
until the client has authenticated (the server closes a connection that tries
anything else). SaslHandshake picks the mechanism; the tokens then come in
SaslAuthenticate requests (handshake v1), or as bare size-prefixed frames after
a handshake v0 (Kafka 0.10's form). SCRAM is the ``scramp`` library's server;
PLAIN checks the password against the user's stored SCRAM credential.
OAUTHBEARER checks a JWT (``streambus.security.oauthbearer``); a rejected token is
answered as Kafka answers it (RFC 7628 3.2.2): the error JSON as a challenge, then
SASL_AUTHENTICATION_FAILED to the client's ``\x01``; the token's ``exp`` bounds the
session as ``connections.max.reauth.ms`` does, whichever ends first.

A failed authentication is counted, logged on one WARNING line naming the
client, mechanism and reason (never a password or a token), answered after
``connection.failed.authentication.delay.ms`` and then the connection is
closed, so each guess costs a brute-forcer a connection and the delay.
With ``connections.max.reauth.ms`` set, a session lasts that long: the client
is told (SaslAuthenticate v1+ ``session_lifetime_ms``) and must authenticate
again on the same connection, or the connection is closed at its next request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from scramp import ScramException, ScramMechanism
from scramp.core import Nonce, ScramServer

from streambus.errors import (
    IllegalSaslStateError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)
from streambus.security.listeners import PLAIN
from streambus.security.oauthbearer import (
    OAUTHBEARER,
    TokenRejectedError,
    error_challenge,
    parse_initial_response,
)
from streambus.security.tls import ANONYMOUS

if TYPE_CHECKING:
    from streambus.instrumentation import BrokerTelemetry
    from streambus.security.audit import AuditLog
    from streambus.security.credentials import CredentialStore
    from streambus.security.oauthbearer import OAuthBearerValidator

log = logging.getLogger("streambus.security")

# The API keys a SASL listener answers before authentication: ApiVersions,
# SaslHandshake, SaslAuthenticate.
SASL_AUTHENTICATE = 36
PRE_AUTH_APIS = frozenset({18, 17, SASL_AUTHENTICATE})


def _failed(mechanism: str) -> SaslAuthenticationFailedError:
    # One message whatever went wrong (unknown user, wrong password): Kafka's wording,
    # and no hint to a guesser about which users exist.
    return SaslAuthenticationFailedError(
        f"Authentication failed during authentication due to invalid credentials with SASL "
        f"mechanism {mechanism}"
    )


class SaslSession:
    def __init__(
        self,
        store: CredentialStore,
        mechanisms: tuple[str, ...],
        listener: str,
        telemetry: BrokerTelemetry,
        *,
        peer: str,
        failure_delay_ms: int,
        reauth_ms: int,
        principal: str = ANONYMOUS,
        warn: Callable[..., None] = log.warning,
        audit: AuditLog | None = None,
        oauth: OAuthBearerValidator | None = None,
    ) -> None:
        # warn(msg, *args): the server passes a rate-limited one, so a flood of failed
        # logins costs a few lines.
        self._warn = warn
        self._audit = audit
        self._store = store
        self.mechanisms = mechanisms
        self.listener = listener
        self._telemetry = telemetry
        self._peer = peer
        self._delay_s = failure_delay_ms / 1000
        self.reauth_ms = reauth_ms
        self.principal = principal
        self.authenticated = False
        self.mechanism: str | None = None
        self.raw_tokens = False  # a handshake v0: the next frames are bare tokens
        self.failed = False  # answered with a failure: close once it is written
        self.expires_at: float | None = None  # monotonic; None: never
        self._scram: ScramServer | None = None
        self._scram_user = ""  # the user SCRAM's client-first named
        self._claimed = ""  # the user the client claimed (PLAIN or SCRAM), for the audit
        self._reauthenticating = False
        self._oauth = oauth
        self._token_expires: float | None = None  # the OAuth token's exp (epoch seconds)
        self._rejected: str | None = None  # the error JSON sent; the client's ^A ends it
        self.session_lifetime_ms = 0  # what SaslAuthenticate v1+ tells the client

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def handshake(self, mechanism: str, version: int) -> None:
        """Pick the mechanism; raises UnsupportedSaslMechanismError or IllegalSaslStateError."""
        if self.mechanism is not None:
            raise IllegalSaslStateError("SaslHandshake already received on this connection")
        if mechanism not in self.mechanisms:
            self.failed = True
            self._telemetry.authentication("unsupported", self.listener, "unsupported_mechanism")
            self._audited(ANONYMOUS, mechanism[:64], False, "unsupported_mechanism")
            self._warn(
                "authentication from %s on listener %s failed: mechanism %r not enabled",
                self._peer,
                self.listener,
                mechanism[:64],
            )
            raise UnsupportedSaslMechanismError(
                f"Unsupported SASL mechanism {mechanism[:64]}; "
                f"enabled: {', '.join(self.mechanisms)}"
            )
        self._reauthenticating = self.authenticated
        self.mechanism = mechanism
        self.raw_tokens = version == 0
        self._scram = None
        self._rejected = None

    async def authenticate(self, token: bytes) -> bytes:
        """The server's next token; raises SaslAuthenticationFailedError (after the delay)."""
        mechanism = self.mechanism
        if mechanism is None:
            raise IllegalSaslStateError("SaslAuthenticate before SaslHandshake")
        if self._rejected is not None:
            # whatever the client sends after the error challenge (its ^A): the failure
            # was counted and delayed when the token was rejected
            self.failed = True
            raise SaslAuthenticationFailedError(f"Authentication failed: {self._rejected}")
        try:
            reply, principal = await self._step(mechanism, token)
        except TokenRejectedError as rejected:
            await self._fail(mechanism, rejected.reason, close=False)
            self._rejected = error_challenge().decode()
            return error_challenge()
        except _FailureError as failure:
            await self._fail(mechanism, failure.reason)
            raise _failed(mechanism) from None
        if principal is None:
            return reply
        if self._reauthenticating and principal != self.principal:
            await self._fail(mechanism, "principal_changed")
            raise SaslAuthenticationFailedError("Cannot change principals during re-authentication")
        self.principal = principal
        self.authenticated = True
        self.mechanism = None
        self.raw_tokens = False
        self._scram = None
        self._reauthenticating = False
        lifetimes = [self.reauth_ms] if self.reauth_ms > 0 else []
        if self._token_expires is not None:
            # at least 1 ms: 0 would tell the client the session never ends
            lifetimes.append(max(1, int((self._token_expires - time.time()) * 1000)))
            self._token_expires = None
        if lifetimes:
            self.session_lifetime_ms = min(lifetimes)
            self.expires_at = time.monotonic() + self.session_lifetime_ms / 1000
        self._telemetry.authentication(mechanism, self.listener, None)
        self._audited(principal, mechanism, True, None)
        log.debug("%s authenticated as %s with %s", self._peer, principal, mechanism)
        return reply

    async def _step(self, mechanism: str, token: bytes) -> tuple[bytes, str | None]:
        """(the reply, the principal once authentication completes)."""
        if mechanism == PLAIN:
            parts = token.split(b"\0")
            if len(parts) != 3:
                raise _FailureError("malformed")
            authzid, user, password = (p.decode("utf-8", "replace") for p in parts)
            if not user or (authzid and authzid != user):
                raise _FailureError("malformed")
            self._claimed = user[:256]
            if not await self._store.check_plain(user, password):
                raise _FailureError("invalid_credentials")
            return b"", "User:" + user
        if mechanism == OAUTHBEARER:
            if self._oauth is None:
                raise _FailureError("unsupported_mechanism")
            try:
                response = parse_initial_response(token)
            except TokenRejectedError:  # not a bearer token at all: Kafka fails at once
                raise _FailureError("malformed") from None
            validated = await self._oauth.validate(response)
            self._token_expires = validated.expires_at
            return b"", validated.principal
        try:
            text = token.decode("utf-8")
            if self._scram is None:
                self._scram = ScramMechanism(mechanism).make_server(
                    lambda user: self._auth_info(user, mechanism)
                )
                self._scram.set_client_first(text)
                return self._scram.get_server_first().encode(), None
            server, self._scram = self._scram, None
            echoed = next((a[2:] for a in text.split(",") if a.startswith("r=")), "")
            ours = str(server.nonce)
            if echoed != ours and echoed.endswith(ours):
                # librdkafka 2.0 (kcat 1.7) echoes its own nonce once more in front; Kafka
                # accepts a final nonce that ends with the server's (ScramSaslServer), and
                # the proof still covers the message exactly as the client sent it.
                server.nonce = Nonce(echoed)
            server.set_client_final(text)
            return server.get_server_final().encode(), "User:" + self._scram_user
        except (ScramException, UnicodeDecodeError, _FailureError) as exc:
            log.debug("SCRAM exchange with %s failed: %r", self._peer, exc)
            reason = exc.reason if isinstance(exc, _FailureError) else "invalid_credentials"
            raise _FailureError(reason) from None

    def _auth_info(self, user: str, mechanism: str) -> tuple[bytes, bytes, bytes, int]:
        self._scram_user = user
        self._claimed = user[:256]
        credential = self._store.lookup(user, mechanism)
        if credential is None:
            raise _FailureError("invalid_credentials")
        return credential.salt, credential.stored_key, credential.server_key, credential.iterations

    async def _fail(self, mechanism: str, reason: str, *, close: bool = True) -> None:
        self.failed = close
        self._telemetry.authentication(mechanism, self.listener, reason)
        # The principal the client claimed (never what it offered as proof)
        claimed = "User:" + self._claimed if self._claimed else ANONYMOUS
        self._audited(claimed, mechanism, False, reason)
        self._warn(
            "authentication from %s on listener %s with %s failed: %s",
            self._peer,
            self.listener,
            mechanism,
            reason.replace("_", " "),
        )
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)

    def _audited(self, principal: str, mechanism: str, success: bool, reason: str | None) -> None:
        if self._audit is not None:
            self._audit.authentication(
                principal, mechanism, self.listener, self._peer, success, reason
            )


class _FailureError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
