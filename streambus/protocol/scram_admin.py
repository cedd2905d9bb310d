"""DescribeUserScramCredentials (50) and AlterUserScramCredentials (51): the SCRAM
credential table, as ``kafka-configs --entity-type users`` and admin clients manage it.

Answered with Kafka's per-user errors: RESOURCE_NOT_FOUND for a user (or a
deleted credential) that does not exist, DUPLICATE_RESOURCE for a user named
twice, UNSUPPORTED_SASL_MECHANISM, UNACCEPTABLE_CREDENTIAL for an empty name or
iterations outside [4096, 16384]. A user's changes apply only when all of them
are acceptable. Keys and salts are never described, only mechanism and iterations.

Both read the credential table, which a cluster member loads from the Raft log after
its listeners open. With the authorizer on the server holds every request until it is
loaded; without it these two wait here, bounded, and a table still not loaded is
answered REQUEST_TIMED_OUT, which clients retry, rather than an empty or wrong table.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from kafka.protocol.admin import (
    AlterUserScramCredentialsRequest,
    AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest,
    DescribeUserScramCredentialsResponse,
)

from streambus.cluster.records import AlterScramCredential
from streambus.cluster.scram_credentials import (
    MAX_ITERATIONS,
    MIN_ITERATIONS,
    SCRAM_MECHANISMS,
    record_for,
)
from streambus.errors import (
    DuplicateResourceError,
    RequestTimedOutError,
    ResourceNotFoundError,
    SecurityNotReadyError,
    StreamBusError,
    UnacceptableCredentialError,
    UnsupportedSaslMechanismError,
)
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.security.credentials import from_salted_password
from streambus.security.readiness import WAIT_S

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()

# Kafka's ScramMechanism type bytes on the wire
MECHANISM_TYPES = {1: "SCRAM-SHA-256", 2: "SCRAM-SHA-512"}
TYPE_OF = {name: code for code, name in MECHANISM_TYPES.items()}


def _not_loaded() -> RequestTimedOutError:
    return RequestTimedOutError(
        f"this broker has not loaded its SCRAM credentials after {WAIT_S:.0f} s; retry"
    )


async def _loaded(services: BrokerServices, api: str) -> StreamBusError | None:
    """None once the credential table is loaded; the retriable error past the bound."""
    if await services.credentials.state.wait(WAIT_S):
        return None
    error = _not_loaded()
    services.telemetry.error(api, error.kafka_name)
    log.warning("answering %s to %s: %s", error.kafka_name, api, error.message)
    return error


@routes.api(
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse, versions=(0, 0)
)
async def handle_describe_user_scram_credentials(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeUserScramCredentialsResponse
    unready = await _loaded(services, "DescribeUserScramCredentials")
    if unready is not None:
        return R(
            throttle_time_ms=0,
            error_code=unready.errno,
            error_message=unready.message,
            results=[],
        )
    table = services.credentials.users()
    names = [u.name for u in request.users or ()]
    counts = collections.Counter(names)
    results = []
    for user in names if names else sorted(table):
        code, message, infos = 0, None, []
        if counts[user] > 1:
            error: StreamBusError | None = DuplicateResourceError(
                "Cannot describe SCRAM credentials for the same user twice in a single request"
            )
        elif user not in table:
            error = ResourceNotFoundError(
                "Attempt to describe a user credential that does not exist"
            )
        else:
            error = None
            infos = [
                R.DescribeUserScramCredentialsResult.CredentialInfo(
                    mechanism=TYPE_OF[m], iterations=i
                )
                for m, i in sorted(table[user].items())
            ]
        if error is not None:
            code, message = error.errno, error.message
            services.telemetry.error("DescribeUserScramCredentials", error.kafka_name)
        results.append(
            R.DescribeUserScramCredentialsResult(
                user=user, error_code=code, error_message=message, credential_infos=infos
            )
        )
    return R(throttle_time_ms=0, error_code=0, error_message=None, results=results)


@routes.api(AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse, versions=(0, 0))
async def handle_alter_user_scram_credentials(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = AlterUserScramCredentialsResponse
    # user -> [(mechanism type, upsertion or None for a deletion)] in request order
    changes: dict[str, list[tuple[int, Any]]] = {}
    for d in request.deletions or ():
        changes.setdefault(d.name, []).append((d.mechanism, None))
    for u in request.upsertions or ():
        changes.setdefault(u.name, []).append((u.mechanism, u))
    unready = await _loaded(services, "AlterUserScramCredentials")
    results = []
    for user, ops in changes.items():
        error: StreamBusError | None = unready
        try:
            if error is not None:
                raise error
            records = _records(user, ops)
            for record in records:
                if not record.iterations and not services.credentials.lookup(
                    record.user, record.mechanism
                ):
                    raise ResourceNotFoundError(
                        "Attempt to delete a user credential that does not exist"
                    )
            for record in records:
                result = await services.credentials.submit(record)
                error = result.error()
                if error is not None:
                    break
        except SecurityNotReadyError:  # unloaded again: a broker stopping
            error = _not_loaded()
        except StreamBusError as exc:
            error = exc
        if error is not None and error is not unready:
            services.telemetry.error("AlterUserScramCredentials", error.kafka_name)
        results.append(
            R.AlterUserScramCredentialsResult(
                user=user,
                error_code=0 if error is None else error.errno,
                error_message=None if error is None else error.message,
            )
        )
    return R(throttle_time_ms=0, results=results)


def _records(user: str, ops: list[tuple[int, Any]]) -> list[AlterScramCredential]:
    """One user's records, every change checked first (raises, so none applies)."""
    if not user:
        raise UnacceptableCredentialError("Username must not be empty")
    kinds = [kind for kind, _ in ops]
    if len(set(kinds)) != len(kinds):
        raise DuplicateResourceError(
            "A user credential cannot be altered twice in the same request"
        )
    records = []
    for kind, upsertion in ops:
        mechanism = MECHANISM_TYPES.get(kind)
        if mechanism is None or mechanism not in SCRAM_MECHANISMS:
            raise UnsupportedSaslMechanismError("Unknown SCRAM mechanism")
        if upsertion is None:
            records.append(record_for(user, mechanism, None))
            continue
        if upsertion.iterations < MIN_ITERATIONS:
            raise UnacceptableCredentialError("Too few iterations")
        if upsertion.iterations > MAX_ITERATIONS:
            raise UnacceptableCredentialError("Too many iterations")
        if not upsertion.salt or not upsertion.salted_password:
            raise UnacceptableCredentialError("Salt and salted password must not be empty")
        credential = from_salted_password(
            mechanism, bytes(upsertion.salted_password), bytes(upsertion.salt), upsertion.iterations
        )
        records.append(record_for(user, mechanism, credential))
    return records
