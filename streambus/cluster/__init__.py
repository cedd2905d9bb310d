"""The cluster's core: replicated metadata, the quorum that agrees on it, the controller.

- ``state``: the pure state machine (:class:`ClusterState`, :func:`apply`), replica
  placement and the group-coordinator hash.
- ``records``: the records that change it, and their wire form.
- ``quorum``: :class:`LocalQuorum` (one broker, no network) and :class:`RaftQuorum`
  (pysyncobj), both behind :class:`Quorum`.
- ``controller``: registration, heartbeats, fencing and preferred-leader election on the
  Raft leader.
"""

from streambus.cluster.config import ClusterConfig, RaftTimings, Voter, parse_quorum
from streambus.cluster.controller import Controller
from streambus.cluster.quorum import (
    Applied,
    LocalQuorum,
    Quorum,
    RaftQuorum,
    RaftStatus,
    make_quorum,
)
from streambus.cluster.records import (
    AllocateProducerIds,
    AlterBrokerConfigs,
    AlterPartition,
    AlterTopicConfigs,
    BrokerHeartbeat,
    ChangePartitionLeader,
    CreatePartitions,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    Record,
    RegisterBroker,
    Result,
    SetClusterId,
    UnfenceBroker,
)
from streambus.cluster.state import (
    NO_LEADER,
    BrokerInfo,
    ClusterState,
    PartitionState,
    TopicState,
    apply,
    assign_replicas,
    coordinator_partition,
    java_string_hashcode,
    plan_partitions,
    plan_topic,
    preferred_election,
    preferred_elections,
    unclean_election,
)

__all__ = [  # noqa: RUF022 - grouped by what a caller does with them
    # configuration
    "ClusterConfig",
    "RaftTimings",
    "Voter",
    "parse_quorum",
    # quorum and controller
    "Applied",
    "Controller",
    "LocalQuorum",
    "Quorum",
    "RaftQuorum",
    "RaftStatus",
    "make_quorum",
    # state
    "NO_LEADER",
    "BrokerInfo",
    "ClusterState",
    "PartitionState",
    "TopicState",
    "apply",
    "assign_replicas",
    "coordinator_partition",
    "java_string_hashcode",
    "plan_partitions",
    "plan_topic",
    "preferred_election",
    "preferred_elections",
    "unclean_election",
    # records
    "AllocateProducerIds",
    "AlterPartition",
    "AlterBrokerConfigs",
    "AlterTopicConfigs",
    "BrokerHeartbeat",
    "ChangePartitionLeader",
    "CreatePartitions",
    "CreateTopic",
    "DeleteTopic",
    "FenceBroker",
    "Record",
    "RegisterBroker",
    "Result",
    "SetClusterId",
    "UnfenceBroker",
]
