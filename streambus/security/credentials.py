"""SCRAM credentials: made, looked up, checked, and kept durably.

Credentials are replicated metadata (``AlterScramCredential`` records through
the quorum, see ``streambus.cluster.scram_credentials``). A single broker's
quorum lives in memory, so, as client quotas do, it also writes the table to
``DATA_DIR/scram_credentials.json`` after each change and replays it at start::

    {"v": 1, "credentials": [[user, mechanism, salt, stored_key, server_key, iterations]]}

(byte strings base64). The SCRAM derivation is the ``scramp`` library's; a
credential set through AlterUserScramCredentials arrives already salted (the
client sends SaltedPassword), and only its two keys are derived here, with the
standard library's HMAC and hash (RFC 5802, section 3).

No credential is looked up before the table is loaded (``state``, shared with the
authorizer): an empty table would refuse a right password as a wrong one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scramp import ScramMechanism

from streambus.cluster.local_file import StateFile
from streambus.cluster.quorum import LocalQuorum, Quorum
from streambus.cluster.records import AlterScramCredential, Result
from streambus.cluster.scram_credentials import (
    MIN_ITERATIONS,
    SCRAM_MECHANISMS,
    ScramCredential,
    table_from_wire,
    table_to_wire,
)
from streambus.errors import SecurityNotReadyError
from streambus.security.readiness import SecurityState

log = logging.getLogger("streambus.security")

FILE_NAME = "scram_credentials.json"
DEFAULT_ITERATIONS = MIN_ITERATIONS
_HASH = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


def make_credential(
    mechanism: str, password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramCredential:
    """A new salted credential for ``password`` (a random salt unless given)."""
    salt_out, stored, server, count = ScramMechanism(mechanism).make_auth_info(
        password, iteration_count=iterations, salt=salt
    )
    return ScramCredential(salt_out, stored, server, count)


def from_salted_password(
    mechanism: str, salted_password: bytes, salt: bytes, iterations: int
) -> ScramCredential:
    """The credential for a SaltedPassword a client computed (AlterUserScramCredentials)."""
    name = _HASH[mechanism]
    client_key = hmac.digest(salted_password, b"Client Key", name)
    server_key = hmac.digest(salted_password, b"Server Key", name)
    return ScramCredential(salt, hashlib.new(name, client_key).digest(), server_key, iterations)


def password_matches(mechanism: str, credential: ScramCredential, password: str) -> bool:
    """PLAIN against a stored SCRAM credential: derive with its salt and iterations and
    compare the stored key in constant time. PBKDF2 of ``iterations`` rounds: run it
    off the event loop."""
    derived = make_credential(mechanism, password, credential.iterations, credential.salt)
    return hmac.compare_digest(derived.stored_key, credential.stored_key)


class CredentialStore:
    def __init__(
        self, quorum: Callable[[], Quorum], data_dir: Path, state: SecurityState | None = None
    ) -> None:
        self._quorum = quorum
        self.path = Path(data_dir) / FILE_NAME
        self.state = state if state is not None else SecurityState()

    def lookup(self, user: str, mechanism: str) -> ScramCredential | None:
        if not self.state.loaded:  # the server holds authentications until loaded: the floor
            raise SecurityNotReadyError()
        return self._quorum().state.scram_credentials.get(user, {}).get(mechanism)

    def users(self) -> dict[str, dict[str, int]]:
        """user -> mechanism -> iterations: what may be described (never a key)."""
        return {
            user: {m: c.iterations for m, c in mechs.items()}
            for user, mechs in self._quorum().state.scram_credentials.items()
        }

    async def check_plain(self, user: str, password: str) -> bool:
        """PLAIN: the password against the user's SCRAM-SHA-256 credential, else SHA-512."""
        for mechanism in SCRAM_MECHANISMS:
            credential = self.lookup(user, mechanism)
            if credential is not None:
                return await asyncio.to_thread(password_matches, mechanism, credential, password)
        return False

    async def submit(self, record: AlterScramCredential) -> Result:
        quorum = self._quorum()
        result = await quorum.submit(record)
        if result.ok and isinstance(quorum, LocalQuorum):
            await state_file(self.path).save(table_to_wire(quorum.state.scram_credentials))
        return result

    def load_local(self) -> None:
        """A single broker: replay ``scram_credentials.json`` into its in-memory quorum."""
        quorum = self._quorum()
        if isinstance(quorum, LocalQuorum):
            load_file(quorum, self.path)


def state_file(path: Path) -> StateFile:
    return StateFile(path, "credentials", "SCRAM credentials")


def encode_file(quorum: LocalQuorum, path: Path) -> bytes:
    return state_file(path).encode(table_to_wire(quorum.state.scram_credentials))


def load_file(quorum: LocalQuorum, path: Path) -> None:
    def rows(wire: Any) -> list[Any]:
        table_from_wire(wire)  # the whole file is checked before any of it is applied
        return list(wire)

    for row in state_file(path).load(rows) or ():
        result = quorum.apply_now(AlterScramCredential(*row))
        if not result.ok:
            log.warning("SCRAM credential of %r not loaded: %s", row[0], result.message)
