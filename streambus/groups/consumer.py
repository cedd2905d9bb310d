"""Consumer groups of the KIP-848 protocol: the coordinator assigns, members reconcile.

Every member sends ConsumerGroupHeartbeat; nothing waits. The group has an **epoch**
bumped whenever what the assignment depends on changes (a member joins or leaves, a
subscription or assignor changes, a subscribed topic grows). When the group epoch is
ahead of the **assignment epoch**, the server-side assignor computes a new target
assignment. Each member then reconciles toward its target one heartbeat at a time:

- partitions it holds but must give up are *revoked* first: its assignment shrinks and
  its **member epoch** stays where it was until a heartbeat reports it no longer owns them;
- partitions it gains are *given* only once nobody else holds them (their previous owner
  has reported them revoked), so two members never own a partition at once;
- when it holds exactly what it may hold, its member epoch moves to the assignment epoch.

A heartbeat with an epoch the member does not have is FENCED_MEMBER_EPOCH; a member id the
group does not know is UNKNOWN_MEMBER_ID. A member that leaves (epoch -1), or sends no
heartbeat for the session timeout, is removed and its partitions are freed. A static
member (with an instance id) leaving with epoch -2 keeps its place and assignment for
the session timeout: rejoining with the same instance id, it gets them back with no
change for anyone else.

A member may subscribe by a **regular expression** besides (or instead of) topic names.
The coordinator resolves it against the topics that exist, matching whole names (as
Kafka's RE2 ``matches()``, with Google's RE2 itself: Kafka's dialect, and linear-time
matching, so no pattern a client sends can hold the event loop), and resolves it again
whenever the set of topics changes, so a topic created later that matches joins the
member's subscription on its next heartbeat without the member resubscribing.

This module is the pure state and its transitions, driven with an explicit clock; the
coordinator (:mod:`streambus.groups.coordinator`) owns the groups and the ticker.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import re2

from streambus.errors import (
    FencedMemberEpochError,
    InvalidRegularExpressionError,
    InvalidRequestError,
    UnknownMemberIdError,
    UnreleasedInstanceIdError,
    UnsupportedAssignorError,
)
from streambus.groups.assignors import ASSIGNORS, DEFAULT_ASSIGNOR, AssignorMember

log = logging.getLogger("streambus.groups")

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2

# topic -> partitions
Partitions = dict[str, set[int]]


class ConsumerGroupState(enum.Enum):
    EMPTY = "Empty"
    ASSIGNING = "Assigning"  # the target assignment is behind the group epoch
    RECONCILING = "Reconciling"  # some member does not hold its target yet
    STABLE = "Stable"
    DEAD = "Dead"


class MemberState(enum.Enum):
    STABLE = "stable"
    UNREVOKED_PARTITIONS = "unrevoked_partitions"  # waits for the member to revoke
    UNRELEASED_PARTITIONS = "unreleased_partitions"  # waits for other members to revoke


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One ConsumerGroupHeartbeat, topics already resolved from ids to names. ``None``
    fields did not change since the member's previous heartbeat."""

    group_id: str
    member_id: str
    member_epoch: int
    instance_id: str | None
    rack_id: str | None
    rebalance_timeout_ms: int
    subscribed_topic_names: tuple[str, ...] | None
    subscribed_topic_regex: str | None  # "" clears the member's regex
    server_assignor: str | None
    owned: Partitions | None
    client_id: str
    client_host: str
    generate_member_id: bool  # v0: the coordinator names a member that comes with none


@dataclass(frozen=True, slots=True)
class HeartbeatAnswer:
    member_id: str
    member_epoch: int
    assignment: Partitions | None  # None: unchanged since it was last sent


@dataclass(eq=False)
class ConsumerMember:
    member_id: str
    instance_id: str | None
    rack_id: str | None
    client_id: str
    client_host: str
    rebalance_timeout_ms: int
    subscribed: tuple[str, ...] = ()
    regex: str | None = None
    server_assignor: str | None = None
    member_epoch: int = 0
    previous_epoch: int = -1
    state: MemberState = MemberState.STABLE
    assigned: Partitions = field(default_factory=dict)  # what it may read now
    revoking: Partitions = field(default_factory=dict)  # what it must give up first
    revoke_deadline: float = 0.0  # loop time by which it must have revoked
    last_heartbeat: float = 0.0
    sent: Partitions | None = None  # the assignment last sent to it

    def holds(self) -> Iterable[tuple[str, int]]:
        for parts in (self.assigned, self.revoking):
            for topic, ps in parts.items():
                for p in ps:
                    yield topic, p


@dataclass(eq=False)
class ConsumerGroup:
    group_id: str
    group_epoch: int = 0
    assignment_epoch: int = 0
    members: dict[str, ConsumerMember] = field(default_factory=dict)
    static_members: dict[str, str] = field(default_factory=dict)  # instance id -> member id
    target: dict[str, Partitions] = field(default_factory=dict)  # member id -> target
    assignor: str = DEFAULT_ASSIGNOR
    topic_shape: dict[str, int] = field(default_factory=dict)  # subscribed topic -> partitions
    rebalances: int = 0  # target assignments computed (each one a rebalance)
    dead: bool = False
    state_since_ms: int = 0  # wall clock it last became empty (offsets retention counts from it)
    # The members' regexes resolved to topic names, valid for the topic set ``resolved_over``
    # (None: unknown, as for resolutions loaded from the log, which are checked again).
    resolved: dict[str, frozenset[str]] = field(default_factory=dict)
    resolved_over: frozenset[str] | None = frozenset()
    # regex -> (version, wall-clock ms) of its resolution's last change: what its
    # ConsumerGroupRegularExpression record carries. The version is the group epoch then.
    resolved_at: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def protocol_type(self) -> str:
        return "consumer"

    @property
    def state(self) -> ConsumerGroupState:
        if self.dead:
            return ConsumerGroupState.DEAD
        if not self.members:
            return ConsumerGroupState.EMPTY
        if self.group_epoch > self.assignment_epoch:
            return ConsumerGroupState.ASSIGNING
        if any(
            m.member_epoch != self.assignment_epoch or m.state is not MemberState.STABLE
            for m in self.members.values()
        ):
            return ConsumerGroupState.RECONCILING
        return ConsumerGroupState.STABLE

    # -- the heartbeat ----------------------------------------------------------------------
    def heartbeat(
        self,
        hb: Heartbeat,
        topics: Mapping[str, int],
        now: float,
    ) -> HeartbeatAnswer:
        """Apply one heartbeat; ``topics`` maps every existing topic to its partition count."""
        if hb.member_epoch == LEAVE_EPOCH:
            return self._leave(hb)
        if hb.member_epoch == STATIC_LEAVE_EPOCH:
            return self._static_leave(hb, now)
        if hb.subscribed_topic_regex:
            compile_regex(hb.subscribed_topic_regex)  # refused before it changes anything
        member = self._join(hb, now) if hb.member_epoch == JOIN_EPOCH else self._known(hb)
        member.last_heartbeat = now
        if hb.rebalance_timeout_ms > 0:
            member.rebalance_timeout_ms = hb.rebalance_timeout_ms
        if hb.rack_id is not None:
            member.rack_id = hb.rack_id
        changed = False
        if hb.subscribed_topic_names is not None:
            names = tuple(sorted(set(hb.subscribed_topic_names)))
            changed |= names != member.subscribed
            member.subscribed = names
        if hb.subscribed_topic_regex is not None:
            regex = hb.subscribed_topic_regex or None
            changed |= regex != member.regex
            member.regex = regex
        if hb.server_assignor is not None:
            if hb.server_assignor not in ASSIGNORS:
                raise UnsupportedAssignorError(
                    f"assignor {hb.server_assignor!r} is not one of {sorted(ASSIGNORS)}"
                )
            changed |= hb.server_assignor != member.server_assignor
            member.server_assignor = hb.server_assignor
        if changed:
            what = list(member.subscribed) + ([f"/{member.regex}/"] if member.regex else [])
            self._bump(f"member {member.member_id} subscribes to {what}")
        self.refresh_topics(topics)
        if self.group_epoch > self.assignment_epoch:
            self._assign(topics)
        if hb.owned is not None:
            self._revoked(member, hb.owned)
        self._reconcile(member, now)
        assignment = None
        if member.sent != member.assigned or hb.member_epoch == JOIN_EPOCH:
            assignment = {t: set(ps) for t, ps in member.assigned.items()}
            member.sent = assignment
        return HeartbeatAnswer(member.member_id, member.member_epoch, assignment)

    def _join(self, hb: Heartbeat, now: float) -> ConsumerMember:
        member_id = hb.member_id
        if not member_id:
            if not hb.generate_member_id:
                raise InvalidRequestError("MemberId must be set by the consumer (v1+)")
            member_id = str(uuid.uuid4())
        if hb.instance_id is not None:
            current_id = self.static_members.get(hb.instance_id)
            current = self.members.get(current_id) if current_id is not None else None
            if current is not None and current.member_epoch == STATIC_LEAVE_EPOCH:
                return self._replace_static(current, member_id, hb, now)
            if current is not None and current.member_id != member_id:
                raise UnreleasedInstanceIdError(
                    f"instance {hb.instance_id!r} is still member {current.member_id}"
                )
        existing = self.members.get(member_id)
        if existing is not None:
            # A member fenced or restarted with the same id comes back from nothing: what it
            # held is gone on its side, so it holds nothing here either.
            self._drop(existing)
        member = ConsumerMember(
            member_id=member_id,
            instance_id=hb.instance_id,
            rack_id=hb.rack_id,
            client_id=hb.client_id,
            client_host=hb.client_host,
            rebalance_timeout_ms=max(hb.rebalance_timeout_ms, 0),
            last_heartbeat=now,
        )
        self.members[member_id] = member
        if hb.instance_id is not None:
            self.static_members[hb.instance_id] = member_id
        self._bump(f"member {member_id} joins")
        log.info("member %s joins consumer group %r", member_id, self.group_id)
        return member

    def _replace_static(
        self, old: ConsumerMember, member_id: str, hb: Heartbeat, now: float
    ) -> ConsumerMember:
        """A static member back within its session timeout takes its place over: same
        assignment, same epoch, nobody else affected."""
        del self.members[old.member_id]
        target = self.target.pop(old.member_id, {})
        member = ConsumerMember(
            member_id=member_id,
            instance_id=hb.instance_id,
            rack_id=hb.rack_id,
            client_id=hb.client_id,
            client_host=hb.client_host,
            rebalance_timeout_ms=max(hb.rebalance_timeout_ms, 0) or old.rebalance_timeout_ms,
            subscribed=old.subscribed,
            regex=old.regex,
            server_assignor=old.server_assignor,
            member_epoch=old.previous_epoch,
            previous_epoch=old.previous_epoch,
            state=old.state,
            assigned=old.assigned,
            revoking=old.revoking,
            revoke_deadline=old.revoke_deadline,
            last_heartbeat=now,
        )
        self.members[member_id] = member
        self.target[member_id] = target
        assert hb.instance_id is not None
        self.static_members[hb.instance_id] = member_id
        log.info(
            "static member %r of consumer group %r is back as %s",
            hb.instance_id,
            self.group_id,
            member_id,
        )
        return member

    def _known(self, hb: Heartbeat) -> ConsumerMember:
        member = self.members.get(hb.member_id)
        if member is None:
            raise UnknownMemberIdError(
                f"member {hb.member_id} is not in consumer group {self.group_id!r}"
            )
        if hb.member_epoch == member.member_epoch:
            return member
        # The previous epoch is accepted when the member did not get our last answer
        # (it owns nothing it may not own at that epoch); anything else is fenced.
        if (
            hb.member_epoch == member.previous_epoch
            and hb.owned is not None
            and all(
                p in member.assigned.get(t, ()) or p in member.revoking.get(t, ())
                for t, ps in hb.owned.items()
                for p in ps
            )
        ):
            return member
        raise FencedMemberEpochError(
            f"member {member.member_id} is at epoch {member.member_epoch}, not {hb.member_epoch}"
        )

    def _leave(self, hb: Heartbeat) -> HeartbeatAnswer:
        member = self.members.get(hb.member_id)
        if member is None and hb.instance_id is not None:
            member = self.members.get(self.static_members.get(hb.instance_id, ""))
        if member is None:
            raise UnknownMemberIdError(
                f"member {hb.member_id} is not in consumer group {self.group_id!r}"
            )
        log.info("member %s leaves consumer group %r", member.member_id, self.group_id)
        self.remove(member, "left")
        return HeartbeatAnswer(hb.member_id, LEAVE_EPOCH, None)

    def _static_leave(self, hb: Heartbeat, now: float) -> HeartbeatAnswer:
        member = self.members.get(hb.member_id)
        if member is None or member.instance_id is None:
            raise UnknownMemberIdError(
                f"member {hb.member_id} is not a static member of {self.group_id!r}"
            )
        # It keeps its assignment and its place until the session timeout; its epoch
        # is remembered to hand back on its return.
        if member.member_epoch != STATIC_LEAVE_EPOCH:
            member.previous_epoch = member.member_epoch
        member.member_epoch = STATIC_LEAVE_EPOCH
        member.last_heartbeat = now
        log.info(
            "static member %r of consumer group %r leaves for now",
            member.instance_id,
            self.group_id,
        )
        return HeartbeatAnswer(hb.member_id, STATIC_LEAVE_EPOCH, None)

    # -- membership changes ------------------------------------------------------------------
    def remove(self, member: ConsumerMember, reason: str) -> None:
        self._drop(member)
        self._bump(f"member {member.member_id} {reason}")

    def _drop(self, member: ConsumerMember) -> None:
        self.members.pop(member.member_id, None)
        self.target.pop(member.member_id, None)
        if (
            member.instance_id is not None
            and self.static_members.get(member.instance_id) == member.member_id
        ):
            del self.static_members[member.instance_id]
        if member.regex and all(m.regex != member.regex for m in self.members.values()):
            # no member subscribes with it any more: its record is tombstoned
            self.resolved.pop(member.regex, None)
            self.resolved_at.pop(member.regex, None)

    def _bump(self, reason: str) -> None:
        self.group_epoch += 1
        log.info("consumer group %r epoch %d: %s", self.group_id, self.group_epoch, reason)

    def topics_of(self, member: ConsumerMember) -> frozenset[str]:
        """The member's subscription: its topic names and what its regex matches."""
        matched = self.resolved.get(member.regex, frozenset()) if member.regex else frozenset()
        return frozenset(member.subscribed) | matched

    def resolve_regexes(self, topics: Mapping[str, int]) -> None:
        """Resolve the members' regexes against the existing topics, again only when the
        set of topics changed (a topic created or deleted) or a regex is new. A resolution
        that comes out as before keeps its version and timestamp (its record is unchanged)."""
        names = frozenset(topics)
        previous = self.resolved
        if names != self.resolved_over:
            self.resolved = {}
            self.resolved_over = names
        wanted = {m.regex for m in self.members.values() if m.regex}
        now_ms = int(time.time() * 1000)
        for regex in wanted - self.resolved.keys():
            pattern = compile_regex(regex)
            matched = frozenset(t for t in names if pattern.fullmatch(t))
            self.resolved[regex] = matched
            if previous.get(regex) != matched or regex not in self.resolved_at:
                self.resolved_at[regex] = (self.group_epoch, now_ms)
        for regex in self.resolved.keys() - wanted:
            del self.resolved[regex]
        for regex in self.resolved_at.keys() - self.resolved.keys():
            del self.resolved_at[regex]

    def refresh_topics(self, topics: Mapping[str, int], *, bump: bool = True) -> None:
        """A subscribed topic created, deleted or grown, or one a regex now matches or no
        longer matches, changes the assignment's input. ``bump=False``: take the shape as
        it is (a group loaded from the log; its assignment already reflects it), unless a
        regex now matches other topics than its loaded resolution did."""
        earlier = dict(self.resolved)
        self.resolve_regexes(topics)
        wanted = {t for m in self.members.values() for t in self.topics_of(m)}
        shape = {t: topics[t] for t in sorted(wanted) if t in topics}
        if shape != self.topic_shape:
            self.topic_shape = shape
            if bump:
                self._bump("subscribed topics changed")
        if not bump:
            moved = sorted(r for r, ts in self.resolved.items() if earlier.get(r, ts) != ts)
            if moved:
                self._bump(f"regexes {moved} match other topics than when they were written")

    def select_assignor(self) -> str:
        """The assignor most members ask for (ties: by name), else the default."""
        votes: dict[str, int] = {}
        for m in self.members.values():
            if m.server_assignor is not None:
                votes[m.server_assignor] = votes.get(m.server_assignor, 0) + 1
        if not votes:
            return DEFAULT_ASSIGNOR
        return min(votes, key=lambda name: (-votes[name], name))

    def _assign(self, topics: Mapping[str, int]) -> None:
        self.assignor = self.select_assignor()
        members = [
            AssignorMember(
                m.member_id,
                frozenset(t for t in self.topics_of(m) if t in topics),
                self.target.get(m.member_id, {}),
            )
            for m in self.members.values()
        ]
        shape = {t: n for t, n in self.topic_shape.items() if n > 0}
        self.target = ASSIGNORS[self.assignor].assign(members, shape)
        self.assignment_epoch = self.group_epoch
        self.rebalances += 1
        log.info(
            "consumer group %r assignment epoch %d (%s): %s",
            self.group_id,
            self.assignment_epoch,
            self.assignor,
            {mid: {t: sorted(ps) for t, ps in tps.items()} for mid, tps in self.target.items()},
        )

    # -- reconciliation ------------------------------------------------------------------------
    def _revoked(self, member: ConsumerMember, owned: Partitions) -> None:
        """The member reports what it owns: partitions it was revoking and no longer owns
        are free for their next member."""
        if not member.revoking:
            return
        still = {
            t: {p for p in ps if p in owned.get(t, set())} for t, ps in member.revoking.items()
        }
        member.revoking = {t: ps for t, ps in still.items() if ps}

    def _reconcile(self, member: ConsumerMember, now: float) -> None:
        if member.member_epoch == STATIC_LEAVE_EPOCH:
            return
        target = self.target.get(member.member_id, {})
        if member.revoking:
            member.state = MemberState.UNREVOKED_PARTITIONS
            return
        keep = {t: ps & target.get(t, set()) for t, ps in member.assigned.items()}
        revoke = {t: ps - target.get(t, set()) for t, ps in member.assigned.items()}
        revoke = {t: ps for t, ps in revoke.items() if ps}
        if revoke:
            member.assigned = {t: ps for t, ps in keep.items() if ps}
            member.revoking = revoke
            member.revoke_deadline = now + member.rebalance_timeout_ms / 1000
            member.state = MemberState.UNREVOKED_PARTITIONS
            return
        held_elsewhere = {
            tp for other in self.members.values() if other is not member for tp in other.holds()
        }
        assigned = {t: set(ps) for t, ps in keep.items() if ps}
        pending = False
        for topic, ps in target.items():
            for p in ps:
                if (topic, p) in held_elsewhere:
                    pending = True
                else:
                    assigned.setdefault(topic, set()).add(p)
        member.assigned = assigned
        if member.member_epoch != self.assignment_epoch:
            member.previous_epoch = member.member_epoch
            member.member_epoch = self.assignment_epoch
        member.state = MemberState.UNRELEASED_PARTITIONS if pending else MemberState.STABLE

    # -- time --------------------------------------------------------------------------------
    def expired(self, now: float, session_timeout_ms: int) -> list[tuple[ConsumerMember, str]]:
        """Members past their session timeout, or that did not revoke in their rebalance
        timeout (fenced: their partitions go to others)."""
        out: list[tuple[ConsumerMember, str]] = []
        for m in self.members.values():
            if now - m.last_heartbeat > session_timeout_ms / 1000:
                out.append((m, f"sent no heartbeat for {session_timeout_ms} ms"))
            elif m.revoking and m.rebalance_timeout_ms > 0 and now > m.revoke_deadline:
                out.append((m, f"did not revoke in {m.rebalance_timeout_ms} ms"))
        return out


class _Pattern(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad pattern is answered, not logged by RE2 itself


@functools.lru_cache(maxsize=256)
def compile_regex(regex: str) -> _Pattern:
    """A member's subscription regex (RE2); one RE2 refuses is INVALID_REGULAR_EXPRESSION."""
    try:
        pattern: _Pattern = re2.compile(regex, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else "invalid"
        raise InvalidRegularExpressionError(f"regex {regex!r} does not compile: {reason}") from None
    return pattern
