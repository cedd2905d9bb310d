"""Replication, Kafka's way: followers fetch from leaders, the ISR, the high watermark.

``replica`` holds one partition's replication state and sits under the partition
service; ``fetcher`` (a follower's fetches from its leaders) and ``manager`` (roles
from the cluster metadata, ISR changes, metrics) sit above it. This package module
imports neither, so the layers stay one-way.
"""
