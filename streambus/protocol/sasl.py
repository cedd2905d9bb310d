"""SaslHandshake (17) and SaslAuthenticate (36): the connection's SASL exchange.

The state is the connection's (``ctx.session``, see ``streambus.security.sasl``);
on a listener without SASL both answer ILLEGAL_SASL_STATE, as Kafka does. A
failure is answered with its code and message, and the server closes the
connection once the answer is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)

from streambus.errors import IllegalSaslStateError, StreamBusError
from streambus.protocol.apis import ApiRoutes, RequestContext

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

routes = ApiRoutes()


@routes.api(SaslHandshakeRequest, SaslHandshakeResponse, versions=(0, 1))
async def handle_sasl_handshake(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    session = ctx.session
    if session is None:
        services.telemetry.error("SaslHandshake", IllegalSaslStateError.kafka_name)
        return SaslHandshakeResponse(error_code=IllegalSaslStateError.errno, mechanisms=[])
    try:
        session.handshake(request.mechanism, ctx.api_version)
    except StreamBusError as exc:
        services.telemetry.error("SaslHandshake", exc.kafka_name)
        return SaslHandshakeResponse(error_code=exc.errno, mechanisms=list(session.mechanisms))
    return SaslHandshakeResponse(error_code=0, mechanisms=list(session.mechanisms))


@routes.api(SaslAuthenticateRequest, SaslAuthenticateResponse, versions=(0, 2))
async def handle_sasl_authenticate(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    session = ctx.session
    fields: dict[str, Any] = {}
    if session is None or session.raw_tokens:
        # no SASL here, or a handshake v0 announced bare tokens instead of this request
        error: StreamBusError = IllegalSaslStateError(
            "SaslAuthenticate is not expected on this connection now"
        )
    else:
        try:
            reply = await session.authenticate(bytes(request.auth_bytes))
        except StreamBusError as exc:
            error = exc
        else:
            if ctx.api_version >= 1:
                fields["session_lifetime_ms"] = (
                    session.session_lifetime_ms if session.authenticated else 0
                )
            return SaslAuthenticateResponse(
                error_code=0, error_message=None, auth_bytes=reply, **fields
            )
    if session is not None:
        session.failed = True
    services.telemetry.error("SaslAuthenticate", error.kafka_name)
    if ctx.api_version >= 1:
        fields["session_lifetime_ms"] = 0
    return SaslAuthenticateResponse(
        error_code=error.errno, error_message=error.message, auth_bytes=b"", **fields
    )
