"""Documentation strings DescribeConfigs returns (``include_documentation``).

Topic configs carry Apache Kafka 4.4's own text (``LogConfig``'s ConfigDef, Apache
License 2.0), so a tool shows what an operator already knows; the protocol handler adds
whether StreamBus applies the setting or only stores it.
"""

from __future__ import annotations

TOPIC_DOCS: dict[str, str] = {
    "segment.bytes": (
        "This configuration controls the segment file size for the log. Retention and "
        "cleaning is always done a file at a time so a larger segment size means fewer "
        "files but less granular control over retention. The active segment is rolled "
        "once it reaches this size."
    ),
    "segment.ms": (
        "This configuration controls the period of time after which Kafka will force the "
        "log to roll even if the segment file isn't full to ensure that retention can "
        "delete or compact old data. This forces active segment rolling by time, even if "
        "the active segment has not reached <code>segment.bytes</code>. For compacted "
        "topics, <code>max.compaction.lag.ms</code> can trigger active segment rolling "
        "sooner: the effective time-based roll threshold is the smaller of "
        "<code>segment.ms</code> and <code>max.compaction.lag.ms</code>."
    ),
    "segment.jitter.ms": (
        "The maximum random jitter subtracted from the scheduled segment roll time to "
        "avoid thundering herds of segment rolling"
    ),
    "segment.index.bytes": (
        "This configuration controls the size of the index that maps offsets to file "
        "positions. We preallocate this index file and shrink it only after log rolls. "
        "You generally should not need to change this setting."
    ),
    "flush.messages": (
        "This setting allows specifying an interval at which we will force an fsync of "
        "data written to the log. For example if this was set to 1 we would fsync after "
        "every message; if it were 5 we would fsync after every five messages. In general "
        "we recommend you not set this and use replication for durability and allow the "
        "operating system's background flush capabilities as it is more efficient. This "
        "setting can be overridden on a per-topic basis (see <a "
        'href="https://kafka.apache.org/documentation/#topicconfigs">the per-topic '
        "configuration section</a>)."
    ),
    "flush.ms": (
        "This setting allows specifying a time interval at which we will force an fsync "
        "of data written to the log. For example if this was set to 1000 we would fsync "
        "after 1000 ms had passed. Note that this setting depends on the broker-level "
        "configuration <code>log.flush.scheduler.interval.ms</code>, which controls how "
        "frequently the flush check occurs. In general we recommend you not set this and "
        "use replication for durability and allow the operating system's background flush "
        "capabilities as it is more efficient."
    ),
    "retention.bytes": (
        "This configuration controls the maximum size a partition (which consists of log "
        "segments) can grow to before we will discard old log segments to free up space "
        'if we are using the "delete" retention policy. By default there is no size limit '
        "only a time limit. Since this limit is enforced at the partition level, multiply "
        "it by the number of partitions to compute the topic retention in bytes. "
        "Additionally, retention.bytes configuration operates independently of "
        '"segment.ms" and "segment.bytes" configurations. Moreover, it triggers the '
        "rolling of new segment if the retention.bytes is configured to zero."
    ),
    "retention.ms": (
        "This configuration controls the maximum time we will retain a log before we will "
        'discard old log segments to free up space if we are using the "delete" retention '
        "policy. This represents an SLA on how soon consumers must read their data. If "
        "set to -1, no time limit is applied. Additionally, retention.ms configuration "
        'operates independently of "segment.ms" and "segment.bytes" configurations. '
        "Moreover, it triggers the rolling of new segment if the retention.ms condition "
        "is satisfied."
    ),
    "max.message.bytes": (
        "The largest record batch size allowed by Kafka (after compression if compression "
        "is enabled)."
    ),
    "max.decompressed.message.bytes": (
        "The maximum decompressed size, in bytes, of a single record the broker will "
        "accept; larger records are rejected with an <code>InvalidRecordException</code>. "
        "It is enforced where the broker decompresses records: produce validation of "
        "compressed batches, log compaction, and offset lookups by timestamp or max "
        "timestamp against the local log or remote storage. Unlike "
        "<code>max.message.bytes</code>, which bounds the compressed batch on the wire, "
        "this bounds the decompressed size of an individual record. Lowering it below the "
        "size of already-stored records makes compaction and timestamp offset lookups of "
        "affected partitions fail until it is raised again. The default imposes no limit "
        "beyond the largest record the broker could allocate anyway; set a smaller value "
        "to enforce a per-record cap."
    ),
    "index.interval.bytes": (
        "This setting controls how frequently Kafka adds entries to its offset index and, "
        "conditionally, to its time index. The default setting ensures that we index a "
        "message roughly every 4096 bytes. More frequent indexing allows reads to jump "
        "closer to the exact position in the log but results in larger index files. You "
        "probably don't need to change this.<p> Note: the time index will be inserted "
        "only when the timestamp is greater than the last indexed timestamp.</p>"
    ),
    "delete.retention.ms": (
        "The amount of time to retain delete tombstone markers for <a "
        'href="https://kafka.apache.org/documentation/#compaction">log compacted</a> '
        "topics. This setting also gives a bound on the time in which a consumer must "
        "complete a read if they begin from offset 0 to ensure that they get a valid "
        "snapshot of the final stage (otherwise delete tombstones may be collected before "
        "they complete their scan)."
    ),
    "min.compaction.lag.ms": (
        "The minimum time a message will remain uncompacted in the log. Only applicable "
        "for logs that are being compacted."
    ),
    "max.compaction.lag.ms": (
        "The maximum time a message will remain ineligible for compaction in the log. "
        "Only applicable for logs that are being compacted. Because the active segment is "
        "never compacted, for compacted topics this value also drives active segment "
        "rolling: the effective time-based roll threshold is the smaller of "
        "<code>segment.ms</code> and <code>max.compaction.lag.ms</code>. Active segment "
        "rolling moves records out of the active segment, after which "
        "<code>max.compaction.lag.ms</code> makes them eligible for compaction even if "
        "<code>min.cleanable.dirty.ratio</code> is not met. See <a "
        'href="https://kafka.apache.org/documentation/#compaction">log compaction</a>.'
    ),
    "file.delete.delay.ms": ("The time to wait before deleting a file from the filesystem"),
    "min.cleanable.dirty.ratio": (
        "This configuration controls how frequently the log compactor will attempt to "
        "clean the log (assuming <a "
        'href="https://kafka.apache.org/documentation/#compaction">log compaction</a> is '
        "enabled). By default we will avoid cleaning a log where more than 50% of the log "
        "has been compacted. This ratio bounds the maximum space wasted in the log by "
        "duplicates (at 50% at most 50% of the log could be duplicates). A higher ratio "
        "will mean fewer, more efficient cleanings but will mean more wasted space in the "
        "log. If the max.compaction.lag.ms or the min.compaction.lag.ms configurations "
        "are also specified, then the log compactor considers the log to be eligible for "
        "compaction as soon as either: (i) the dirty ratio threshold has been met and the "
        "log has had dirty (uncompacted) records for at least the min.compaction.lag.ms "
        "duration, or (ii) if the log has had dirty (uncompacted) records for at most the "
        "max.compaction.lag.ms period."
    ),
    "cleanup.policy": (
        'This config designates the retention policy to use on log segments. The "delete" '
        "policy (which is the default) will discard old segments when their retention "
        'time or size limit has been reached. The "compact" policy will enable <a '
        'href="https://kafka.apache.org/documentation/#compaction">log compaction</a>, '
        "which retains the latest value for each key. It is also possible to specify both "
        'policies in a comma-separated list (e.g. "delete,compact"). In this case, old '
        "segments will be discarded per the retention time and size configuration, while "
        "retained segments will be compacted. An empty list means infinite retention - no "
        "cleanup policies will be applied and log segments will be retained indefinitely. "
        "Note that with remote storage enabled, local retention limits "
        "(log.local.retention.ms and log.local.retention.bytes) are still applied to "
        "local segments."
    ),
    "unclean.leader.election.enable": (
        "Indicates whether to enable replicas not in the ISR set to be elected as leader "
        "as a last resort, even though doing so may result in data loss.<p>Note: In KRaft "
        "mode, when enabling this config dynamically, it needs to wait for the unclean "
        "leader electionthread to trigger election periodically (default is 5 minutes). "
        "Please run <code>kafka-leader-election.sh</code> with <code>unclean</code> "
        "option to trigger the unclean leader election immediately if needed.</p>"
    ),
    "min.insync.replicas": (
        "Specifies the <i>minimum</i> number of in-sync replicas (including the leader) "
        'required for a write to succeed when a producer sets <code>acks</code> to "all" '
        '(or "-1"). In the <code>acks=all</code> case, every in-sync replica must '
        "acknowledge a write for it to be considered successful. E.g., if a topic has "
        "<code>replication.factor</code> of 3 and the ISR set includes all three "
        "replicas, then all three replicas must acknowledge an <code>acks=all</code> "
        "write for it to succeed, even if <code>min.insync.replicas</code> happens to be "
        "less than 3. If <code>acks=all</code> and the current ISR set contains fewer "
        "than <code>min.insync.replicas</code> members, then the producer will raise an "
        "exception (either <code>NotEnoughReplicas</code> or "
        "<code>NotEnoughReplicasAfterAppend</code>).<br> Regardless of the "
        "<code>acks</code> setting, the messages will not be visible to the consumers "
        "until they are replicated to all in-sync replicas and the "
        "<code>min.insync.replicas</code> condition is met.<br> When used together, "
        "<code>min.insync.replicas</code> and <code>acks</code> allow you to enforce "
        "greater durability guarantees. A typical scenario would be to create a topic "
        "with a replication factor of 3, set <code>min.insync.replicas</code> to 2, and "
        'produce with <code>acks</code> of "all". This ensures that a majority of '
        "replicas must persist a write before it's considered successful by the producer "
        "and it's visible to consumers.<p>Note that when the Eligible Leader Replicas "
        "feature is enabled, the semantics of this config changes. Please refer to <a "
        'href="https://kafka.apache.org/documentation/#eligible_leader_replicas">the ELR '
        "section</a> for more info.</p>"
    ),
    "compression.type": (
        "Specify the final compression type for a given topic. This configuration accepts "
        "the standard compression codecs ('gzip', 'snappy', 'lz4', 'zstd'). It "
        "additionally accepts 'uncompressed' which is equivalent to no compression; and "
        "'producer' which means retain the original compression codec set by the "
        "producer."
    ),
    "compression.gzip.level": (
        "The compression level to use if compression.type is set to <code>gzip</code>."
    ),
    "compression.lz4.level": (
        "The compression level to use if compression.type is set to <code>lz4</code>."
    ),
    "compression.zstd.level": (
        "The compression level to use if compression.type is set to <code>zstd</code>."
    ),
    "preallocate": (
        "True if we should preallocate the file on disk when creating a new log segment."
    ),
    "message.timestamp.type": (
        "Define whether the timestamp in the message is message create time or log append time."
    ),
    "message.timestamp.before.max.ms": (
        "This configuration sets the allowable timestamp difference between the broker's "
        "timestamp and the message timestamp. The message timestamp can be earlier than "
        "or equal to the broker's timestamp, with the maximum allowable difference "
        "determined by the value set in this configuration. If "
        "message.timestamp.type=CreateTime, the message will be rejected if the "
        "difference in timestamps exceeds this specified threshold. This configuration is "
        "ignored if message.timestamp.type=LogAppendTime."
    ),
    "message.timestamp.after.max.ms": (
        "This configuration sets the allowable timestamp difference between the message "
        "timestamp and the broker's timestamp. The message timestamp can be later than or "
        "equal to the broker's timestamp, with the maximum allowable difference "
        "determined by the value set in this configuration. If "
        "message.timestamp.type=CreateTime, the message will be rejected if the "
        "difference in timestamps exceeds this specified threshold. This configuration is "
        "ignored if message.timestamp.type=LogAppendTime."
    ),
    "leader.replication.throttled.replicas": (
        "A list of replicas for which log replication should be throttled on the leader "
        "side. The list should describe a set of replicas in the form "
        "[PartitionId]:[BrokerId],[PartitionId]:[BrokerId]:... or alternatively the "
        "wildcard '*' can be used to throttle all replicas for this topic."
    ),
    "follower.replication.throttled.replicas": (
        "A list of replicas for which log replication should be throttled on the follower "
        "side. The list should describe a set of replicas in the form "
        "[PartitionId]:[BrokerId],[PartitionId]:[BrokerId]:... or alternatively the "
        "wildcard '*' can be used to throttle all replicas for this topic."
    ),
    "remote.storage.enable": (
        "To enable tiered storage for a topic, set this configuration to true. To disable "
        "tiered storage for a topic that has it enabled, set this configuration to false. "
        "When disabling, you must also set <code>remote.log.delete.on.disable</code> to "
        "true."
    ),
    "local.retention.ms": (
        "The number of milliseconds to keep the local log segment before it gets deleted. "
        "Default value is -2, it represents <code>retention.ms</code> value is to be "
        "used. The effective value should always be less than or equal to "
        "<code>retention.ms</code> value."
    ),
    "local.retention.bytes": (
        "The maximum size of local log segments that can grow for a partition before it "
        "deletes the old segments. Default value is -2, it represents "
        "<code>retention.bytes</code> value to be used. The effective value should always "
        "be less than or equal to <code>retention.bytes</code> value."
    ),
    "remote.log.copy.disable": (
        "Determines whether tiered data for a topic should become read only, and no more "
        "data uploading on a topic. Once this config is set to true, the local retention "
        "configuration (i.e. local.retention.ms/bytes) becomes irrelevant, and all data "
        "expiration follows the topic-wide retention configuration(i.e. "
        "retention.ms/bytes)."
    ),
    "remote.copy.lag.ms": (
        "Controls one of the two upload eligibility checks (time and size) for copying "
        "segments to remote storage. A non-active segment is upload-eligible when either "
        "this time-based check or <code>remote.copy.lag.bytes</code> is satisfied. When "
        "set to 0, uploads are immediately eligible regardless of lag checks. When set to "
        "a positive value (ms), the segment is time-eligible once elapsed time since its "
        "latest record reaches this value. When set to -1, this value is derived from "
        "effective local retention time (<code>local.retention.ms</code>). If that "
        "effective local retention time is unlimited (-1), this time-based check is not "
        "applied. A positive value should not exceed effective local retention time "
        "unless local retention is unlimited (-1)."
    ),
    "remote.copy.lag.bytes": (
        "Controls one of the two upload eligibility checks (time and size) for copying "
        "segments to remote storage. A non-active segment is upload-eligible when either "
        "this size-based check or <code>remote.copy.lag.ms</code> is satisfied. When set "
        "to 0, uploads are immediately eligible regardless of lag checks. When set to a "
        "positive value (bytes), the segment is size-eligible once bytes of newer local "
        "log data after that segment reaches this value. When set to -1, this value is "
        "derived from effective local retention size "
        "(<code>local.retention.bytes</code>). If that effective local retention size is "
        "unlimited (-1), this size-based check is not applied. A positive value should "
        "not exceed effective local retention size unless local retention is unlimited "
        "(-1)."
    ),
    "remote.log.delete.on.disable": (
        "Determines whether tiered data for a topic should be deleted after tiered "
        "storage is disabled on a topic. This configuration should be enabled when trying "
        "to set <code>remote.storage.enable</code> from true to false"
    ),
    "errors.deadletterqueue.group.enable": (
        "Enable this topic to be used as a dead-letter queue for share groups. When set "
        "to <code>true</code>, share groups can write undeliverable records to this "
        "topic. When set to <code>false</code> (the default), attempts to use this topic "
        "as a DLQ will be rejected."
    ),
}

# BrokerConfig fields: the Kafka name DescribeConfigs gives each (Kafka's own where one
# exists), and what it does. ``host`` and ``port`` are described together as listeners.
BROKER_FIELDS: dict[str, tuple[str, str]] = {
    "data_dir": ("log.dirs", "The directory holding topics, the Raft journal and metadata."),
    "advertised_host": (
        "advertised.listeners",
        "The listener Metadata tells clients to connect to (advertised host, bound port).",
    ),
    "broker_id": ("node.id", "This broker's id in the cluster (also its Raft node id)."),
    "metrics_host": ("metrics.host", "The address the Prometheus /metrics endpoint binds."),
    "metrics_port": ("metrics.port", "The /metrics endpoint's port; 0 turns it off."),
    "metrics_web_config": (
        "web.config.file",
        "Prometheus' web config YAML: TLS and bcrypt basic auth for /metrics.",
    ),
    "tracing": ("tracing", "Whether request spans are recorded and exported."),
    "num_partitions": (
        "num.partitions",
        "Partitions of auto-created topics and of CreateTopics asking for -1.",
    ),
    "auto_create_topics_enable": (
        "auto.create.topics.enable",
        "Whether Metadata for an unknown topic creates it.",
    ),
    "max_request_bytes": ("socket.request.max.bytes", "The largest request frame accepted."),
    "queued_max_request_bytes": (
        "queued.max.request.bytes",
        "Memory that request frames being read or handled may hold, broker-wide.",
    ),
    "connections_max_idle_ms": (
        "connections.max.idle.ms",
        "An idle connection is closed after this long; 0 or less: never.",
    ),
    "max_connections": (
        "max.connections",
        "Connections accepted at most; 0: half of what the open-files limit leaves.",
    ),
    "max_connections_per_ip": (
        "max.connections.per.ip",
        "Connections accepted from one address at most; 0: max.connections.",
    ),
    "fetch_max_bytes": ("fetch.max.bytes", "The largest Fetch response, whatever is asked."),
    "maintenance_interval_ms": (
        "log.retention.check.interval.ms",
        "How often retention, compaction and flush.ms are checked.",
    ),
    "shutdown_timeout_s": (
        "shutdown.timeout.s",
        "How long a stopping broker lets in-flight requests finish.",
    ),
    "group_initial_rebalance_delay_ms": (
        "group.initial.rebalance.delay.ms",
        "How long a new group waits for more members before its first rebalance.",
    ),
    "group_min_session_timeout_ms": (
        "group.min.session.timeout.ms",
        "The shortest session timeout a group member may ask for.",
    ),
    "group_max_session_timeout_ms": (
        "group.max.session.timeout.ms",
        "The longest session timeout a group member may ask for.",
    ),
    "group_consumer_session_timeout_ms": (
        "group.consumer.session.timeout.ms",
        "A consumer-protocol (KIP-848) member not heartbeating for this long is removed.",
    ),
    "group_consumer_heartbeat_interval_ms": (
        "group.consumer.heartbeat.interval.ms",
        "The heartbeat interval consumer-protocol members are told to keep.",
    ),
    "offsets_retention_minutes": (
        "offsets.retention.minutes",
        "How long the committed offsets of an empty group are kept.",
    ),
    "offsets_topic_num_partitions": (
        "offsets.topic.num.partitions",
        "Partitions of __consumer_offsets.",
    ),
    "controller_quorum": (
        "controller.quorum.voters",
        "The Raft voters holding the cluster metadata (id@host:port,...); empty: this "
        "broker alone.",
    ),
    "raft_port": ("raft.port", "The Raft port of quorum entries given without one."),
    "cluster_secret": ("cluster.secret", "The secret Raft voters authenticate each other with."),
    "broker_session_timeout_ms": (
        "broker.session.timeout.ms",
        "A broker not heartbeating for this long is fenced.",
    ),
    "broker_heartbeat_interval_ms": (
        "broker.heartbeat.interval.ms",
        "How often a broker heartbeats to the controller.",
    ),
    "replica_lag_time_max_ms": (
        "replica.lag.time.max.ms",
        "A follower this far behind its leader leaves the ISR.",
    ),
    "replica_fetch_wait_max_ms": (
        "replica.fetch.wait.max.ms",
        "How long a follower's Fetch long-polls.",
    ),
    "replica_fetch_max_bytes": (
        "replica.fetch.max.bytes",
        "Bytes per partition a follower Fetch asks for.",
    ),
    "replica_fetch_response_max_bytes": (
        "replica.fetch.response.max.bytes",
        "Bytes a follower Fetch response holds at most.",
    ),
    "max_partitions": (
        "max.partitions",
        "Partitions this broker hosts at most, internal ones included.",
    ),
    "default_replication_factor": (
        "default.replication.factor",
        "Replicas of auto-created topics and of CreateTopics asking for -1.",
    ),
    "offsets_topic_replication_factor": (
        "offsets.topic.replication.factor",
        "Replicas of __consumer_offsets (at most the live brokers when it is created).",
    ),
    "auto_leader_rebalance_enable": (
        "auto.leader.rebalance.enable",
        "Whether the controller moves leaders back to preferred replicas.",
    ),
    "leader_imbalance_check_interval_seconds": (
        "leader.imbalance.check.interval.seconds",
        "How often the controller checks for leaders off their preferred replicas.",
    ),
    "transaction_state_log_num_partitions": (
        "transaction.state.log.num.partitions",
        "Partitions of __transaction_state.",
    ),
    "transaction_state_log_replication_factor": (
        "transaction.state.log.replication.factor",
        "Replicas of __transaction_state (at most the live brokers when it is created).",
    ),
    "transaction_state_log_min_isr": (
        "transaction.state.log.min.isr",
        "min.insync.replicas of __transaction_state.",
    ),
    "transaction_max_timeout_ms": (
        "transaction.max.timeout.ms",
        "The longest transaction timeout a producer may ask for.",
    ),
    "transaction_abort_timed_out_transaction_cleanup_interval_ms": (
        "transaction.abort.timed.out.transaction.cleanup.interval.ms",
        "How often transactions past their timeout are aborted.",
    ),
}

# Confluent Server's schema validation topic configs, and StreamBus's mode beside them.
TOPIC_DOCS.update(
    {
        "confluent.key.schema.validation": (
            "True: every non-null record key must carry the schema registry's wire format "
            "(magic byte 0, a schema id registered under the key's subject); a batch with a "
            "failing record is refused with INVALID_RECORD."
        ),
        "confluent.value.schema.validation": (
            "True: every non-null record value must carry the schema registry's wire format "
            "(magic byte 0, a schema id registered under the value's subject); a batch with a "
            "failing record is refused with INVALID_RECORD."
        ),
        "confluent.key.subject.name.strategy": (
            "The subject a key's schema id must be registered under: TopicNameStrategy, "
            "RecordNameStrategy or TopicRecordNameStrategy."
        ),
        "confluent.value.subject.name.strategy": (
            "The subject a value's schema id must be registered under: TopicNameStrategy, "
            "RecordNameStrategy or TopicRecordNameStrategy."
        ),
        "streambus.key.schema.validation.mode": (
            "id: check the key's 5-byte schema header only; full: also decode the key with "
            "that schema."
        ),
        "streambus.value.schema.validation.mode": (
            "id: check the value's 5-byte schema header only; full: also decode the value "
            "with that schema."
        ),
    }
)
