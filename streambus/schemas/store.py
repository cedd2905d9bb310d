"""The registry's state: subjects → versions → ids, configs and modes, in memory.

It changes only by applying records (``apply``), the same way whether they were just
written or are being read back from ``_schemas`` at start, so what a restart rebuilds
is what was served. Ids are unique and stable: an id is the one its records carry, a
new one is one above every id seen, and the same schema (type, canonical text and
references) under two subjects shares one id.

Deletion: a soft-deleted version keeps its id and stays readable with ``deleted=true``;
a hard delete (a tombstone) removes it, and the id itself once no version uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from streambus.schemas.formats import RegisteredSchema, SchemaReference, identity
from streambus.schemas.storage import (
    ConfigRecord,
    DeleteSubjectRecord,
    ModeRecord,
    Record,
    SchemaRecord,
    SchemaTombstone,
)

Identity = tuple[str, str, tuple[SchemaReference, ...]]


@dataclass(slots=True)
class Version:
    subject: str
    version: int
    schema_id: int
    deleted: bool


def identity_of(schema_type: str, text: str, refs: tuple[SchemaReference, ...]) -> Identity:
    return (schema_type, identity(schema_type, text), refs)


class SchemaStore:
    def __init__(self) -> None:
        self.schemas: dict[int, RegisteredSchema] = {}
        self._uses: dict[int, int] = {}  # id -> versions (soft-deleted too) that hold it
        self._by_identity: dict[Identity, int] = {}
        self.subjects: dict[str, dict[int, Version]] = {}
        self._subject_ids: dict[str, dict[int, int]] = {}  # subject -> id -> versions
        self.configs: dict[str | None, str] = {}
        self.modes: dict[str | None, str] = {}
        self.next_id = 1
        # Bumped by every change: a registration decided off the loop is retried if the
        # state moved while it was being decided.
        self.generation = 0

    # -- applying records ---------------------------------------------------------------
    def apply(self, record: Record) -> None:
        self.generation += 1
        if isinstance(record, SchemaRecord):
            self._put(record)
        elif isinstance(record, SchemaTombstone):
            self._remove(record.subject, record.version)
        elif isinstance(record, ConfigRecord):
            if record.level is None:
                self.configs.pop(record.subject, None)
            else:
                self.configs[record.subject] = record.level
        elif isinstance(record, ModeRecord):
            if record.mode is None:
                self.modes.pop(record.subject, None)
            else:
                self.modes[record.subject] = record.mode
        elif isinstance(record, DeleteSubjectRecord):
            for v in self.subjects.get(record.subject, {}).values():
                if v.version <= record.version:
                    v.deleted = True

    def _put(self, r: SchemaRecord) -> None:
        versions = self.subjects.setdefault(r.subject, {})
        old = versions.get(r.version)
        if old is not None:
            if old.schema_id == r.schema_id:
                old.deleted = r.deleted
                return
            self._remove(r.subject, r.version)
        if r.schema_id not in self.schemas:
            schema = RegisteredSchema(r.schema_id, r.schema_type, r.schema, r.references)
            self.schemas[r.schema_id] = schema
            self._by_identity.setdefault(
                identity_of(r.schema_type, r.schema, r.references), r.schema_id
            )
        self.next_id = max(self.next_id, r.schema_id + 1)
        self._uses[r.schema_id] = self._uses.get(r.schema_id, 0) + 1
        ids = self._subject_ids.setdefault(r.subject, {})
        ids[r.schema_id] = ids.get(r.schema_id, 0) + 1
        versions[r.version] = Version(r.subject, r.version, r.schema_id, r.deleted)
        self.subjects[r.subject] = dict(sorted(versions.items()))

    def _remove(self, subject: str, version: int) -> None:
        versions = self.subjects.get(subject, {})
        gone = versions.pop(version, None)
        if gone is None:
            return
        if not versions:
            del self.subjects[subject]
        ids = self._subject_ids[subject]
        ids[gone.schema_id] -= 1
        if not ids[gone.schema_id]:
            del ids[gone.schema_id]
            if not ids:
                del self._subject_ids[subject]
        self._uses[gone.schema_id] -= 1
        if not self._uses[gone.schema_id]:
            del self._uses[gone.schema_id]
            schema = self.schemas.pop(gone.schema_id)
            key = identity_of(schema.schema_type, schema.schema, schema.references)
            if self._by_identity.get(key) == gone.schema_id:
                del self._by_identity[key]

    # -- reading ------------------------------------------------------------------------
    def subject_has_id(self, subject: str, schema_id: int) -> bool:
        ids = self._subject_ids.get(subject)
        return ids is not None and schema_id in ids

    def id_of(self, key: Identity) -> int | None:
        return self._by_identity.get(key)

    def subject_names(self, deleted: bool = False) -> list[str]:
        return sorted(
            s
            for s, vs in self.subjects.items()
            if deleted or any(not v.deleted for v in vs.values())
        )

    def versions(self, subject: str, deleted: bool = False) -> list[Version]:
        return [v for v in self.subjects.get(subject, {}).values() if deleted or not v.deleted]

    def live_subject_count(self) -> int:
        return len(self.subject_names())

    def find(self, subject: str, schema_id: int, deleted: bool = False) -> Version | None:
        """The subject's newest version holding ``schema_id``."""
        for v in reversed(self.versions(subject, deleted)):
            if v.schema_id == schema_id:
                return v
        return None

    def uses_of(self, schema_id: int, deleted: bool = False) -> Iterator[Version]:
        for versions in self.subjects.values():
            for v in versions.values():
                if v.schema_id == schema_id and (deleted or not v.deleted):
                    yield v

    def next_version(self, subject: str) -> int:
        versions = self.subjects.get(subject)
        return max(versions, default=0) + 1 if versions else 1
