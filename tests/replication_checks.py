"""Helpers shared by the replication fault tests (test_replication_faults.py,
test_network_partition.py): a background idempotent acks=all producer,
waiting for ISRs, and Jepsen's checks of a log (lost write, duplicate,
inconsistent offsets, nonmonotonic poll) plus the byte-for-byte comparison
of the replicas' segment files once a cluster is healed.
"""

import collections
import os
import threading
import time

from confluent_kafka import Producer

import kafka_wire as kw
from cluster import NODE_IDS, create_topic, topic_partitions, wait_until
from conftest import unique_topic

PARTITIONS = 3


class BackgroundProducer:
    """An idempotent acks=all producer writing unique values ("<prefix><n>",
    then `pad` bytes of filler; keyed over 50 keys) until stopped; keeps
    every ack and every error. Producers with different prefixes write
    different values (check_log's duplicate check needs that)."""

    def __init__(self, cluster, topic, prefix=b"v", pad=0, **extra):
        config = cluster.producer_config(
            **{
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "message.timeout.ms": 120000,
                **extra,
            }
        )
        self.producer = Producer(config)
        self.topic = topic
        self.prefix = prefix
        self.filler = b"." * pad
        self.acked = []  # (partition, offset, value)
        self.errors = []
        self.sent = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_delivery(self, err, msg):
        if err is not None:
            self.errors.append(str(err))
        else:
            self.acked.append((msg.partition(), msg.offset(), msg.value()))

    def _run(self):
        while not self._stop.is_set():
            value = self.prefix + b"%d" % self.sent + self.filler
            try:
                self.producer.produce(self.topic, key=b"k%d" % (self.sent % 50), value=value, on_delivery=self._on_delivery)
                self.sent += 1
            except BufferError:
                pass
            self.producer.poll(0.002 if self.sent % 20 == 0 else 0)
            if self.sent % 20 == 0:
                time.sleep(0.002)

    def stop(self, flush_timeout=180):
        self._stop.set()
        self.thread.join(30)
        left = self.producer.flush(flush_timeout)
        assert left == 0, "%d records still unacknowledged after %d s" % (left, flush_timeout)


def leaders(cluster, topic, via):
    parts = topic_partitions(cluster.metadata(via, topics=[topic]), topic)
    return parts


def wait_full_isr(cluster, topic, via, timeout=90):
    def full():
        parts = leaders(cluster, topic, via)
        return parts and all(p.leader >= 0 and sorted(p.isr) == sorted(p.replicas) for p in parts.values())

    wait_until("every partition of %s back to 3 in-sync replicas" % topic, full, timeout=timeout)


def rf3_topic(cluster, prefix, min_insync, partitions=PARTITIONS):
    """A new RF 3 topic of `partitions` partitions, every ISR full."""
    topic = unique_topic(prefix)
    create_topic(cluster, topic, partitions, 3, config={"min.insync.replicas": str(min_insync)})
    cluster.wait_topic(topic, partitions)
    wait_full_isr(cluster, topic, 1)
    return topic


def check_log(acked, consumed):
    """Jepsen's checks over what was acked and what a consumer read."""
    problems = []
    at = {}
    for p, recs in consumed.items():
        last = -1
        for offset, _key, value in recs:
            if offset <= last:
                problems.append("nonmonotonic poll on partition %d: %d after %d" % (p, offset, last))
            last = offset
            at[(p, offset)] = value
    values = collections.Counter(at.values())
    dups = [v for v, n in values.items() if n > 1]
    if dups:
        problems.append("%d value(s) in the log more than once, e.g. %r" % (len(dups), dups[:3]))
    lost = [(p, o, v) for p, o, v in acked if at.get((p, o)) != v]
    if lost:
        problems.append("%d acknowledged record(s) lost or at another offset, e.g. %r (found %r)" % (
            len(lost), lost[:3], [at.get((p, o)) for p, o, _ in lost[:3]]))
    return problems


def replica_batches(cluster, topic, partition, node, upto):
    """(base offset, CRC-checked raw bytes) of node's copy of the partition, below `upto`."""
    pdir = os.path.join(cluster.node(node).log_dirs, "%s-%d" % (topic, partition))
    out = []
    for _, path in kw.segment_files(pdir):
        batches, _ = kw.parse_segment(path)
        for b in batches:
            if b.base_offset < upto:
                out.append((b.base_offset, b.raw[12:]))  # without the base offset/length prefix
    return out


def check_replicas_identical(cluster, topic, ends):
    """Once healed, the three replicas hold the same batches below the high watermark."""
    problems = []
    for p, end in ends.items():
        copies = {n: replica_batches(cluster, topic, p, n, end) for n in NODE_IDS}
        first = copies[NODE_IDS[0]]
        for n, c in copies.items():
            if c != first:
                problems.append("partition %d: node %d's replica differs from node %d's (%d vs %d batches)" % (
                    p, n, NODE_IDS[0], len(c), len(first)))
    return problems


def ends_via(cluster, topic, via, partitions=PARTITIONS):
    """{partition: high watermark} as the partitions' leaders report them."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(cluster.consumer_config(**{"group.id": "ends-" + topic}))
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(partitions)}
    finally:
        c.close()


def produce_one(cluster, node, topic, partition, acks, timeout_ms, retries=2147483647):
    """One record to `partition` through `node` alone; the delivery error or None.
    With retries=0 librdkafka reports the broker's error itself instead of
    retrying a retriable one until the message times out."""
    out = []
    p = Producer(cluster.node(node).producer_config(**{
        "acks": acks, "message.timeout.ms": timeout_ms, "request.timeout.ms": min(timeout_ms, 5000),
        "retries": retries}))
    p.produce(topic, value=b"acks-%s-%d" % (str(acks).encode(), time.time_ns()), partition=partition,
              on_delivery=lambda e, m: out.append(e))
    p.flush(timeout_ms / 1000 + 30)
    assert len(out) == 1, out
    return out[0]
