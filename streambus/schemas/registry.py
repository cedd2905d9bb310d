"""The schema registry: what each REST operation does to the state and to ``_schemas``.

Every change is a record appended to ``_schemas`` first and applied to the in-memory
store after (the store never holds what the log does not). Parsing and compatibility
checks run in a worker thread: a large schema must not stall the broker's Kafka
clients; the decision is retried if the state moved meanwhile.

The broker leading ``_schemas`` partition 0 writes it (the REST layer forwards other
brokers' writes there, ``forward.py``). Writes are serialised: each decides on the
state, appends, waits until its records are replicated and applied (``SchemasTail``,
which every broker runs), then answers, so the next decision sees them. A new leader
first applies its whole log, so ids continue from the highest one any leader wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from streambus.errors import StreamBusError, TopicAlreadyExistsError
from streambus.instrumentation import BrokerTelemetry
from streambus.partitions import PartitionService
from streambus.schemas.compatibility import DEFAULT_LEVEL, Level, check
from streambus.schemas.errors import (
    IncompatibleSchemaError,
    InvalidModeError,
    InvalidSchemaError,
    InvalidVersionError,
    OperationNotPermittedError,
    SchemaNotFoundError,
    StoreError,
    StoreTimeoutError,
    SubjectConfigNotFoundError,
    SubjectNotFoundError,
    SubjectNotSoftDeletedError,
    SubjectSoftDeletedError,
    VersionNotFoundError,
    VersionNotSoftDeletedError,
    VersionSoftDeletedError,
)
from streambus.schemas.follower import SchemasTail
from streambus.schemas.formats import (
    AVRO,
    SCHEMA_TYPES,
    ParsedSchema,
    RegisteredSchema,
    Resolved,
    SchemaReference,
    parse,
)
from streambus.schemas.remote import RemoteSchemas
from streambus.schemas.storage import (
    SCHEMAS_PARTITION,
    ConfigRecord,
    DeleteSubjectRecord,
    ModeRecord,
    Record,
    SchemaRecord,
    SchemasLog,
    SchemaTombstone,
)
from streambus.schemas.store import SchemaStore, Version, identity_of

log = logging.getLogger("streambus.schemas")

MODES = ("READWRITE", "READONLY", "IMPORT")
_PARSED_CACHE = 4096  # parsed schemas kept by id (compatibility checks reuse them)
_MAX_REFERENCE_DEPTH = 32
_WRITE_TIMEOUT_S = 10.0  # replication of a write, or a new leader applying its log


@dataclass(frozen=True, slots=True)
class NewSchema:
    """A schema as a request gives it."""

    schema_type: str
    schema: str
    references: tuple[SchemaReference, ...] = ()


def parse_version(text: str | int) -> int | None:
    """A version path segment: a positive number, ``latest`` or -1 (None: the latest)."""
    if text in ("latest", "-1", -1):
        return None
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1 or number > 2**31 - 1:
        raise InvalidVersionError(
            f"The specified version '{text}' is not a valid version id. Allowed values are "
            'between [1, 2^31-1] and the string "latest"'
        )
    return number


class SchemaRegistry:
    def __init__(
        self,
        service: PartitionService,
        telemetry: BrokerTelemetry,
        create_topic: Callable[[], Awaitable[object]],
        stopping: Callable[[], bool] = lambda: False,
        remote: RemoteSchemas | None = None,
    ) -> None:
        self.store = SchemaStore()
        self.log = SchemasLog(service)
        # ``remote``: how a broker hosting no copy of _schemas follows the leader's
        self.tail = SchemasTail(self.log, self.store.apply, stopping, remote)
        self._writing = asyncio.Lock()  # one write decided and stored at a time
        self._telemetry = telemetry
        self._create_topic = create_topic
        self._parsed: dict[int, ParsedSchema] = {}

    # -- the validation interface: synchronous, in memory ------------------------------
    def schema_by_id(self, schema_id: int) -> RegisteredSchema | None:
        return self.store.schemas.get(schema_id)

    def subject_has_id(self, subject: str, schema_id: int) -> bool:
        return self.store.subject_has_id(subject, schema_id)

    def parsed(self, schema_id: int) -> ParsedSchema:
        """The registered schema ``schema_id`` parsed (cached)."""
        cached = self._parsed.get(schema_id)
        if cached is not None:
            return cached
        schema = self.store.schemas.get(schema_id)
        if schema is None:
            raise SchemaNotFoundError(f"Schema {schema_id} not found")
        parsed = parse(schema.schema_type, schema.schema, self._resolve(schema.references))
        if len(self._parsed) >= _PARSED_CACHE:
            self._parsed.pop(next(iter(self._parsed)))
        self._parsed[schema_id] = parsed
        return parsed

    # -- lifecycle ---------------------------------------------------------------------
    def load(self) -> int:
        """Rebuild the state from ``_schemas``; returns the records applied."""
        count = self.tail.catch_up()
        if count:
            log.info(
                "schema registry: %d schemas under %d subjects loaded from _schemas",
                len(self.store.schemas),
                self.store.live_subject_count(),
            )
        return count

    async def ensure_topic(self) -> None:
        if not self.log.exists():
            with contextlib.suppress(TopicAlreadyExistsError):
                await self._create_topic()

    async def _prepare_write(self) -> None:
        """Before deciding (holding ``_writing``): the topic exists and the state holds
        every record of the local log, a new leader's not yet committed ones included."""
        await self.ensure_topic()
        if not await self.tail.wait_applied(self.tail.log_end(), _WRITE_TIMEOUT_S):
            raise StoreTimeoutError(
                "Timed out waiting for _schemas to be replicated before writing to it"
            )

    async def _write(self, records: Sequence[Record]) -> None:
        """Append, wait for the ISR to have the records, and apply them (through the tail,
        as every broker does)."""
        try:
            end = self.log.append(list(records))
            await self.log.service.wait_replicated(SCHEMAS_PARTITION, end, _WRITE_TIMEOUT_S)
        except StreamBusError as exc:
            raise StoreError(f"Error while writing to _schemas: {exc}") from exc
        if not await self.tail.wait_applied(end, _WRITE_TIMEOUT_S):
            raise StoreTimeoutError("Timed out applying the write to _schemas")

    # -- subjects and versions ---------------------------------------------------------
    def subjects(self, deleted: bool = False) -> list[str]:
        return self.store.subject_names(deleted)

    def versions(self, subject: str, deleted: bool = False) -> list[int]:
        versions = self.store.versions(subject, deleted)
        if not versions:
            raise SubjectNotFoundError(f"Subject '{subject}' not found.")
        return [v.version for v in versions]

    def version(self, subject: str, version: str | int, deleted: bool = False) -> Version:
        number = parse_version(version)
        every = self.store.versions(subject, True)
        if not every:
            raise SubjectNotFoundError(f"Subject '{subject}' not found.")
        if number is None:
            versions = self.store.versions(subject, deleted)
            if not versions:
                raise SubjectNotFoundError(f"Subject '{subject}' not found.")
            return versions[-1]
        for v in every:
            if v.version == number and (deleted or not v.deleted):
                return v
        raise VersionNotFoundError(f"Version {number} not found.")

    def references_of(self, schema: RegisteredSchema) -> list[Resolved]:
        return self._resolve(schema.references)

    def _resolve(
        self, refs: Sequence[SchemaReference], depth: int = 0, seen: set[str] | None = None
    ) -> list[Resolved]:
        """Referenced schemas, dependencies first (a reference's own references before it)."""
        if depth > _MAX_REFERENCE_DEPTH:
            raise InvalidSchemaError("Invalid schema: references nested too deep")
        seen = set() if seen is None else seen
        out: list[Resolved] = []
        for ref in refs:
            if ref.name in seen:
                continue
            seen.add(ref.name)
            try:
                v = self.version(ref.subject, ref.version, deleted=True)
            except (SubjectNotFoundError, VersionNotFoundError, InvalidVersionError):
                raise InvalidSchemaError(
                    f"Invalid schema: reference {ref.name!r} to {ref.subject} version "
                    f"{ref.version} not found"
                ) from None
            schema = self.store.schemas[v.schema_id]
            out.extend(self._resolve(schema.references, depth + 1, seen))
            out.append(Resolved(ref.name, schema.schema_type, schema.schema))
        return out

    # -- configuration -----------------------------------------------------------------
    def level(self, subject: str | None) -> Level:
        text = self.store.configs.get(subject) if subject is not None else None
        text = text or self.store.configs.get(None)
        return Level.of(text) if text else DEFAULT_LEVEL

    def config(self, subject: str | None, default_to_global: bool = False) -> str:
        if subject is None:
            return self.store.configs.get(None, DEFAULT_LEVEL.value)
        level = self.store.configs.get(subject)
        if level is None:
            if default_to_global:
                return self.config(None)
            raise SubjectConfigNotFoundError(
                f"Subject '{subject}' does not have subject-level compatibility configured"
            )
        return level

    async def set_config(self, subject: str | None, level: object) -> str:
        parsed = Level.of(level)
        async with self._writing:
            await self._prepare_write()
            await self._write([ConfigRecord(subject, parsed.value)])
            return parsed.value

    async def delete_config(self, subject: str | None) -> str:
        async with self._writing:
            await self._prepare_write()
            previous = self.config(subject)
            await self._write([ConfigRecord(subject, None)])
            return previous

    def mode(self, subject: str | None = None) -> str:
        if subject is not None and subject in self.store.modes:
            return self.store.modes[subject]
        return self.store.modes.get(None, "READWRITE")

    async def set_mode(self, subject: str | None, mode: object) -> str:
        text = str(mode).upper()
        if text not in MODES:
            raise InvalidModeError(f"Invalid mode. Valid values are {', '.join(MODES)}")
        async with self._writing:
            await self._prepare_write()
            await self._write([ModeRecord(subject, text)])
            return text

    def _check_writable(self, subject: str | None) -> None:
        if self.mode(subject) == "READONLY":
            raise OperationNotPermittedError(f"Subject {subject} is in read-only mode")

    # -- registration ------------------------------------------------------------------
    async def register(
        self, subject: str, new: NewSchema, *, normalize: bool = False, schema_id: int | None = None
    ) -> int:
        """Register ``new`` under ``subject``; its id (an existing one if it is known)."""
        async with self._writing:
            await self._prepare_write()
            self._check_writable(subject)
            if schema_id is not None and self.mode(subject) != "IMPORT":
                raise OperationNotPermittedError(
                    "Overriding the schema id requires the IMPORT mode"
                )
            while True:
                generation = self.store.generation
                text, parsed = await asyncio.to_thread(self._parse, new, normalize)
                key = identity_of(new.schema_type, text, new.references)
                existing = self.store.id_of(key)
                if existing is not None:
                    found = self.store.find(subject, existing)
                    if found is not None:
                        return existing  # a re-registration: nothing new
                earlier = [v.schema_id for v in self.store.versions(subject)]
                level = self.level(subject)
                messages = await asyncio.to_thread(self._check, level, parsed, earlier)
                if self.store.generation != generation:
                    continue  # something was written while this was decided: decide again
                if messages:
                    raise IncompatibleSchemaError(
                        "Schema being registered is incompatible with an earlier schema for "
                        f'subject "{subject}", details: {messages}'
                    )
                if (
                    schema_id is not None
                    and schema_id in self.store.schemas
                    and existing != schema_id
                ):
                    raise OperationNotPermittedError(
                        f"Overwrite new schema with id {schema_id} is not permitted."
                    )
                new_id = existing if existing is not None else schema_id or self.store.next_id
                record = SchemaRecord(
                    subject,
                    self.store.next_version(subject),
                    new_id,
                    new.schema_type,
                    text,
                    new.references,
                    False,
                )
                await self._write([record])
                self._parsed[new_id] = parsed
                self._telemetry.schema_registered(new.schema_type)
                return new_id

    def _parse(self, new: NewSchema, normalize: bool) -> tuple[str, ParsedSchema]:
        if new.schema_type not in SCHEMA_TYPES:
            raise InvalidSchemaError(f"Invalid schema type {new.schema_type}")
        parsed = parse(new.schema_type, new.schema, self._resolve(new.references))
        return (parsed.normalized() if normalize else new.schema), parsed

    def _check(self, level: Level, new: ParsedSchema, earlier: Sequence[int]) -> list[str]:
        if level is Level.NONE:
            return []
        return check(level, new, [self.parsed(i) for i in earlier])

    async def lookup(
        self, subject: str, new: NewSchema, *, normalize: bool = False, deleted: bool = False
    ) -> Version:
        if not self.store.versions(subject, True) or (
            not deleted and not self.store.versions(subject)
        ):
            raise SubjectNotFoundError(f"Subject '{subject}' not found.")
        text, _ = await asyncio.to_thread(self._parse, new, normalize)
        schema_id = self.store.id_of(identity_of(new.schema_type, text, new.references))
        found = None if schema_id is None else self.store.find(subject, schema_id, deleted)
        if found is None:
            raise SchemaNotFoundError("Schema not found")
        return found

    async def test_compatibility(
        self, subject: str, version: str | None, new: NewSchema, normalize: bool = False
    ) -> list[str]:
        """Why ``new`` could not be registered next to ``version`` (None: by the subject's
        level, against what it names); empty: it could."""
        _, parsed = await asyncio.to_thread(self._parse, new, normalize)
        level = self.level(subject)
        if version is None:
            earlier = [v.schema_id for v in self.store.versions(subject)]
        else:
            if parse_version(version) is None and not self.store.versions(subject):
                return []  # nothing registered yet: anything is compatible
            earlier = [self.version(subject, version).schema_id]
            level = Level(level.value.removesuffix("_TRANSITIVE"))
        return await asyncio.to_thread(self._check, level, parsed, earlier)

    # -- deletion ----------------------------------------------------------------------
    async def delete_version(self, subject: str, version: str, permanent: bool) -> int:
        async with self._writing:
            await self._prepare_write()
            self._check_writable(subject)
            v = self.version(subject, version, deleted=True)
            if parse_version(version) is None:
                v = self.version(subject, version)
            if not permanent:
                if v.deleted:
                    raise VersionSoftDeletedError(
                        f"Subject '{subject}' Version {v.version} was soft deleted. Set "
                        "permanent=true to delete permanently"
                    )
                schema = self.store.schemas[v.schema_id]
                record: Record = SchemaRecord(
                    subject,
                    v.version,
                    v.schema_id,
                    schema.schema_type,
                    schema.schema,
                    schema.references,
                    True,
                )
            else:
                if not v.deleted:
                    raise VersionNotSoftDeletedError(
                        f"Subject '{subject}' Version {v.version} was not deleted first before "
                        "being permanently deleted"
                    )
                record = SchemaTombstone(subject, v.version)
            await self._write([record])
            return v.version

    async def delete_subject(self, subject: str, permanent: bool) -> list[int]:
        async with self._writing:
            await self._prepare_write()
            self._check_writable(subject)
            every = self.store.versions(subject, True)
            if not every:
                raise SubjectNotFoundError(f"Subject '{subject}' not found.")
            live = [v for v in every if not v.deleted]
            if permanent:
                if live:
                    raise SubjectNotSoftDeletedError(
                        f"Subject '{subject}' was not deleted first before being permanently "
                        "deleted"
                    )
                records: list[Record] = [SchemaTombstone(subject, v.version) for v in every]
                records.append(ConfigRecord(subject, None))
                await self._write(records)
                return [v.version for v in every]
            if not live:
                raise SubjectSoftDeletedError(
                    f"Subject '{subject}' was soft deleted. Set permanent=true to delete "
                    "permanently"
                )
            records = []
            for v in live:
                s = self.store.schemas[v.schema_id]
                records.append(
                    SchemaRecord(
                        subject, v.version, v.schema_id, s.schema_type, s.schema, s.references, True
                    )
                )
            records.append(DeleteSubjectRecord(subject, live[-1].version))
            await self._write(records)
            return [v.version for v in live]

    # -- by id -------------------------------------------------------------------------
    def schema(self, schema_id: int) -> RegisteredSchema:
        schema = self.store.schemas.get(schema_id)
        if schema is None:
            raise SchemaNotFoundError(f"Schema {schema_id} not found")
        return schema

    def schema_versions(self, schema_id: int, deleted: bool = False) -> list[Version]:
        self.schema(schema_id)
        return sorted(self.store.uses_of(schema_id, deleted), key=lambda v: (v.subject, v.version))

    # -- what the gauges read ------------------------------------------------------------
    def schema_count(self) -> int:
        return len(self.store.schemas)

    def subject_count(self) -> int:
        return self.store.live_subject_count()


def default_type(schema_type: object) -> str:
    return AVRO if schema_type in (None, "") else str(schema_type).upper()
