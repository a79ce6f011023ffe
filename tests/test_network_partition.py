"""Real network partitions of the 3-node cluster: every node runs in its own
network namespace (tests/netns.py) and links are cut or narrowed for real,
while the processes stay alive. What SIGSTOP cannot show
(test_replication_faults.py pauses a leader): a leader that is alive and
reachable by clients but cut off from its peers and the controller quorum.

- isolated partition leader: acks=all sent to it is never acknowledged
  (during the cut, nor later when it rejoins), acks=1 writes it takes alone
  are truncated when it rejoins, the majority carries on, and the healed log
  passes Jepsen's checks with identical replicas;
- isolated controller quorum leader: the majority elects another one and
  takes metadata changes, the isolated node refuses them with an error that
  names the quorum, and after healing every node has the one same view;
- slow follower (its link from the leader narrowed): it leaves the ISR,
  acks=all goes on without it (min.insync.replicas=2), and it catches up and
  rejoins once the link is back.

Skipped, with the reason, where network namespaces cannot be made (see
netns.py); run as root.
"""

import os
import struct
import threading
import time

import pytest
from confluent_kafka import KafkaError

import kafka_wire as kw
from clients import consume_confluent
from cluster import (  # noqa: F401 - fixtures
    NODE_IDS,
    REQUEST_TIMED_OUT,
    broker_id,
    cluster_factory,
    create_topics_raw,
    node_of,
    wait_until,
)
from conftest import unique_topic
from netns import net  # noqa: F401 - fixture
from replication_checks import (
    BackgroundProducer,
    check_log,
    check_replicas_identical,
    ends_via,
    leaders,
    rf3_topic,
    wait_full_isr,
)

# What a Produce that must not be acknowledged may be answered with: the
# broker's retriable refusals.
NOT_ACKNOWLEDGED = {
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_LEADER_FOR_PARTITION,  # NOT_LEADER_OR_FOLLOWER
    KafkaError.FENCED_LEADER_EPOCH,
}


@pytest.fixture
def netns_cluster(net, cluster_factory):
    """Makes a started cluster whose node N runs in namespace N of `net`.
    (`net` is set up before and torn down after the cluster's processes.)"""

    def make(args=()):
        return cluster_factory(args=args, hosts=net.hosts(), prefixes=net.prefixes())

    return make


class RawProduce:
    """One Produce (v8, one batch of `values`) to exactly `node`'s port, on
    the raw wire and in a thread of its own: a client library would learn
    the other brokers from the node's Metadata and might send it elsewhere.
    `wait()` returns the node's kafka_wire.PartitionProduceResponse."""

    def __init__(self, node, topic, partition, values, acks, timeout_ms):
        self.values = list(values)
        self.result = None
        self.failure = None
        batch = kw.build_batch([(None, v) for v in self.values])

        def run():
            try:
                with kw.Conn(node.port, host=node.host, timeout=timeout_ms / 1000.0 + 60) as conn:
                    self.result = kw.produce(conn, 8, topic, partition, batch, acks=acks, timeout_ms=timeout_ms)
            except Exception as e:  # noqa: BLE001 - reported by wait()
                self.failure = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self):
        return not self.thread.is_alive()

    def wait(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "no Produce answer after %ss" % timeout
        if self.failure is not None:
            raise AssertionError("Produce of %r: %r" % (self.values[:1], self.failure))
        return self.result


def read_from(node, topic, partition):
    """What exactly `node` serves a consumer (raw Fetch v4, replica id -1,
    no client routing) from offset 0: (high watermark, [(offset, key, value)])."""
    out, offset = [], 0
    with kw.Conn(node.port, host=node.host) as conn:
        while True:
            body = kw.fetch_body_v4([(topic, [(partition, offset, 1 << 20)])], max_wait_ms=0, min_bytes=0)
            r = conn.request(kw.FETCH, 4, body)
            r.i32()  # throttle_time_ms
            assert r.i32() == 1 and r.string() == topic and r.i32() == 1 and r.i32() == partition
            error, hw = r.i16(), r.i64()
            r.i64()  # last_stable_offset
            r.array(lambda rr: (rr.i64(), rr.i64()))  # aborted transactions
            records = r.kbytes() or b""
            assert error == 0, "Fetch from node %s: error %d" % (node.node_id, error)
            pos, before = 0, offset
            while pos + 12 <= len(records):
                _base, length = struct.unpack_from(">qi", records, pos)
                if pos + 12 + length > len(records):
                    break
                out += [rec for rec in kw.decode_batch(records[pos : pos + 12 + length]) if rec[0] >= offset]
                pos += 12 + length
            offset = out[-1][0] + 1 if out else offset
            if offset >= hw or offset == before:
                return hw, out


def values_at(consumed):
    """{(partition, offset): value} of a consume_confluent() result."""
    return {(p, o): v for p, recs in consumed.items() for o, _k, v in recs}


def test_isolated_leader_acknowledges_nothing_and_truncates(net, netns_cluster):
    """Node X leads the one partition of an RF 3, min.insync.replicas=2 topic
    and is cut off from both other nodes (clients still reach it). While
    cut: acks=all sent to X is not acknowledged (one with a short timeout
    fails during the cut; one with a timeout longer than the cut is still
    waiting when the cut heals and must not be acknowledged then either);
    acks=1 sent to X may be; X's high watermark does not move over them;
    the majority fences X and moves the leadership, and a producer through
    the survivors is acknowledged. After healing: X follows, its acks=1
    records are gone from every replica, and every acks=all acknowledgement
    (an idempotent producer through all nodes from before until after the
    cut, one through the survivors during it) is read back exactly once at
    its offset; the replicas hold identical batches below the high
    watermark, and what X served consumers while cut is still there."""
    c = netns_cluster(args=["--replica.lag.time.max.ms=1500"])
    topic = rf3_topic(c, "iso", min_insync=2, partitions=1)
    before = leaders(c, topic, 1)[0]
    x = node_of(before.leader)
    survivors = [n for n in NODE_IDS if n != x]
    everywhere = BackgroundProducer(c, topic, prefix=b"all-")
    wait_until("first acks", lambda: len(everywhere.acked) >= 300 or everywhere.errors, timeout=60)

    net.isolate(x)
    cut_at = time.monotonic()
    print("cut node %d (leader of %s-0 at epoch %d) off from nodes %r" % (x, topic, before.leader_epoch, survivors))
    ones = RawProduce(c.node(x), topic, 0, [b"iso-acks1-%d" % i for i in range(20)], 1, 10000).wait(60)
    short_all = RawProduce(c.node(x), topic, 0, [b"iso-all-short"], -1, 5000).wait(60)
    pending_all = RawProduce(c.node(x), topic, 0, [b"iso-all-pending"], -1, 90000)
    assert short_all.error_code != 0, (
        "acks=all acknowledged at offset %d by node %d, cut off from every replica" % (short_all.base_offset, x))
    assert short_all.error_code in NOT_ACKNOWLEDGED, "acks=all to the isolated leader: %r" % short_all
    print("acks=all to the isolated leader: error %d (%s)" % (short_all.error_code, short_all.error_message))
    ones_acked = []
    if ones.error_code == 0:
        ones_acked = [(v, ones.base_offset + i) for i, v in enumerate([b"iso-acks1-%d" % i for i in range(20)])]
    print("acks=1 to the isolated leader: error %d, offsets %r" % (ones.error_code, [o for _, o in ones_acked][:3]))

    def moved():
        p = leaders(c, topic, survivors[0])[0]
        return node_of(p.leader) in survivors and p.leader_epoch > before.leader_epoch and p

    after = wait_until("the majority moves %s-0 off node %d" % (topic, x), moved, timeout=60)
    print("leadership moved to broker %d at epoch %d %.1fs after the cut" % (
        after.leader, after.leader_epoch, time.monotonic() - cut_at))
    majority = BackgroundProducer(c, topic, prefix=b"maj-", **{"bootstrap.servers": c.bootstrap_of(survivors)})
    wait_until("acks through the survivors", lambda: len(majority.acked) >= 300 or majority.errors, timeout=60)

    # X's consumers see only what every replica had: its high watermark
    # stays below what it took alone.
    x_high, served_by_x = read_from(c.node(x), topic, 0)
    assert [o for o, _k, _v in served_by_x] == list(range(x_high)), "node %d served offsets %r..%r, high watermark %d" % (
        x, served_by_x[:1], served_by_x[-1:], x_high)
    if ones_acked:
        assert x_high <= min(o for _, o in ones_acked), (
            "isolated node %d shows consumers offsets up to %d, past its unreplicated acks=1 records at %r"
            % (x, x_high, [o for _, o in ones_acked]))
    assert not pending_all.done(), "acks=all answered during the cut: %r" % (pending_all.result or pending_all.failure,)

    net.heal()
    print("healed %.1fs after the cut" % (time.monotonic() - cut_at))
    pending = pending_all.wait(150)
    assert pending.error_code != 0, (
        "acks=all sent to node %d while it was cut off was acknowledged (offset %d) after it rejoined" % (
            x, pending.base_offset))
    assert pending.error_code in NOT_ACKNOWLEDGED, "pending acks=all: %r" % pending
    print("acks=all pending across the heal: error %d (%s) %.1fs after the cut" % (
        pending.error_code, pending.error_message, time.monotonic() - cut_at))

    wait_full_isr(c, topic, survivors[0])
    majority.stop()
    everywhere.stop()
    assert not everywhere.errors and not majority.errors, (everywhere.errors[:3], majority.errors[:3])
    assert len(everywhere.acked) == everywhere.sent and len(majority.acked) == majority.sent
    ends = ends_via(c, topic, survivors[0], partitions=1)
    acked = everywhere.acked + majority.acked
    assert ends[0] == len(acked), "high watermark %d, %d records acknowledged" % (ends[0], len(acked))
    final = consume_confluent(c.node(survivors[0]), topic, ends, timeout=120)
    problems = check_log(acked, final)
    at = values_at(final)
    values = set(at.values())
    never = [v for v, _ in ones_acked] + [b"iso-all-short", b"iso-all-pending"]
    problems += ["%r, written only on the isolated node %d, is in the healed log" % (v, x) for v in never if v in values]
    problems += ["offset %d: node %d served %r while cut off, the healed log has %r" % (o, x, v, at.get((0, o)))
                 for o, _k, v in served_by_x if at.get((0, o)) != v]
    wait_until("replicas identical", lambda: not check_replicas_identical(c, topic, ends), timeout=30)
    assert not problems, "\n".join(problems)
    c.wait_topic(topic, 1)  # node X's view is the survivors' again
    print("%d + %d acks, %d acks=1 records truncated from node %d" % (
        len(everywhere.acked), len(majority.acked), len(ones_acked), x))


def topic_views(cluster, nodes):
    """{node: {topic: {partition: (leader, epoch, replicas)}}} from each node's Metadata."""
    out = {}
    for n in nodes:
        md = cluster.metadata(n, topics=None)
        out[n] = {
            t.name: {p.index: (p.leader, p.leader_epoch, tuple(p.replicas)) for p in t.partitions}
            for t in md["topics"] if t.error_code == 0
        }
    return out


def test_isolated_quorum_leader_never_splits_metadata(net, netns_cluster):
    """The active controller (quorum leader) Q is cut off from both other
    nodes. The two elect a new quorum leader, fence Q, and commit a
    CreateTopics sent to one of them; a CreateTopics sent to Q fails with
    REQUEST_TIMED_OUT and a message naming the quorum, and Q's topic never
    exists. After healing, Q catches up: all three nodes show one view (same
    topics, leaders, epochs, replicas) and agree on the controller, and Q
    takes metadata changes again."""
    c = netns_cluster()
    q = node_of(c.controller())
    survivors = [n for n in NODE_IDS if n != q]
    first = unique_topic("first")
    res = create_topics_raw(c.node(q).port, [(first, 2, 3)], timeout_ms=15000, host=c.node(q).host)
    assert res[first][0] == 0, res
    c.wait_topic(first, 2)

    net.isolate(q)
    cut_at = time.monotonic()
    ctl = c.controller(via=survivors, timeout=60)
    print("node %d (quorum leader) cut off; nodes %r elected node %d after %.1fs" % (
        q, survivors, node_of(ctl), time.monotonic() - cut_at))
    c.wait_brokers(via=survivors, nodes=survivors, timeout=60)  # Q fenced
    majority = unique_topic("majority")
    s = c.node(survivors[0])
    res = create_topics_raw(s.port, [(majority, 3, 2)], timeout_ms=15000, host=s.host)
    assert res[majority][0] == 0, res
    c.wait_topic(majority, 3, via=survivors, led_by=survivors)

    isolated = unique_topic("isolated")
    started = time.monotonic()
    res = create_topics_raw(c.node(q).port, [(isolated, 3, 2)], timeout_ms=15000, host=c.node(q).host)
    code, message = res[isolated]
    print("CreateTopics on the isolated node: error %d after %.1fs: %s" % (code, time.monotonic() - started, message))
    assert code == REQUEST_TIMED_OUT, res
    assert "quorum" in (message or ""), res
    # It does not pass the voters it cannot hear from as reachable.
    for n in survivors:
        voter = "%d@%s:%d" % (n, c.node(n).host, c.controller_ports[n])
        assert "%s (reachable)" % voter not in message, message
    # No split while cut: each side knows only what it committed.
    views = topic_views(c, NODE_IDS)
    assert isolated not in views[survivors[0]] and isolated not in views[survivors[1]], views
    assert majority not in views[q], views[q]

    net.heal()
    c.wait_brokers(timeout=60)
    c.wait_topic(majority, 3, via=NODE_IDS)

    def one_view():
        v = topic_views(c, NODE_IDS)
        return all(v[n] == v[q] for n in NODE_IDS) and v

    view = wait_until("all three nodes show one view of the topics", one_view, timeout=60)
    assert first in view[q] and majority in view[q], view[q]
    assert isolated not in view[q], "the change refused on the isolated node appeared: %r" % view[q][isolated]
    ctl_after = c.controller(via=NODE_IDS, timeout=30)
    # Q is a full voter again: a change sent to it commits.
    last = unique_topic("last")
    res = create_topics_raw(c.node(q).port, [(last, 1, 3)], timeout_ms=15000, host=c.node(q).host)
    assert res[last][0] == 0, res
    c.wait_topic(last, 1, via=NODE_IDS)
    view = wait_until("one view after the last change", one_view, timeout=60)
    assert isolated not in view[q] and set(view[q]) >= {first, majority, last}, sorted(view[q])
    print("after healing: controller broker %d, topics %r" % (ctl_after, sorted(view[q])))


def log_end(cluster, topic, partition, node):
    """The next offset after the last whole batch in node's segment files
    (a follower's files hold at least what it reported as durable)."""
    pdir = os.path.join(cluster.node(node).log_dirs, "%s-%d" % (topic, partition))
    end = 0
    for _, path in kw.segment_files(pdir):
        batches, _ = kw.parse_segment(path)
        if batches:
            end = max(end, batches[-1].next_offset)
    return end


def test_slow_follower_leaves_isr_and_rejoins(net, netns_cluster):
    """With replica.lag.time.max.ms=1000, the link from the leader to one
    follower F is narrowed to 4 Mbit/s (only what the leader's port sends
    to F) under an unpaced acks=all producer: F leaves the ISR, acks=all
    goes on with the other two (min.insync.replicas=2; the producer is
    acknowledged for records F does not have on disk) while F still makes
    progress; with the link back, F catches up and rejoins the ISR, every
    acknowledged record is read back exactly once, and the replicas hold
    identical batches."""
    c = netns_cluster(args=["--replica.lag.time.max.ms=1000"])
    topic = rf3_topic(c, "slow", min_insync=2, partitions=1)
    p0 = leaders(c, topic, 1)[0]
    leader = node_of(p0.leader)
    slow = next(node_of(r) for r in p0.replicas if node_of(r) != leader)
    prod = BackgroundProducer(c, topic, prefix=b"s-", pad=200)
    wait_until("first acks", lambda: len(prod.acked) >= 300 or prod.errors, timeout=60)

    net.throttle(slow, leader, c.node(leader).port, 4000)
    narrowed_at = time.monotonic()

    def out_of_isr():
        p = leaders(c, topic, leader)[0]
        return node_of(p.leader) == leader and broker_id(slow) not in p.isr and p

    p = wait_until("node %d out of the ISR" % slow, out_of_isr, timeout=60)
    print("node %d left the ISR %.1fs after its link was narrowed: isr %r" % (
        slow, time.monotonic() - narrowed_at, p.isr))

    def acked_past_slow():
        top = max(o for _, o, _ in prod.acked)
        end = log_end(c, topic, 0, slow)
        return top >= end + 100 and (top, end)

    top, end = wait_until("acks=all past node %d's log end" % slow, acked_past_slow, timeout=60)
    print("acknowledged offset %d while node %d's log ends at %d" % (top, slow, end))
    wait_until("node %d still fetching" % slow, lambda: log_end(c, topic, 0, slow) > end, timeout=60)

    net.unthrottle(slow)
    healed_at = time.monotonic()
    wait_full_isr(c, topic, leader, timeout=120)
    print("node %d back in the ISR %.1fs after the link came back" % (slow, time.monotonic() - healed_at))
    prod.stop()
    assert not prod.errors, prod.errors[:3]
    assert len(prod.acked) == prod.sent
    ends = ends_via(c, topic, leader, partitions=1)
    assert ends[0] == len(prod.acked), (ends, len(prod.acked))
    consumed = consume_confluent(c.node(leader), topic, ends, timeout=120)
    problems = check_log(prod.acked, consumed)
    wait_until("replicas identical", lambda: not check_replicas_identical(c, topic, ends), timeout=60)
    assert not problems, "\n".join(problems)
