"""Consumer-group membership: the classic protocol's groups, members and their states.

A group moves through Kafka's classic state machine::

    Empty ──join──▶ PreparingRebalance ──all joined──▶ CompletingRebalance
      ▲                    ▲     │                         │ leader's SyncGroup
      │                    │     └─ nobody left ─▶ Empty   ▼
      └── last member leaves/expires ◀──────────────── Stable
    (any state) ──DeleteGroups──▶ Dead

The broker relays assignments; the group leader (a client) computes them with
the assignor the members agreed on. This module holds the state and its pure
transitions; waiting and timing live in :mod:`streambus.groups.coordinator`.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple


class GroupState(enum.Enum):
    EMPTY = "Empty"
    PREPARING_REBALANCE = "PreparingRebalance"
    COMPLETING_REBALANCE = "CompletingRebalance"
    STABLE = "Stable"
    DEAD = "Dead"


class JoinResult(NamedTuple):
    """What one member's JoinGroup is answered with when a rebalance round completes."""

    error: int
    generation: int
    protocol_type: str | None
    protocol: str | None
    leader: str
    member_id: str
    members: list[tuple[str, str | None, bytes]]  # (member id, instance id, metadata): leader only
    # JoinGroup v9: the leader gets the members but must not assign (a static leader's
    # return, its group's assignment unchanged).
    skip_assignment: bool = False


@dataclass(eq=False)
class Member:
    member_id: str
    group_instance_id: str | None
    client_id: str
    client_host: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: list[tuple[str, bytes]]
    last_heartbeat: float = 0.0  # loop time of the last sign of life
    assignment: bytes = b""
    join_waiter: asyncio.Future[JoinResult] | None = None
    sync_waiter: asyncio.Future[tuple[int, bytes]] | None = None

    @property
    def awaiting_join(self) -> bool:
        return self.join_waiter is not None and not self.join_waiter.done()

    def metadata(self, protocol: str) -> bytes:
        for name, data in self.protocols:
            if name == protocol:
                return data
        return b""

    def same_protocols(self, protocols: list[tuple[str, bytes]]) -> bool:
        return self.protocols == protocols


@dataclass(eq=False)
class Group:
    group_id: str
    state: GroupState = GroupState.EMPTY
    generation: int = 0
    protocol_type: str | None = None
    protocol: str | None = None
    leader: str | None = None
    members: dict[str, Member] = field(default_factory=dict)  # join order
    static_members: dict[str, str] = field(default_factory=dict)  # instance id -> member id
    pending_members: dict[str, float] = field(default_factory=dict)  # member id -> expiry
    rebalance_deadline: float = 0.0
    initial_rebalance: bool = (
        False  # the delay that lets a starting group's members arrive together
    )
    state_since_ms: int = (
        0  # wall clock of the last state change (offsets retention counts from it)
    )
    rebalances: int = 0  # rebalance rounds completed with members

    def candidate_protocols(self) -> set[str]:
        """Protocols every member supports."""
        names: set[str] | None = None
        for member in self.members.values():
            mine = {name for name, _ in member.protocols}
            names = mine if names is None else names & mine
        return names or set()

    def supports(self, protocol_type: str, protocols: list[tuple[str, bytes]]) -> bool:
        if not self.members:
            return bool(protocol_type) and bool(protocols)
        if protocol_type != self.protocol_type:
            return False
        return bool(self.candidate_protocols() & {name for name, _ in protocols})

    def select_protocol(self) -> str:
        """Each member votes for its most preferred protocol that all members support."""
        candidates = self.candidate_protocols()
        votes: Counter[str] = Counter()
        for member in self.members.values():
            votes[next(name for name, _ in member.protocols if name in candidates)] += 1
        return votes.most_common(1)[0][0]

    def max_rebalance_timeout_ms(self) -> int:
        return max((m.rebalance_timeout_ms for m in self.members.values()), default=0)

    def all_joined(self) -> bool:
        return all(m.awaiting_join for m in self.members.values())
