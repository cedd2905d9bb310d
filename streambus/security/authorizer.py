"""Kafka's ACL authorizer: may this principal, from this host, do this to that resource?

Off unless configured (``authorizer = acl``); off, every check passes and nothing is
counted. On, a decision follows Kafka's ``StandardAuthorizer``:

1. a super user (``super_users``, ``User:a;User:b``) may do everything;
2. the ACLs that apply to the resource are its LITERAL name, the LITERAL wildcard
   ``*`` and every PREFIXED pattern the name starts with; none at all: the answer is
   ``allow_everyone_if_no_acl_found`` (false by default);
3. a DENY for the principal (or ``User:*``), the host (or ``*``) and the operation (or
   ALL) refuses, whatever allows;
4. else an ALLOW for the operation, ALL or an operation implying it (READ, WRITE,
   DELETE and ALTER imply DESCRIBE; ALTER_CONFIGS implies DESCRIBE_CONFIGS) permits;
   none refuses.

The ACLs are replicated metadata (``ClusterState.acls``); they are indexed by resource
type, then literal name and prefix, and re-indexed only when the set changes, so a check
costs a few dict lookups. Checks are counted (``streambus_authorization_checks_total``)
once per request and resource; every denial is counted and audited; allowed checks are
audited when ``audit_log_allowed`` is on. A check made only to hide what a listing
should not show (Metadata for every topic) counts as a check, and is neither a denial
nor audited, as in Kafka, whose ``logIfDenied`` is false there.

A single broker keeps its ACLs durable in ``acls.json`` in the data dir (written whole,
atomically, after each change; replayed at start, before its listeners open); a
cluster's Raft log keeps them. Until they are loaded (``state``, see
``streambus.security.readiness``) no decision is made at all: a missing ACL set is not
an empty one, which would deny everyone, or allow everyone a DENY should stop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from streambus.cluster import acls
from streambus.cluster.acls import ALL, ALLOW, DENY, IMPLIED_BY, AclBinding, AclSet
from streambus.cluster.local_file import StateFile
from streambus.cluster.quorum import LocalQuorum, Quorum
from streambus.cluster.records import AlterAcls, Result
from streambus.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    SecurityNotReadyError,
    StreamBusError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)
from streambus.security.readiness import SecurityState

if TYPE_CHECKING:
    from streambus.instrumentation import BrokerTelemetry
    from streambus.security.audit import AuditLog

log = logging.getLogger("streambus.authorizer")

ANONYMOUS = "User:ANONYMOUS"
FILE_NAME = "acls.json"
# acls.json: {"v": 1, "acls": [[resource type, name, pattern type, principal, host,
#                               operation, permission], ...]} (Kafka's codes)
_ANY_HOST = acls.WILDCARD
_CLUSTER = acls.CLUSTER_NAME
# What a denial answers, by resource type
DENIED: dict[int, type[StreamBusError]] = {
    acls.TOPIC: TopicAuthorizationFailedError,
    acls.GROUP: GroupAuthorizationFailedError,
    acls.CLUSTER: ClusterAuthorizationFailedError,
    acls.TRANSACTIONAL_ID: TransactionalIdAuthorizationFailedError,
}


class Requester(Protocol):
    """What a check needs of the request (``RequestContext`` is one)."""

    @property
    def api_key(self) -> int: ...
    @property
    def peer(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def listener(self) -> str: ...


def host_of(peer: str) -> str:
    """The address of ``host:port`` (IPv6 included), as ACL hosts name it."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host.strip("[]")


class _Index:
    """The ACLs of one resource type: by literal name, and by prefix with the prefix
    lengths in use (a name's prefixes are looked up, never scanned)."""

    __slots__ = ("lengths", "literal", "prefixed")

    def __init__(self) -> None:
        self.literal: dict[str, list[AclBinding]] = {}
        self.prefixed: dict[str, list[AclBinding]] = {}
        self.lengths: list[int] = []

    def applying(self, name: str) -> list[AclBinding]:
        found = list(self.literal.get(name, ()))
        if name != acls.WILDCARD:
            found.extend(self.literal.get(acls.WILDCARD, ()))
        for length in self.lengths:
            if length > len(name):
                break
            found.extend(self.prefixed.get(name[:length], ()))
        return found


def parse_super_users(text: str) -> frozenset[str]:
    """Kafka's ``super.users``: principals separated by semicolons."""
    return frozenset(p.strip() for p in text.split(";") if p.strip())


class Authorizer:
    def __init__(
        self,
        quorum: Callable[[], Quorum],
        telemetry: BrokerTelemetry,
        audit: AuditLog,
        data_dir: Path,
        *,
        enabled: bool = False,
        super_users: str = "",
        allow_everyone_if_no_acl_found: bool = False,
        audit_allowed: bool = False,
        state: SecurityState | None = None,
    ) -> None:
        self._quorum = quorum
        self.state = state if state is not None else SecurityState()
        self._telemetry = telemetry
        self.audit = audit
        self._file = StateFile(Path(data_dir) / FILE_NAME, "acls", "ACLs")
        self.enabled = enabled
        self.super_users = parse_super_users(super_users)
        self.allow_if_no_acl = allow_everyone_if_no_acl_found
        self.audit_allowed = audit_allowed
        self._indexed: AclSet | None = None
        self._index: dict[int, _Index] = {}

    @property
    def acls(self) -> AclSet:
        return self._quorum().state.acls

    # -- decisions ------------------------------------------------------------------------
    def authorize(
        self, ctx: Requester, operation: int, resource_type: int, name: str, *, quiet: bool = False
    ) -> bool:
        """May ``ctx``'s principal do ``operation`` to the resource? Counted; a denial is
        audited (unless ``quiet``: the check only hides an entry of a listing)."""
        if not self.enabled:
            return True
        allowed = self.decide(ctx.principal, host_of(ctx.peer), operation, resource_type, name)
        denied = not allowed and not quiet
        self._telemetry.authorization_checked(
            acls.OPERATION_NAMES[operation], acls.RESOURCE_NAMES[resource_type], denied
        )
        if denied or (allowed and self.audit_allowed):
            self.audit.authorization(
                principal=ctx.principal,
                client=ctx.peer,
                listener=ctx.listener,
                api=ctx.api_key,
                operation=acls.OPERATION_NAMES[operation],
                resource_type=acls.RESOURCE_NAMES[resource_type],
                resource_name=name,
                allowed=allowed,
            )
        return allowed

    def require(
        self, ctx: Requester, operation: int, resource_type: int, name: str = _CLUSTER
    ) -> None:
        """``authorize``, raising the resource type's AUTHORIZATION_FAILED error when denied."""
        if not self.authorize(ctx, operation, resource_type, name):
            raise DENIED[resource_type]()

    def may_create_topic(self, ctx: Requester, name: str) -> bool:
        """Kafka's check for creating a topic: CREATE on the cluster (its absence not
        audited), else CREATE on the topic."""
        return self.authorize(ctx, acls.CREATE, acls.CLUSTER, acls.CLUSTER_NAME, quiet=True) or (
            self.authorize(ctx, acls.CREATE, acls.TOPIC, name)
        )

    def authorize_cluster(self, ctx: Requester, operation: int) -> bool:
        return self.authorize(ctx, operation, acls.CLUSTER, acls.CLUSTER_NAME)

    def authorize_idempotent(self, ctx: Requester) -> bool:
        """Kafka 3+'s check for an idempotent producer: IDEMPOTENT_WRITE on the cluster, or
        WRITE on some topic (Kafka's ``authorizeByResourceType``). One counted check."""
        if not self.enabled:
            return True
        host = host_of(ctx.peer)
        if self.decide(ctx.principal, host, acls.IDEMPOTENT_WRITE, acls.CLUSTER, acls.CLUSTER_NAME):
            return self.authorize(ctx, acls.IDEMPOTENT_WRITE, acls.CLUSTER, acls.CLUSTER_NAME)
        allowed = self._may_on_some(ctx.principal, host, acls.WRITE, acls.TOPIC)
        self._telemetry.authorization_checked("IDEMPOTENT_WRITE", "CLUSTER", not allowed)
        if not allowed or self.audit_allowed:
            self.audit.authorization(
                principal=ctx.principal,
                client=ctx.peer,
                listener=ctx.listener,
                api=ctx.api_key,
                operation="IDEMPOTENT_WRITE",
                resource_type="CLUSTER",
                resource_name=acls.CLUSTER_NAME,
                allowed=allowed,
            )
        return allowed

    def _may_on_some(self, principal: str, host: str, operation: int, resource_type: int) -> bool:
        """Some resource of the type allows ``operation`` (a wildcard DENY refuses all)."""
        if principal in self.super_users:
            return True
        index = self._index_for(resource_type)
        everything = [
            b for table in (index.literal, index.prefixed) for bs in table.values() for b in bs
        ]
        if not everything:
            return self.allow_if_no_acl
        principals = (principal, acls.WILDCARD_PRINCIPAL)
        hosts = (host, _ANY_HOST)
        mine = [b for b in everything if b.principal in principals and b.host in hosts]
        if any(
            b.permission == DENY
            and b.operation in (operation, ALL)
            and b.pattern_type == acls.LITERAL
            and b.resource_name == acls.WILDCARD
            for b in mine
        ):
            return False
        return any(b.permission == ALLOW and b.operation in (operation, ALL) for b in mine)

    def allowed_names(
        self, ctx: Requester, operation: int, resource_type: int, names: Iterable[str]
    ) -> set[str]:
        """Which of ``names`` ``ctx`` may ``operation`` (one counted check per distinct name)."""
        return {n for n in set(names) if self.authorize(ctx, operation, resource_type, n)}

    def authorized_operations(
        self, ctx: Requester, resource_type: int, name: str, operations: Iterable[int]
    ) -> set[int]:
        """Which of ``operations`` are allowed (Kafka's authorized-operations field, KIP-430),
        uncounted: it describes permissions, it does not use them."""
        if not self.enabled:
            return set(operations)
        host = host_of(ctx.peer)
        return {
            op for op in operations if self.decide(ctx.principal, host, op, resource_type, name)
        }

    def decide(
        self, principal: str, host: str, operation: int, resource_type: int, name: str
    ) -> bool:
        if principal in self.super_users:
            return True
        applying = self._index_for(resource_type).applying(name)
        if not applying:
            return self.allow_if_no_acl
        principals = (principal, acls.WILDCARD_PRINCIPAL)
        hosts = (host, _ANY_HOST)
        for b in applying:
            if (
                b.permission == DENY
                and b.principal in principals
                and b.host in hosts
                and b.operation in (operation, ALL)
            ):
                return False
        granting = IMPLIED_BY.get(operation) or (operation, ALL)
        for b in applying:
            if (
                b.permission == ALLOW
                and b.principal in principals
                and b.host in hosts
                and b.operation in granting
            ):
                return True
        return False

    def _index_for(self, resource_type: int) -> _Index:
        if not self.state.loaded:
            # Every decision but a super user's reads the index: none is made before the
            # ACLs are loaded (the server holds requests until they are; this is the floor).
            raise SecurityNotReadyError()
        current = self.acls
        if current is not self._indexed:
            index: dict[int, _Index] = {}
            for b in current:
                part = index.setdefault(b.resource_type, _Index())
                table = part.literal if b.pattern_type == acls.LITERAL else part.prefixed
                table.setdefault(b.resource_name, []).append(b)
            for part in index.values():
                part.lengths = sorted({len(p) for p in part.prefixed})
            self._index, self._indexed = index, current
        return self._index.get(resource_type) or _EMPTY_INDEX

    # -- changes, and their durability on a single broker --------------------------------
    async def submit(self, record: AlterAcls) -> Result:
        quorum = self._quorum()
        result = await quorum.submit(record)
        if result.ok and isinstance(quorum, LocalQuorum):
            await self._file.save(acls.to_wire(quorum.state.acls))
        return result

    def load_local(self) -> None:
        """A single broker: replay ``acls.json`` into its in-memory quorum (before its
        listeners open; the broker then marks ``state`` loaded)."""
        quorum = self._quorum()
        if not isinstance(quorum, LocalQuorum):
            return
        loaded = self._file.load(acls.from_wire)
        if not loaded:
            return
        result = quorum.apply_now(AlterAcls(creations=tuple(sorted(loaded))))
        if not result.ok:
            log.error("ACLs in %s not loaded: %s", self._file.path, result.message)


_EMPTY_INDEX = _Index()
