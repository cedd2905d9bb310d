"""The server-side assignors of the consumer group protocol (KIP-848): ``uniform`` and ``range``.

The coordinator, not a client leader, decides who reads what. An assignor sees each
member's subscription and its previous target, and the partition count of every
subscribed topic; it answers the new target assignment. Both are deterministic (the
same input gives the same answer, whichever broker coordinates), and ``uniform`` is
sticky: a partition stays with its member unless balance needs it elsewhere, so a
member joining or leaving moves as few partitions as possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# member id -> topic -> partitions
Assignment = dict[str, dict[str, set[int]]]


@dataclass(frozen=True, slots=True)
class AssignorMember:
    member_id: str
    topics: frozenset[str]  # the subscribed topics that exist
    previous: Mapping[str, set[int]]  # the member's previous target


class ServerAssignor(Protocol):
    name: str

    def assign(
        self, members: Sequence[AssignorMember], partitions: Mapping[str, int]
    ) -> Assignment: ...


class UniformAssignor:
    """Every member gets an equal share (differing by at most one) of the partitions of the
    topics it subscribes to; partitions stay where they were when balance allows."""

    name = "uniform"

    def assign(
        self, members: Sequence[AssignorMember], partitions: Mapping[str, int]
    ) -> Assignment:
        out: Assignment = {m.member_id: {} for m in members}
        load = dict.fromkeys(out, 0)
        owner: dict[tuple[str, int], str] = {}
        ordered = sorted(members, key=lambda m: m.member_id)
        total = sum(
            count for topic, count in partitions.items() if any(topic in m.topics for m in members)
        )
        quota = -(-total // max(len(members), 1))  # ceiling: nobody keeps more than this
        # 1. Stickiness: each member keeps what it had, up to the quota.
        for m in ordered:
            for topic in sorted(m.previous):
                if topic not in m.topics:
                    continue
                for p in sorted(m.previous[topic]):
                    if (
                        p < partitions.get(topic, 0)
                        and (topic, p) not in owner
                        and load[m.member_id] < quota
                    ):
                        owner[(topic, p)] = m.member_id
                        load[m.member_id] += 1
        # 2. The rest go to the least-loaded subscriber.
        for topic in sorted(partitions):
            subscribers = [m.member_id for m in ordered if topic in m.topics]
            if not subscribers:
                continue
            for p in range(partitions[topic]):
                if (topic, p) not in owner:
                    target = min(subscribers, key=lambda mid: (load[mid], mid))
                    owner[(topic, p)] = target
                    load[target] += 1
        # 3. Balance: move partitions from the most to the least loaded while they differ by two.
        by_member: dict[str, list[tuple[str, int]]] = {mid: [] for mid in out}
        for tp, mid in sorted(owner.items()):
            by_member[mid].append(tp)
        for _ in range(total):
            heavy = max(by_member, key=lambda mid: (len(by_member[mid]), mid))
            movable = [
                (tp, light.member_id)
                for tp in reversed(by_member[heavy])
                for light in ordered
                if tp[0] in light.topics
                and len(by_member[light.member_id]) + 1 < len(by_member[heavy])
            ]
            if not movable:
                break
            tp, light_id = min(movable, key=lambda item: (len(by_member[item[1]]), item[1]))
            by_member[heavy].remove(tp)
            by_member[light_id].append(tp)
        for mid, tps in by_member.items():
            for topic, p in tps:
                out[mid].setdefault(topic, set()).add(p)
        return out


class RangeAssignor:
    """Per topic, its subscribers in member-id order each get a contiguous range: members
    subscribed to co-partitioned topics read the same partition numbers of each."""

    name = "range"

    def assign(
        self, members: Sequence[AssignorMember], partitions: Mapping[str, int]
    ) -> Assignment:
        out: Assignment = {m.member_id: {} for m in members}
        for topic in sorted(partitions):
            subscribers = sorted(m.member_id for m in members if topic in m.topics)
            if not subscribers:
                continue
            count = partitions[topic]
            share, extra = divmod(count, len(subscribers))
            start = 0
            for i, mid in enumerate(subscribers):
                size = share + (1 if i < extra else 0)
                if size:
                    out[mid][topic] = set(range(start, start + size))
                start += size
        return out


ASSIGNORS: dict[str, ServerAssignor] = {a.name: a for a in (UniformAssignor(), RangeAssignor())}
DEFAULT_ASSIGNOR = UniformAssignor.name  # Kafka's group.consumer.assignors lists uniform first
