"""SCRAM credentials in the replicated metadata: what ``AlterScramCredential`` records change.

Pure, as the rest of ``streambus.cluster``: the credential table lives in the
:class:`~streambus.cluster.state.ClusterState` every broker applies alike; this
module validates a record and builds the table after it. What is stored is
Kafka's ``ScramCredential``: the salt, the stored key and the server key
(RFC 5802) and the iteration count, never a password. Byte strings travel as
base64 text so a record stays JSON (see ``streambus.cluster.records``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from streambus.cluster.records import AlterScramCredential
from streambus.errors import (
    ResourceNotFoundError,
    UnacceptableCredentialError,
    UnsupportedSaslMechanismError,
)

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
# Kafka's bounds (ScramMechanism.minIterations / maxIterations).
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 16384


@dataclass(frozen=True, slots=True)
class ScramCredential:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int


# user -> mechanism -> credential
CredentialTable = Mapping[str, Mapping[str, ScramCredential]]
EMPTY: CredentialTable = MappingProxyType({})


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnacceptableCredentialError(f"{text!r} is not base64") from None


def altered(table: CredentialTable, record: AlterScramCredential) -> CredentialTable:
    """The table after ``record`` (raises a StreamBusError, changing nothing)."""
    if not record.user:
        raise UnacceptableCredentialError("Username must not be empty")
    if record.mechanism not in SCRAM_MECHANISMS:
        raise UnsupportedSaslMechanismError(
            f"Unknown SCRAM mechanism {record.mechanism!r} (known: {', '.join(SCRAM_MECHANISMS)})"
        )
    mechanisms = dict(table.get(record.user, {}))
    if record.iterations == 0:  # a deletion
        if record.mechanism not in mechanisms:
            raise ResourceNotFoundError(
                f"Attempt to delete a user credential that does not exist: "
                f"{record.user} {record.mechanism}"
            )
        del mechanisms[record.mechanism]
    else:
        if not MIN_ITERATIONS <= record.iterations <= MAX_ITERATIONS:
            raise UnacceptableCredentialError(
                f"Iterations {record.iterations} outside [{MIN_ITERATIONS}, {MAX_ITERATIONS}]"
            )
        salt = _b64(record.salt)
        stored, server = _b64(record.stored_key), _b64(record.server_key)
        if not salt or not stored or not server:
            raise UnacceptableCredentialError("salt and keys must not be empty")
        mechanisms[record.mechanism] = ScramCredential(salt, stored, server, record.iterations)
    out = dict(table)
    if mechanisms:
        out[record.user] = MappingProxyType(mechanisms)
    else:
        out.pop(record.user, None)
    return MappingProxyType(out)


def record_for(
    user: str, mechanism: str, credential: ScramCredential | None
) -> AlterScramCredential:
    """The record that sets (or, with None, deletes) one credential."""
    if credential is None:
        return AlterScramCredential(user, mechanism)
    return AlterScramCredential(
        user,
        mechanism,
        base64.b64encode(credential.salt).decode(),
        base64.b64encode(credential.stored_key).decode(),
        base64.b64encode(credential.server_key).decode(),
        credential.iterations,
    )


def table_to_wire(table: CredentialTable) -> list[Any]:
    """[[user, mechanism, salt, stored_key, server_key, iterations], ...] sorted."""
    out = []
    for user, mechanisms in sorted(table.items()):
        for mechanism, cred in sorted(mechanisms.items()):
            r = record_for(user, mechanism, cred)
            out.append([user, mechanism, r.salt, r.stored_key, r.server_key, r.iterations])
    return out


def table_from_wire(wire: Any) -> CredentialTable:
    table: CredentialTable = EMPTY
    for user, mechanism, salt, stored, server, iterations in wire or ():
        record = AlterScramCredential(
            str(user), str(mechanism), str(salt), str(stored), str(server), int(iterations)
        )
        table = altered(table, record)
    return table
