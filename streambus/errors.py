"""One error root for StreamBus, and the Kafka error codes it answers with.

Every error the broker can return to a client is a subclass of
:class:`StreamBusError` carrying its Kafka error code in ``errno``; the
code-to-class table is built from the subclasses, so adding a class is the
only step needed to teach the broker a new code.
"""

from __future__ import annotations

from typing import ClassVar


class StreamBusError(Exception):
    """Root of every StreamBus error. ``errno`` is the Kafka error code sent to clients."""

    errno: ClassVar[int] = -1
    kafka_name: ClassVar[str] = "UNKNOWN_SERVER_ERROR"
    retriable: ClassVar[bool] = False
    description: ClassVar[str] = "The server experienced an unexpected error."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.description)

    @property
    def message(self) -> str:
        return str(self)


class UnknownServerError(StreamBusError):
    errno = -1
    kafka_name = "UNKNOWN_SERVER_ERROR"


class OffsetOutOfRangeError(StreamBusError):
    errno = 1
    kafka_name = "OFFSET_OUT_OF_RANGE"
    description = (
        "The requested offset is not within the range of offsets maintained by the server."
    )


class CorruptRecordError(StreamBusError):
    errno = 2
    kafka_name = "CORRUPT_MESSAGE"
    retriable = True
    description = (
        "The record batch failed its CRC check, has an invalid size, or is otherwise corrupt."
    )


class UnknownTopicOrPartitionError(StreamBusError):
    errno = 3
    kafka_name = "UNKNOWN_TOPIC_OR_PARTITION"
    retriable = True
    description = "This server does not host this topic-partition."


class InvalidFetchSizeError(StreamBusError):
    errno = 4
    kafka_name = "INVALID_FETCH_SIZE"
    description = "The requested fetch size is invalid."


class LeaderNotAvailableError(StreamBusError):
    errno = 5
    kafka_name = "LEADER_NOT_AVAILABLE"
    retriable = True
    description = "There is no leader for this topic-partition (an election is under way)."


class NotLeaderOrFollowerError(StreamBusError):
    errno = 6
    kafka_name = "NOT_LEADER_OR_FOLLOWER"
    retriable = True
    description = "This server is not the leader for that topic-partition."


class RequestTimedOutError(StreamBusError):
    errno = 7
    kafka_name = "REQUEST_TIMED_OUT"
    retriable = True
    description = "The request timed out."


class MessageTooLargeError(StreamBusError):
    errno = 10
    kafka_name = "MESSAGE_TOO_LARGE"
    description = (
        "The request included a message larger than the max message size the server will accept."
    )


class InvalidTopicError(StreamBusError):
    errno = 17
    kafka_name = "INVALID_TOPIC_EXCEPTION"
    description = "The request attempted to perform an operation on an invalid topic."


class RecordListTooLargeError(StreamBusError):
    errno = 18
    kafka_name = "RECORD_LIST_TOO_LARGE"
    description = (
        "The request included message batch larger than the configured segment size on the server."
    )


class InvalidRequiredAcksError(StreamBusError):
    errno = 21
    kafka_name = "INVALID_REQUIRED_ACKS"
    description = "Produce request specified an invalid value for required acks."


class InvalidTimestampError(StreamBusError):
    errno = 32
    kafka_name = "INVALID_TIMESTAMP"
    description = "The timestamp of the message is out of acceptable range."


class UnsupportedVersionError(StreamBusError):
    errno = 35
    kafka_name = "UNSUPPORTED_VERSION"
    description = "The version of API is not supported."


class TopicAlreadyExistsError(StreamBusError):
    errno = 36
    kafka_name = "TOPIC_ALREADY_EXISTS"
    description = "Topic with this name already exists."


class InvalidPartitionsError(StreamBusError):
    errno = 37
    kafka_name = "INVALID_PARTITIONS"
    description = "Number of partitions is below 1."


class InvalidReplicationFactorError(StreamBusError):
    errno = 38
    kafka_name = "INVALID_REPLICATION_FACTOR"
    description = "Replication factor is below 1 or larger than the number of available brokers."


class InvalidConfigError(StreamBusError):
    errno = 40
    kafka_name = "INVALID_CONFIG"
    description = "Configuration is invalid."


class InvalidRequestError(StreamBusError):
    errno = 42
    kafka_name = "INVALID_REQUEST"
    description = (
        "This most likely occurs because of a request being malformed by the client library."
    )


class OutOfOrderSequenceNumberError(StreamBusError):
    errno = 45
    kafka_name = "OUT_OF_ORDER_SEQUENCE_NUMBER"
    description = "The broker received an out of order sequence number."


class DuplicateSequenceNumberError(StreamBusError):
    errno = 46
    kafka_name = "DUPLICATE_SEQUENCE_NUMBER"
    description = "The broker received a duplicate sequence number."


class InvalidProducerEpochError(StreamBusError):
    errno = 47
    kafka_name = "INVALID_PRODUCER_EPOCH"
    description = "Producer attempted to produce with an old epoch."


class KafkaStorageError(StreamBusError):
    errno = 56
    kafka_name = "KAFKA_STORAGE_ERROR"
    retriable = True
    description = "Disk error when trying to access log file on the disk."


class UnknownProducerIdError(StreamBusError):
    errno = 59
    kafka_name = "UNKNOWN_PRODUCER_ID"
    description = (
        "The broker could not locate the producer metadata associated with the producer id."
    )


class UnsupportedCompressionTypeError(StreamBusError):
    errno = 76
    kafka_name = "UNSUPPORTED_COMPRESSION_TYPE"
    description = "The requesting client does not support the compression type of given partition."


class InvalidRecordError(StreamBusError):
    errno = 87
    kafka_name = "INVALID_RECORD"
    description = "This record has failed the validation on broker and hence will be rejected."

    def __init__(
        self, message: str | None = None, record_errors: tuple[tuple[int, str], ...] = ()
    ) -> None:
        super().__init__(message)
        # (index in the batch, why): Produce v8+'s record_errors naming each failing record
        self.record_errors = record_errors


class OffsetMetadataTooLargeError(StreamBusError):
    errno = 12
    kafka_name = "OFFSET_METADATA_TOO_LARGE"
    description = "The metadata field of the offset request was too large."


class CoordinatorLoadInProgressError(StreamBusError):
    errno = 14
    kafka_name = "COORDINATOR_LOAD_IN_PROGRESS"
    retriable = True
    description = "The coordinator is loading and hence can't process requests."


class CoordinatorNotAvailableError(StreamBusError):
    errno = 15
    kafka_name = "COORDINATOR_NOT_AVAILABLE"
    retriable = True
    description = "The coordinator is not available."


class NotCoordinatorError(StreamBusError):
    errno = 16
    kafka_name = "NOT_COORDINATOR"
    retriable = True
    description = "This is not the correct coordinator."


class IllegalGenerationError(StreamBusError):
    errno = 22
    kafka_name = "ILLEGAL_GENERATION"
    description = "Specified group generation id is not valid."


class InconsistentGroupProtocolError(StreamBusError):
    errno = 23
    kafka_name = "INCONSISTENT_GROUP_PROTOCOL"
    description = (
        "The group member's supported protocols are incompatible with those of existing members "
        "or first group member tried to join with empty protocol type or empty protocol list."
    )


class InvalidGroupIdError(StreamBusError):
    errno = 24
    kafka_name = "INVALID_GROUP_ID"
    description = "The configured groupId is invalid."


class UnknownMemberIdError(StreamBusError):
    errno = 25
    kafka_name = "UNKNOWN_MEMBER_ID"
    description = "The coordinator is not aware of this member."


class InvalidSessionTimeoutError(StreamBusError):
    errno = 26
    kafka_name = "INVALID_SESSION_TIMEOUT"
    description = (
        "The session timeout is not within the range allowed by the broker "
        "(as configured by group.min.session.timeout.ms and group.max.session.timeout.ms)."
    )


class RebalanceInProgressError(StreamBusError):
    errno = 27
    kafka_name = "REBALANCE_IN_PROGRESS"
    description = "The group is rebalancing, so a rejoin is needed."


class NonEmptyGroupError(StreamBusError):
    errno = 68
    kafka_name = "NON_EMPTY_GROUP"
    description = "The group is not empty."


class GroupIdNotFoundError(StreamBusError):
    errno = 69
    kafka_name = "GROUP_ID_NOT_FOUND"
    description = "The group id does not exist."


class FetchSessionIdNotFoundError(StreamBusError):
    errno = 70
    kafka_name = "FETCH_SESSION_ID_NOT_FOUND"
    retriable = True
    description = "The fetch session ID was not found."


class InvalidFetchSessionEpochError(StreamBusError):
    errno = 71
    kafka_name = "INVALID_FETCH_SESSION_EPOCH"
    retriable = True
    description = "The fetch session epoch is invalid."


# The consumer group protocol (KIP-848).
class FencedMemberEpochError(StreamBusError):
    errno = 110
    kafka_name = "FENCED_MEMBER_EPOCH"
    description = "The member epoch is fenced by the group coordinator; it must rejoin."


class UnreleasedInstanceIdError(StreamBusError):
    errno = 111
    kafka_name = "UNRELEASED_INSTANCE_ID"
    description = "The instance id is still used by another member of the consumer group."


class UnsupportedAssignorError(StreamBusError):
    errno = 112
    kafka_name = "UNSUPPORTED_ASSIGNOR"
    description = "The assignor or its version range is not supported by the consumer group."


class StaleMemberEpochError(StreamBusError):
    errno = 113
    kafka_name = "STALE_MEMBER_EPOCH"
    retriable = True
    description = "The member epoch is stale; the member must retry after its next heartbeat."


class MismatchedEndpointTypeError(StreamBusError):
    errno = 114
    kafka_name = "MISMATCHED_ENDPOINT_TYPE"
    description = "The request was sent to an endpoint of the wrong type."


class UnsupportedEndpointTypeError(StreamBusError):
    errno = 115
    kafka_name = "UNSUPPORTED_ENDPOINT_TYPE"
    description = "This endpoint type is not supported yet."


class InvalidRegularExpressionError(StreamBusError):
    errno = 130
    kafka_name = "INVALID_REGULAR_EXPRESSION"
    description = "The regular expression is not valid."


class GroupSubscribedToTopicError(StreamBusError):
    errno = 86
    kafka_name = "GROUP_SUBSCRIBED_TO_TOPIC"
    description = "The consumer group is actively subscribed to the topic."


class MemberIdRequiredError(StreamBusError):
    errno = 79
    kafka_name = "MEMBER_ID_REQUIRED"
    description = (
        "The group member needs to have a valid member id before actually entering a "
        "consumer group."
    )

    def __init__(self, message: str | None = None, member_id: str = "") -> None:
        super().__init__(message)
        self.member_id = member_id  # the id the member is to rejoin with


class FencedInstanceIdError(StreamBusError):
    errno = 82
    kafka_name = "FENCED_INSTANCE_ID"
    description = (
        "The broker rejected this static consumer since another consumer with the same "
        "group.instance.id has registered with a different member.id."
    )


class InvalidReplicaAssignmentError(StreamBusError):
    errno = 39
    kafka_name = "INVALID_REPLICA_ASSIGNMENT"
    description = "Replica assignment is invalid."


class NotControllerError(StreamBusError):
    errno = 41
    kafka_name = "NOT_CONTROLLER"
    retriable = True
    description = "This is not the correct controller for this cluster."


class FencedLeaderEpochError(StreamBusError):
    errno = 74
    kafka_name = "FENCED_LEADER_EPOCH"
    retriable = True
    description = "The leader epoch in the request is older than the epoch on the broker."


class UnknownLeaderEpochError(StreamBusError):
    errno = 75
    kafka_name = "UNKNOWN_LEADER_EPOCH"
    retriable = True
    description = "The leader epoch in the request is newer than the epoch on the broker."


class UnstableOffsetCommitError(StreamBusError):
    errno = 88
    kafka_name = "UNSTABLE_OFFSET_COMMIT"
    retriable = True
    description = (
        "There are unstable offsets that need to be cleared: a transaction has offsets "
        "for this partition that are not yet committed or aborted."
    )


class NotEnoughReplicasError(StreamBusError):
    errno = 19
    kafka_name = "NOT_ENOUGH_REPLICAS"
    retriable = True
    description = "Messages are rejected since there are fewer in-sync replicas than required."


class NotEnoughReplicasAfterAppendError(StreamBusError):
    errno = 20
    kafka_name = "NOT_ENOUGH_REPLICAS_AFTER_APPEND"
    retriable = True
    description = "Messages are written to the log, but to fewer in-sync replicas than required."


class StaleBrokerEpochError(StreamBusError):
    errno = 77
    kafka_name = "STALE_BROKER_EPOCH"
    description = "Broker epoch has changed."


class DuplicateBrokerRegistrationError(StreamBusError):
    errno = 101
    kafka_name = "DUPLICATE_BROKER_REGISTRATION"
    description = "This broker ID is already in use."


class BrokerIdNotRegisteredError(StreamBusError):
    errno = 102
    kafka_name = "BROKER_ID_NOT_REGISTERED"
    description = "The given broker ID was not registered."


class PreferredLeaderNotAvailableError(StreamBusError):
    errno = 80
    kafka_name = "PREFERRED_LEADER_NOT_AVAILABLE"
    retriable = True
    description = "The preferred leader was not available."


class EligibleLeadersNotAvailableError(StreamBusError):
    errno = 83
    kafka_name = "ELIGIBLE_LEADERS_NOT_AVAILABLE"
    retriable = True
    description = "Eligible topic partition leaders are not available."


class ElectionNotNeededError(StreamBusError):
    errno = 84
    kafka_name = "ELECTION_NOT_NEEDED"
    retriable = True
    description = "Leader election not needed for topic partition."


class InvalidUpdateVersionError(StreamBusError):
    errno = 95
    kafka_name = "INVALID_UPDATE_VERSION"
    description = "The given update version was invalid."


class IneligibleReplicaError(StreamBusError):
    errno = 107
    kafka_name = "INELIGIBLE_REPLICA"
    description = "The new ISR contains at least one ineligible replica."


# -- transactions (Kafka's codes for the transaction coordinator's answers) -------------------
class InvalidTxnStateError(StreamBusError):
    errno = 48
    kafka_name = "INVALID_TXN_STATE"
    description = "The producer attempted a transactional operation in an invalid state."


class InvalidProducerIdMappingError(StreamBusError):
    errno = 49
    kafka_name = "INVALID_PRODUCER_ID_MAPPING"
    description = (
        "The producer attempted to use a producer id which is not currently assigned to "
        "its transactional id."
    )


class InvalidTransactionTimeoutError(StreamBusError):
    errno = 50
    kafka_name = "INVALID_TRANSACTION_TIMEOUT"
    description = (
        "The transaction timeout is larger than the maximum value allowed by the broker "
        "(as configured by transaction.max.timeout.ms)."
    )


class ConcurrentTransactionsError(StreamBusError):
    errno = 51
    kafka_name = "CONCURRENT_TRANSACTIONS"
    retriable = True
    description = (
        "The producer attempted to update a transaction while another concurrent operation "
        "on the same transaction was ongoing."
    )


class OperationNotAttemptedError(StreamBusError):
    errno = 55
    kafka_name = "OPERATION_NOT_ATTEMPTED"
    description = "The broker did not attempt to execute this operation."


class ProducerFencedError(StreamBusError):
    errno = 90
    kafka_name = "PRODUCER_FENCED"
    description = (
        "There is a newer producer with the same transactionalId which fences the current one."
    )


class TransactionalIdNotFoundError(StreamBusError):
    errno = 105
    kafka_name = "TRANSACTIONAL_ID_NOT_FOUND"
    description = "The transactionalId could not be found."


class TopicAuthorizationFailedError(StreamBusError):
    errno = 29
    kafka_name = "TOPIC_AUTHORIZATION_FAILED"
    description = "Topic authorization failed."


class GroupAuthorizationFailedError(StreamBusError):
    errno = 30
    kafka_name = "GROUP_AUTHORIZATION_FAILED"
    description = "Group authorization failed."


class ClusterAuthorizationFailedError(StreamBusError):
    errno = 31
    kafka_name = "CLUSTER_AUTHORIZATION_FAILED"
    description = "Cluster authorization failed."


class TransactionalIdAuthorizationFailedError(StreamBusError):
    errno = 53
    kafka_name = "TRANSACTIONAL_ID_AUTHORIZATION_FAILED"
    description = "Transactional Id authorization failed."


class SecurityDisabledError(StreamBusError):
    errno = 54
    kafka_name = "SECURITY_DISABLED"
    description = "Security features are disabled."


class UnsupportedSaslMechanismError(StreamBusError):
    errno = 33
    kafka_name = "UNSUPPORTED_SASL_MECHANISM"
    description = "The broker does not support the requested SASL mechanism."


class IllegalSaslStateError(StreamBusError):
    errno = 34
    kafka_name = "ILLEGAL_SASL_STATE"
    description = "Request is not valid given the current SASL state."


class SaslAuthenticationFailedError(StreamBusError):
    errno = 58
    kafka_name = "SASL_AUTHENTICATION_FAILED"
    description = "SASL Authentication failed."


class ResourceNotFoundError(StreamBusError):
    errno = 91
    kafka_name = "RESOURCE_NOT_FOUND"
    description = "A request illegally referred to a resource that does not exist."


class DuplicateResourceError(StreamBusError):
    errno = 92
    kafka_name = "DUPLICATE_RESOURCE"
    description = "A request illegally referred to the same resource twice."


class UnacceptableCredentialError(StreamBusError):
    errno = 93
    kafka_name = "UNACCEPTABLE_CREDENTIAL"
    description = "Requested credential would not meet criteria for acceptability."


class ThrottlingQuotaExceededError(StreamBusError):
    errno = 89
    kafka_name = "THROTTLING_QUOTA_EXCEEDED"
    retriable = True
    description = "The throttling quota has been exceeded."


class FrameError(StreamBusError):
    """A request frame that cannot be parsed: the connection that sent it is closed."""

    errno = -1
    kafka_name = "UNKNOWN_SERVER_ERROR"
    description = "Malformed request frame."


class SecurityNotReadyError(StreamBusError):
    """ACLs or SCRAM credentials asked for before this broker has loaded them (Kafka's
    ``AuthorizerNotReadyException``): never decided against an empty set; the
    connection is closed and the client, which retries a lost connection, comes back."""

    errno = -1
    kafka_name = "UNKNOWN_SERVER_ERROR"
    retriable = True
    description = "The broker has not loaded its ACLs and credentials yet."


def _all_subclasses(cls: type[StreamBusError]) -> list[type[StreamBusError]]:
    out: list[type[StreamBusError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERROR_BY_CODE: dict[int, type[StreamBusError]] = {
    sub.errno: sub
    for sub in _all_subclasses(StreamBusError)
    if sub not in (FrameError, SecurityNotReadyError)
}


def error_name(code: int) -> str:
    """Kafka's name for an error code (``UNKNOWN_TOPIC_OR_PARTITION``), ``NONE`` for 0."""
    if code == 0:
        return "NONE"
    cls = ERROR_BY_CODE.get(code)
    return cls.kafka_name if cls is not None else f"ERROR_{code}"
