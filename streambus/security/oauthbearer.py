"""SASL/OAUTHBEARER: JWTs checked the way Kafka's broker checks them (KIP-768).

The client's one message is RFC 7628's initial response,
``n,[a=authzid],\\x01auth=Bearer <jwt>\\x01[key=value\\x01...]\\x01``. The JWT's
signature is checked with PyJWT against the keys of a JWKS
(``sasl.oauthbearer.jwks.endpoint.url``: ``file://``, ``http://`` or ``https://``)
and only with asymmetric algorithms (RS*, PS*, ES*): never ``none`` or HS*, whose
"key" a client could forge. ``exp`` and ``iat`` are required (as Kafka's
validator requires them), ``exp``/``nbf``/``iat`` allow
``sasl.oauthbearer.clock.skew.seconds``, audience and issuer are checked when
configured, and the principal is ``User:`` + the ``sasl.oauthbearer.sub.claim.name``
claim. Extensions are parsed and ignored, as Kafka's default validator does. The
``sasl.oauthbearer.scope.claim.name`` claim (default ``scope``) is parsed as Kafka's
validator parses it, a space-separated string or a list of strings; a token whose scope
claim is anything else is refused as ``malformed``. Nothing in the broker grants by scope.

The JWKS is fetched in a worker thread (a file read or an HTTP GET never holds the
loop) when the broker starts, so the first login does not wait for it (a failed first
fetch logs a WARNING and is tried again at the first login), shared by every connection;
an ``https://`` endpoint is verified against ``ssl.cafile`` when set, else the system's
CAs. The keys are refreshed in the background once older than
``sasl.oauthbearer.jwks.endpoint.refresh.ms``, and fetched again at once when a token
names a ``kid`` it does not hold (a key the issuer just rotated in) — at most once per
``sasl.oauthbearer.jwks.endpoint.retry.backoff.ms``, so tokens with made-up kids cannot
turn the broker into a flood against the issuer. A failed fetch keeps the keys it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)

from streambus.errors import InvalidConfigError

log = logging.getLogger("streambus.security")

OAUTHBEARER = "OAUTHBEARER"
# Asymmetric only: a symmetric (HS*) key would be a secret the JWKS publishes, and
# "none" is no signature at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
JWKS_MAX_BYTES = 1024 * 1024  # a JWKS is a few keys; more is not one
JWKS_FETCH_TIMEOUT_S = 10.0
TOKEN_MAX_CHARS = 64 * 1024

# RFC 7628 section 3.1 (and Kafka's OAuthBearerClientInitialResponse): the GS2 header,
# ^A, key=value pairs each ended by ^A, then a final ^A.
_RESPONSE = re.compile(
    rb"n,(?:a=(?P<authzid>[^,]*))?,\x01(?P<pairs>(?:[A-Za-z]+=[\x21-\x7e \t\r\n]*\x01)*)\x01",
    re.DOTALL,
)
_AUTH = re.compile(r"(?P<scheme>\w+) +(?P<token>[-_.a-zA-Z0-9]+)")


class TokenRejectedError(Exception):
    """A token that does not authenticate; ``reason`` labels the failures metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InitialResponse:
    authzid: str
    token: str
    extensions: dict[str, str]


@dataclass(frozen=True, slots=True)
class SigningKey:
    jwk: PyJWK
    alg: str | None  # the JWK's own "alg": a token must then use exactly that one


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    principal: str  # User:<sub>
    expires_at: float  # the token's exp, seconds since the epoch
    scopes: tuple[str, ...] = ()  # the scope claim's values (granting nothing by themselves)


def parse_initial_response(data: bytes) -> InitialResponse:
    """The client's first message (raises TokenRejectedError("malformed"))."""
    match = _RESPONSE.fullmatch(data)
    if match is None:
        raise TokenRejectedError("malformed")
    pairs: dict[str, str] = {}
    for item in match["pairs"].split(b"\x01")[:-1]:
        key, _, value = item.decode("ascii").partition("=")
        pairs[key] = value
    auth = _AUTH.fullmatch(pairs.pop("auth", ""))
    if auth is None or auth["scheme"].lower() != "bearer":
        raise TokenRejectedError("malformed")
    authzid = (match["authzid"] or b"").decode("utf-8", "replace")
    return InitialResponse(authzid, auth["token"], pairs)


def error_challenge(status: str = "invalid_token") -> bytes:
    """RFC 7628's server error message, sent as the challenge after a rejected token."""
    return json.dumps({"status": status}, separators=(",", ":")).encode()


def _load(url: str, cafile: Path | None = None) -> bytes:
    """The JWKS document (blocking: run in a worker thread). An https endpoint's
    certificate is checked against ``cafile`` (read at each fetch, so a renewed CA needs
    no restart), else the system's CAs."""
    # file, http or https only: check_url refused any other scheme at startup
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    context = None
    if url.lower().startswith("https:"):
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    with urllib.request.urlopen(  # noqa: S310
        request, timeout=JWKS_FETCH_TIMEOUT_S, context=context
    ) as response:
        body: bytes = response.read(JWKS_MAX_BYTES + 1)
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"JWKS larger than {JWKS_MAX_BYTES} bytes")
    return body


def parse_jwks(body: bytes) -> dict[str | None, SigningKey]:
    """The usable signing keys by kid; symmetric and encryption keys are left out."""
    document = json.loads(body)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("JWKS has no 'keys' list")
    out: dict[str | None, SigningKey] = {}
    for data in keys:
        if not isinstance(data, dict) or data.get("kty") not in ("RSA", "EC"):
            continue
        if data.get("use", "sig") != "sig" or data.get("alg", "RS256") not in ALGORITHMS:
            continue
        try:
            key = PyJWK(data)
        except PyJWKError as exc:
            log.debug("JWKS key %r left out: %s", data.get("kid"), exc)
            continue
        out[data.get("kid")] = SigningKey(key, data.get("alg"))
    return out


def check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise InvalidConfigError(
            f"sasl.oauthbearer.jwks.endpoint.url {url!r}: the scheme is file, http or https"
        )


class JwksCache:
    """One broker's keys from the JWKS endpoint, fetched off the loop and shared."""

    def __init__(
        self, url: str, refresh_ms: int, backoff_ms: int, cafile: Path | None = None
    ) -> None:
        check_url(url)
        self.url = url
        self._cafile = cafile
        self._refresh_s = refresh_ms / 1000
        self._backoff_s = backoff_ms / 1000
        self._keys: dict[str | None, SigningKey] = {}
        self._fetched = 0.0  # monotonic time of the last successful fetch; 0: none yet
        self._tried = float("-inf")  # monotonic time the last fetch started
        self._fetching: asyncio.Task[None] | None = None
        self.fetches = 0  # successful ones

    def prefetch(self) -> None:
        """Start the first fetch in the background (at the broker's start), so the first
        login finds the keys in hand; a login arriving meanwhile waits for this fetch."""
        self._start_refresh()

    async def close(self) -> None:
        """Cancel a fetch in flight (its worker thread ends with its timeout)."""
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetching

    async def key(self, kid: str | None) -> SigningKey | None:
        now = time.monotonic()
        if not self._fetched:
            await self._refresh()
        elif now - self._fetched >= self._refresh_s:
            self._start_refresh()  # in the background: the keys in hand serve meanwhile
        found = self._pick(kid)
        if found is None and time.monotonic() - self._tried >= self._backoff_s:
            await self._refresh()  # a key rotated in since the last fetch
            found = self._pick(kid)
        return found

    def _pick(self, kid: str | None) -> SigningKey | None:
        if kid is not None:
            return self._keys.get(kid)
        # a token without a kid: only when the set leaves no choice
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        return self._fetching

    async def _refresh(self) -> None:
        # shielded: one caller's connection closing does not cancel the others' fetch
        await asyncio.shield(self._start_refresh())

    async def _fetch(self) -> None:
        self._tried = time.monotonic()
        try:
            keys = parse_jwks(await asyncio.to_thread(_load, self.url, self._cafile))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning(
                "fetching the JWKS from %s failed (keeping %d keys): %s",
                self.url,
                len(self._keys),
                exc,
            )
            return
        self._keys = keys
        self._fetched = time.monotonic()
        self.fetches += 1
        log.debug("JWKS from %s: %d signing keys", self.url, len(keys))


class OAuthBearerValidator:
    """Checks a client's initial response and its JWT (KIP-768's validator)."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        clock_skew_s: int = 30,
        audience: tuple[str, ...] = (),
        issuer: str | None = None,
        sub_claim: str = "sub",
        scope_claim: str = "scope",
    ) -> None:
        self.jwks = jwks
        self._skew = clock_skew_s
        self._audience = audience
        self._issuer = issuer
        self._sub_claim = sub_claim
        self._scope_claim = scope_claim

    async def validate(self, response: InitialResponse) -> ValidatedToken:
        """The token's principal and expiry (raises TokenRejectedError)."""
        token = response.token
        if len(token) > TOKEN_MAX_CHARS:
            raise TokenRejectedError("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise TokenRejectedError("malformed") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRejectedError("unsupported_algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejectedError("malformed")
        key = await self.jwks.key(kid)
        if key is None:
            raise TokenRejectedError("unknown_key")
        if key.jwk.key_type != _KEY_TYPE[alg[:2]] or key.alg not in (None, alg):
            raise TokenRejectedError("unsupported_algorithm")
        claims = self._decode(token, key.jwk, alg)
        subject = claims.get(self._sub_claim)
        if not isinstance(subject, str) or not subject:
            raise TokenRejectedError("missing_claim")
        if response.authzid and response.authzid != subject:
            raise TokenRejectedError("authzid_mismatch")
        scopes = parse_scopes(claims.get(self._scope_claim))
        return ValidatedToken("User:" + subject, float(claims["exp"]), scopes)

    def _decode(self, token: str, key: PyJWK, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audience or None,
                issuer=self._issuer,
                leeway=self._skew,
                options={
                    "require": ["exp", "iat"],
                    "verify_aud": bool(self._audience),
                },
            )
        except ExpiredSignatureError:
            raise TokenRejectedError("expired") from None
        except (ImmatureSignatureError, InvalidIssuedAtError):
            raise TokenRejectedError("not_yet_valid") from None
        except InvalidAudienceError:
            raise TokenRejectedError("invalid_audience") from None
        except InvalidIssuerError:
            raise TokenRejectedError("invalid_issuer") from None
        except MissingRequiredClaimError:
            raise TokenRejectedError("missing_claim") from None
        except PyJWTError:
            raise TokenRejectedError("invalid_token") from None
        return claims


def parse_scopes(claim: object) -> tuple[str, ...]:
    """The scope claim as Kafka's validator reads it: absent is no scope, a string is
    space-separated scopes, a list holds one scope per string; anything else (a number,
    an object, a list with a non-string or blank item) raises TokenRejectedError("malformed")."""
    if claim is None:
        return ()
    if isinstance(claim, str):
        return tuple(claim.split())
    if isinstance(claim, list) and all(isinstance(s, str) and s.strip() for s in claim):
        return tuple(s.strip() for s in claim)
    raise TokenRejectedError("malformed")


def validator_from(  # noqa: PLR0917 - the settings as the config names them
    url: str | None,
    refresh_ms: int,
    backoff_ms: int,
    clock_skew_s: int,
    audience: str | None,
    issuer: str | None,
    sub_claim: str,
    scope_claim: str = "scope",
    cafile: Path | None = None,
) -> OAuthBearerValidator:
    """The validator for these settings (raises InvalidConfigError)."""
    if not url:
        raise InvalidConfigError(
            "sasl.enabled.mechanisms has OAUTHBEARER: sasl.oauthbearer.jwks.endpoint.url "
            "must name the issuer's JWKS"
        )
    if refresh_ms < 1 or backoff_ms < 0 or clock_skew_s < 0 or not sub_claim or not scope_claim:
        raise InvalidConfigError(
            "sasl.oauthbearer.jwks.endpoint.refresh.ms must be >= 1, retry.backoff.ms and "
            "clock.skew.seconds >= 0, and sub.claim.name and scope.claim.name not empty"
        )
    audiences = tuple(a.strip() for a in (audience or "").split(",") if a.strip())
    return OAuthBearerValidator(
        JwksCache(url, refresh_ms, backoff_ms, cafile),
        clock_skew_s=clock_skew_s,
        audience=audiences,
        issuer=issuer or None,
        sub_claim=sub_claim,
        scope_claim=scope_claim,
    )
