"""Three tidelog nodes on one host (tests/cluster.py, started like
scripts/cluster from config/cluster/node-N.properties), driven by real
clients and by raw requests sent to one chosen node.

The metadata quorum, registration and fencing, topic placement (replicas on
distinct nodes, leaders on every node), the RF 1 data path across nodes,
restart, refused starts, and at the end replication (acks=all over RF 3 with
a leader kill, the ISR shrinking and growing back). Replication under
repeated faults: test_replication_faults.py.

Without a cluster-capable binary (its --help lists no
controller.quorum.voters) the broker tests skip; the config-file and
script checks run anyway.
"""

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicCollection
from confluent_kafka.admin import ConfigResource, NewTopic, ResourceType
from kafka.protocol.admin import CreateTopicsRequest, CreateTopicsResponse

import kafka_wire as kw
from cluster import (  # noqa: F401 - fixtures
    INVALID_REPLICATION_FACTOR,
    NODE_IDS,
    SCRIPT,
    SESSION_TIMEOUT_MS,
    TOPIC_ALREADY_EXISTS,
    cluster,
    cluster_factory,
    create_topic,
    create_topics_body,
    create_topics_raw,
    leaders_by_node,
    metadata,
    node_config,
    node_of,
    parse_create_topics_v4,
    parse_listeners,
    parse_voters,
    read_properties,
    require_cluster_mode,
    topic_partitions,
    wait_until,
)
from clients import check_contiguous, check_roundtrip, consume_confluent, consume_kafka_python, make_records, produce_confluent, watermarks
from conftest import REPO, pick_ports, unique_topic

UNKNOWN_TOPIC_OR_PARTITION = 3


def ends_of(target, topic, partitions):
    """{partition: high watermark}, with every low watermark 0."""
    wm = watermarks(target, topic, range(partitions))
    assert all(lo == 0 for lo, _ in wm.values()), wm
    return {p: hi for p, (lo, hi) in wm.items()}


def roundtrip(cluster, topic, partitions, n, via=1, keys=100):
    """Produces `n` keyed acks=all records through node `via`'s bootstrap,
    reads them back from offset 0 through another node; exact checks."""
    records = make_records(n, keys=keys)
    acked = produce_confluent(cluster.node(via), topic, records)
    ends = ends_of(cluster, topic, partitions)
    assert sum(ends.values()) == n, ends
    other = next(k for k in cluster.live if k != via) if len(cluster.live) > 1 else via
    consumed = consume_confluent(cluster.node(other), topic, ends, timeout=60)
    check_roundtrip(records, acked, consumed)
    return records, acked


def describe_topic(cluster, name, nodes=None):
    """(topic id, [(partition, replicas)]) through confluent's describe_topics."""
    admin = cluster.admin(nodes)
    d = admin.describe_topics(TopicCollection([name]), request_timeout=30)[name].result(30)
    return str(d.topic_id), sorted((p.id, [r.id for r in p.replicas]) for p in d.partitions)


# --------------------------------------------------------------------------
# config files and the script (no broker needed)


def test_node_config_files_agree():
    props = {n: read_properties(node_config(n)) for n in NODE_IDS}
    assert all(set(p) == set(props[1]) for p in props.values()), {n: sorted(p) for n, p in props.items()}
    voters = props[1]["controller.quorum.voters"]
    assert parse_voters(voters) == {n: ("127.0.0.1", 9191 + n) for n in NODE_IDS}
    for n, p in props.items():
        assert p["node.id"] == str(n)
        assert p["process.roles"] == "broker,controller"
        assert p["controller.quorum.voters"] == voters
        assert p["controller.listener.names"] == "CONTROLLER"
        listeners = parse_listeners(p["listeners"])
        assert listeners == {"PLAINTEXT": ("127.0.0.1", 9091 + n), "CONTROLLER": ("127.0.0.1", 9191 + n)}
        assert p["metrics.listeners"] == "127.0.0.1:%d" % (9643 + n)
        assert p["num.shards"] == "1"  # client ports are one apart
        assert p["log.dirs"] == "./tidelog-cluster/node-%d" % n
        # Every other setting is the same on every node.
        differ = {"node.id", "listeners", "metrics.listeners", "log.dirs"}
        assert {k: v for k, v in p.items() if k not in differ} == {
            k: v for k, v in props[1].items() if k not in differ
        }
    assert int(props[1]["default.replication.factor"]) <= len(NODE_IDS)
    assert int(props[1]["min.insync.replicas"]) <= int(props[1]["default.replication.factor"])


def test_node_config_settings_known_to_broker(binary):
    require_cluster_mode(binary)
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    for n in NODE_IDS:
        for name in read_properties(node_config(n)):
            assert re.search(r"--%s(\s|=|$)" % re.escape(name), help_text, re.M), (
                "%s sets %s, which tidelog --help does not list" % (node_config(n), name)
            )


def test_script_help_and_usage_errors(tmp_path):
    r = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for word in ("start", "stop", "status", "kill N", "start-node N", "stop-node N", "--dir", "--shards",
                 "--release", "--debug", "--build", "--port", "--controller-port", "--metrics-port",
                 "--timeout", "TIDELOG_BIN", "9092/9093/9094", "9192/9193/9194", "9644/9645/9646"):
        assert word in r.stdout, "scripts/cluster --help does not mention %r" % word
    for args, message in [
        (["kill"], "node number"),
        (["kill", "4"], "node number"),
        (["frobnicate"], "unknown command"),
        (["start", "--shards", "0"], "--shards"),
        (["start", "--bogus"], "unknown flag"),
        (["stop", "--shards", "2"], "only --dir"),
        (["start", "--shards", "40"], "overlap"),
    ]:
        d = str(tmp_path / "c")
        r = subprocess.run([SCRIPT] + args + ["--dir", d] * (args[0] != "frobnicate"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and message in r.stderr, (args, r.returncode, r.stdout, r.stderr)
        assert not os.path.exists(d), "%r created %s" % (args, d)


def test_create_topics_v4_encoding_matches_kafka_python():
    T = CreateTopicsRequest.CreatableTopic
    req = CreateTopicsRequest(
        topics=[
            T(name="a", num_partitions=3, replication_factor=2, assignments=[],
              configs=[T.CreatableTopicConfig(name="retention.ms", value="1000")]),
            T(name="bb", num_partitions=6, replication_factor=3, assignments=[], configs=[]),
        ],
        timeout_ms=1234,
        validate_only=True,
    )
    req.API_VERSION = 4
    req.with_header(correlation_id=42, client_id="tidelog-tests")
    theirs = bytes(req.encode(version=4, header=True, framed=True))
    body = create_topics_body([("a", 3, 2, {"retention.ms": "1000"}), ("bb", 6, 3)], 1234, validate_only=True)
    assert kw.frame(kw.request_header_v1(kw.CREATE_TOPICS, 4, 42) + body) == theirs

    R = CreateTopicsResponse.CreatableTopicResult
    resp = CreateTopicsResponse(throttle_time_ms=0, topics=[R(name="a", error_code=38, error_message="rf"),
                                                           R(name="bb", error_code=0, error_message=None)])
    r = kw.Reader(bytes(resp.encode(version=4)))
    assert parse_create_topics_v4(r) == {"a": (38, "rf"), "bb": (0, None)}
    assert r.remaining() == 0


# --------------------------------------------------------------------------
# 1. the cluster forms


@pytest.mark.parametrize("shards", [1, 2])
def test_cluster_forms(cluster_factory, shards):
    from kafka.admin import KafkaAdminClient

    c = cluster_factory(shards=shards)
    want = c.advertised()
    assert [b[0] for b in want] == sorted(n * 1000 + s for n in NODE_IDS for s in range(shards))
    # Right after every node lists every broker the cluster id must be there
    # too (checked at the end, so the rest runs either way).
    early = {n: md["cluster_id"] for n, md in c.wait_brokers().items()}
    wait_until("every node reports a cluster id",
               lambda: all(c.metadata(n, topics=[])["cluster_id"] for n in NODE_IDS), timeout=30)
    controller = c.controller()
    assert controller % 1000 == 0 and node_of(controller) in NODE_IDS, controller

    # Every shard of every node answers the same: all brokers, one cluster id, one controller.
    answers = {}
    for n in NODE_IDS:
        for port in c.node(n).ports:
            md = metadata(port, topics=[])
            answers[port] = (sorted((b[0], b[1], b[2]) for b in md["brokers"]), md["cluster_id"], md["controller"])
    cluster_id = answers[c.node(1).port][1]
    assert cluster_id and len(cluster_id) >= 16, cluster_id
    assert all(a == (want, cluster_id, controller) for a in answers.values()), answers

    # DescribeCluster through confluent, bootstrapped from each node alone.
    for n in NODE_IDS:
        admin = c.admin([n])
        d = admin.describe_cluster(request_timeout=30).result(30)
        assert d.cluster_id == cluster_id, (n, d.cluster_id)
        assert d.controller.id == controller, (n, d.controller)
        assert sorted((x.id, x.host, x.port) for x in d.nodes) == want, (n, d.nodes)

    # kafka-python's DescribeCluster and Metadata.
    ka = KafkaAdminClient(bootstrap_servers=c.bootstrap)
    try:
        d = ka.describe_cluster()
    finally:
        ka.close()
    assert d["cluster_id"] == cluster_id and d["controller_id"] == controller, d
    assert sorted((x["broker_id"], x["host"], x["port"]) for x in d["brokers"]) == want

    # kcat -L, as scripts/cluster status shows it.
    if shutil.which("kcat"):
        out = subprocess.run(["kcat", "-L", "-b", c.bootstrap, "-m", "10"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        listed = sorted((int(i), h, int(p)) for i, h, p in re.findall(r"broker (\d+) at ([^:\s]+):(\d+)", out.stdout))
        assert listed == want, out.stdout

    assert all(early.values()), (
        "Metadata listed all %d brokers with an empty cluster id (per node: %r); the id %s came later"
        % (len(want), early, cluster_id)
    )


# --------------------------------------------------------------------------
# 2. topic placement


def test_create_topic_rf3_through_one_node(cluster):
    c = cluster
    topic = unique_topic("rf3")
    # Sent to node 2 itself (confluent would send it to the controller).
    answer = create_topics_raw(c.node(2).port, [(topic, 6, 3)])
    assert list(answer) == [topic] and answer[topic][0] == 0, answer
    parts = c.wait_topic(topic, 6)
    for i, p in parts.items():
        assert len(p.replicas) == 3 and sorted(node_of(r) for r in p.replicas) == [1, 2, 3], (i, p)
        assert all(r % 1000 == 0 for r in p.replicas), (i, p)  # one shard per node
        assert p.leader == p.replicas[0], "partition %d: leader %d is not the preferred replica %r" % (i, p.leader, p.replicas)
        assert p.leader in p.isr and set(p.isr) <= set(p.replicas), (i, p)
        assert p.error_code == 0 and p.leader_epoch >= 0, (i, p)
    assert set(leaders_by_node(parts)) == {1, 2, 3}, "leaders not on every node: %r" % leaders_by_node(parts)
    assert len({tuple(p.replicas) for p in parts.values()}) > 1, "every partition has the same replica order"

    # The same placement through confluent's Metadata from each node.
    for n in NODE_IDS:
        md = c.admin([n]).list_topics(topic=topic, timeout=10)
        t = md.topics[topic]
        assert t.error is None
        got = {i: (pm.leader, list(pm.replicas)) for i, pm in t.partitions.items()}
        assert got == {i: (p.leader, p.replicas) for i, p in parts.items()}, (n, got)

    # Again: TOPIC_ALREADY_EXISTS from another node; RF 4 > 3 nodes refused.
    code, _ = create_topics_raw(c.node(3).port, [(topic, 6, 3)])[topic]
    assert code == TOPIC_ALREADY_EXISTS
    rf4 = unique_topic("rf4")
    code, msg = create_topics_raw(c.node(1).port, [(rf4, 6, 4)])[rf4]
    assert code == INVALID_REPLICATION_FACTOR, (code, msg)
    admin = c.admin([2])  # keep the handle alive until the future resolves
    fut = admin.create_topics([NewTopic(rf4, num_partitions=6, replication_factor=4)], operation_timeout=30)[rf4]
    with pytest.raises(KafkaException) as e:
        fut.result(40)
    assert e.value.args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR, e.value
    for n in NODE_IDS:
        md = c.metadata(n, topics=[rf4])
        assert [(t.name, t.error_code) for t in md["topics"]] == [(rf4, UNKNOWN_TOPIC_OR_PARTITION)], (n, md["topics"])


# --------------------------------------------------------------------------
# 3. the RF 1 data path across nodes


def test_rf1_produce_consume_across_nodes(cluster):
    c = cluster
    topic = unique_topic("rf1")
    parts = create_topic(c, topic, 6, 1, nodes=[1])
    assert all(len(p.replicas) == 1 and p.replicas == [p.leader] for p in parts.values()), parts
    assert set(leaders_by_node(parts)) == {1, 2, 3}, "leaders not on every node: %r" % leaders_by_node(parts)

    records = make_records(6000, keys=600)
    acked = produce_confluent(c.node(1), topic, records)  # bootstrap node 1; routes to each leader
    ends = ends_of(c.node(1), topic, 6)
    assert sum(ends.values()) == 6000, ends
    assert all(ends[p] > 0 for p in range(6)), ends

    consumed = consume_confluent(c.node(1), topic, ends, timeout=120)
    check_roundtrip(records, acked, consumed)
    consumed = consume_kafka_python(c.node(3), topic, ends, timeout=120)
    check_roundtrip(records, acked, consumed)

    # Each partition's log is on its leader's disk only, with every record.
    for i, p in parts.items():
        for n in NODE_IDS:
            pdir = os.path.join(c.node(n).log_dirs, "%s-%d" % (topic, i))
            if n == node_of(p.leader):
                count = sum(b.record_count for _, f in kw.segment_files(pdir) for b in kw.parse_segment(f)[0])
                assert count == ends[i], "partition %d on node %d: %d records on disk, high watermark %d" % (i, n, count, ends[i])
            else:
                assert not os.path.exists(pdir), "partition %d (led by node %d) has a dir on node %d" % (i, node_of(p.leader), n)


# --------------------------------------------------------------------------
# 4. restart


def snapshot(c, topics):
    c.cluster_id()
    mds = c.wait_brokers()
    md = mds[c.live[0]]
    placement = {}
    for t in topics:
        parts = topic_partitions(c.metadata(c.live[0], topics=[t]), t)
        placement[t] = {i: p.replicas for i, p in parts.items()}
    ids = {t: describe_topic(c, t)[0] for t in topics}
    assert len(set(ids.values())) == len(topics), ids
    return {
        "cluster_id": md["cluster_id"],
        "brokers": sorted(md["brokers"]),
        "placement": placement,
        "topic_ids": ids,
    }


def topic_config(c, topic, name):
    admin = c.admin()
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res], request_timeout=30)[res].result(30)[name].value


def test_metadata_survives_full_restart(cluster):
    c = cluster
    rf3, rf1 = unique_topic("keep3"), unique_topic("keep1")
    create_topic(c, rf3, 6, 3, config={"retention.ms": "123456789"})
    create_topic(c, rf1, 3, 1)
    records, acked = roundtrip(c, rf1, 3, 600)
    before = snapshot(c, [rf3, rf1])
    assert topic_config(c, rf3, "retention.ms") == "123456789"

    c.stop()  # SIGTERM all three at once; each must exit 0
    c.start()

    after = snapshot(c, [rf3, rf1])
    assert after == before
    c.wait_topic(rf3, 6)
    c.wait_topic(rf1, 3)
    assert topic_config(c, rf3, "retention.ms") == "123456789"
    ends = ends_of(c, rf1, 3)
    consumed = consume_confluent(c.node(3), rf1, ends, timeout=60)
    check_roundtrip(records, acked, consumed)
    # Still taking writes at the right offsets.
    more = produce_confluent(c.node(2), rf1, [(b"after", b"restart")])
    assert more[0][1] == ends[more[0][0]], (more, ends)


def test_nodes_stopped_one_by_one_exit_cleanly(cluster):
    """The last node's controlled shutdown has no quorum: it must still exit 0
    (conftest allows 30 s), and the cluster comes back."""
    c = cluster
    topic = unique_topic("oneby")
    create_topic(c, topic, 3, 1)
    records, acked = roundtrip(c, topic, 3, 300)
    took = {}
    for n in (3, 2, 1):
        took.update(c.stop(n))
        if len(c.live) >= 2:
            # A clean stop fences the node through the log at once (no
            # session timeout). A lone node cannot learn that commit, so
            # only while two run.
            c.wait_brokers(via=c.live, timeout=30)
    c.start()
    c.wait_topic(topic, 3)
    consumed = consume_confluent(c.node(1), topic, ends_of(c, topic, 3), timeout=60)
    check_roundtrip(records, acked, consumed)
    print("seconds to exit after SIGTERM: %r" % took)


# --------------------------------------------------------------------------
# 5. one node killed


def test_killed_node_is_fenced_then_rejoins(cluster):
    c = cluster
    rf3, rf1 = unique_topic("f3"), unique_topic("f1")
    create_topic(c, rf3, 6, 3)
    create_topic(c, rf1, 6, 1)
    records, acked = roundtrip(c, rf1, 6, 1200)
    before3 = topic_partitions(c.metadata(1, topics=[rf3]), rf3)
    before1 = topic_partitions(c.metadata(1, topics=[rf1]), rf1)
    victim = node_of(c.controller())  # the quorum leader: election and fencing both
    survivors = [n for n in NODE_IDS if n != victim]

    c.kill9(victim)
    killed_at = time.monotonic()
    c.wait_brokers(via=survivors, nodes=survivors, timeout=30)
    fenced_after = time.monotonic() - killed_at
    assert node_of(c.controller(via=survivors)) in survivors

    # RF 3: the victim's leaderships moved to another ISR member, epoch bumped;
    # other partitions kept their leader.
    after3 = c.wait_topic(rf3, 6, via=survivors, led_by=survivors)
    for i, p in after3.items():
        b = before3[i]
        if node_of(b.leader) == victim:
            assert p.leader in b.isr and node_of(p.leader) != victim, (i, b, p)
            assert p.leader_epoch > b.leader_epoch, "partition %d: leader %d -> %d, epoch %d -> %d" % (
                i, b.leader, p.leader, b.leader_epoch, p.leader_epoch)
        else:
            assert p.leader == b.leader, (i, b, p)
        assert p.replicas == b.replicas, (i, b, p)
    # RF 1: the victim's partitions have no leader; the others keep theirs.
    for n in survivors:
        now1 = topic_partitions(c.metadata(n, topics=[rf1]), rf1)
        for i, p in now1.items():
            if node_of(before1[i].leader) == victim:
                assert p.leader == -1, (n, i, p)
            else:
                assert p.leader == before1[i].leader, (n, i, p)

    # CreateTopics with 2 of 3: placed on the live nodes only.
    t2, t1 = unique_topic("two"), unique_topic("two1")
    parts = create_topic(c, t2, 4, 2, nodes=survivors)
    assert all(sorted(node_of(r) for r in p.replicas) == sorted(survivors) for p in parts.values()), parts
    parts = create_topic(c, t1, 4, 1, nodes=survivors)
    assert {node_of(p.leader) for p in parts.values()} == set(survivors), parts
    produce_confluent(c.node(survivors[0]), t1, [(b"k%d" % i, b"v%d" % i) for i in range(100)])
    assert sum(ends_of(c.node(survivors[1]), t1, 4).values()) == 100
    rf3x = unique_topic("rf3x")
    code, msg = create_topics_raw(c.node(survivors[0]).port, [(rf3x, 1, 3)])[rf3x]
    assert code == INVALID_REPLICATION_FACTOR, "RF 3 with one of 3 nodes fenced: %r" % ((code, msg),)

    # Back: listed everywhere, its RF 1 partitions led again with their data,
    # and it knows what was created while it was away.
    c.start(victim)
    c.wait_brokers(nodes=NODE_IDS, via=NODE_IDS, timeout=30)
    c.wait_topic(rf1, 6)
    c.wait_topic(t2, 4)
    c.wait_topic(t1, 4)
    consumed = consume_confluent(c.node(victim), rf1, ends_of(c, rf1, 6), timeout=60)
    check_roundtrip(records, acked, consumed)
    print("node %d fenced %.1fs after kill -9 (session timeout %d ms)" % (victim, fenced_after, SESSION_TIMEOUT_MS))


# --------------------------------------------------------------------------
# 6. two nodes killed: no quorum


def test_no_quorum_refuses_create_topics(cluster):
    c = cluster
    leader = node_of(c.controller())
    # Keep the quorum leader: it may still take the proposal into its log,
    # but with both followers gone it can never commit it.
    for n in NODE_IDS:
        if n != leader:
            c.kill9(n)
    lost = unique_topic("noquorum")
    t0 = time.monotonic()
    try:
        answer = create_topics_raw(c.node(leader).port, [(lost, 3, 1)], timeout_ms=5000, socket_timeout=60)
    except OSError as e:
        raise AssertionError("CreateTopics with 2 of 3 nodes down: no answer within 60 s (%r)" % e)
    took = time.monotonic() - t0
    code, msg = answer[lost]
    assert code != 0, "CreateTopics succeeded with 2 of 3 controllers down: %r" % (answer,)

    c.start()
    c.wait_brokers(nodes=NODE_IDS, via=NODE_IDS)
    topic = unique_topic("quorumback")
    create_topic(c, topic, 3, 1)
    roundtrip(c, topic, 3, 300)
    print("refused CreateTopics answered in %.1fs (%d: %s)" % (took, code, msg))
    assert msg and "quorum" in msg.lower(), "error %d, message %r (expected one naming the quorum)" % (code, msg)
    # As in Kafka, REQUEST_TIMED_OUT leaves the change in doubt: the leader
    # took it into its log and may commit it once the followers are back.
    # What must hold: every node then agrees on whether it exists, and on
    # its partitions if it does.
    def agree():
        views = [topic_partitions(c.metadata(n, topics=[lost]), lost) for n in NODE_IDS]
        return all(v == views[0] for v in views)

    wait_until("every node agrees on whether %s exists" % lost, agree, timeout=30)


# --------------------------------------------------------------------------
# 7. duplicate node.id


def test_duplicate_node_id_refused(cluster):
    c = cluster
    cluster_id = c.cluster_id()
    want = c.advertised()
    # Broker-only, so the impostor never takes part in elections.
    imp = c.extra_node(2, roles="broker")
    rc, out = imp.run_to_exit(timeout=60)
    assert rc is not None and rc > 0, "duplicate node.id 2: exit %r\n%s" % (rc, out)
    assert "already registered" in out, out

    # Undisturbed: node 2 keeps its registration (its heartbeats still
    # count past a session timeout), the controller stays, data flows.
    assert c.live == list(NODE_IDS)
    time.sleep(SESSION_TIMEOUT_MS / 1000 * 1.5)
    after = c.wait_brokers(timeout=10)
    for n in NODE_IDS:
        assert sorted((b[0], b[1], b[2]) for b in after[n]["brokers"]) == want
        assert after[n]["cluster_id"] == cluster_id
    topic = unique_topic("dup")
    parts = create_topic(c, topic, 3, 1)
    assert set(leaders_by_node(parts)) == {1, 2, 3}
    roundtrip(c, topic, 3, 300, via=2)
    # Checked last so that the rest runs either way: a refused process never
    # said it was ready (nor served as broker 2000 meanwhile).
    ready = [l for l in out.splitlines() if "tidelog ready" in l]
    assert not ready, "the refused duplicate logged %r before exiting" % ready


# --------------------------------------------------------------------------
# 8. config errors


VOTERS_ERRORS = [
    "1@127.0.0.1",  # no port
    "1-127.0.0.1:9192",  # no @
    "one@127.0.0.1:9192",  # id not a number
    "1@127.0.0.1:9192,1@127.0.0.1:9193",  # id twice
    "1@127.0.0.1:99999",  # port out of range
    "",  # none, for a controller
]


def refused(node, *words):
    rc, out = node.run_to_exit(timeout=30)
    assert rc is not None and rc > 0, "expected a refused start, got exit %r\n%s" % (rc, out)
    assert "tidelog ready" not in out, out
    assert "panicked" not in out, out
    for w in words:
        assert w in out, "message does not name %r:\n%s" % (w, out)
    return out


@pytest.mark.parametrize("voters", VOTERS_ERRORS)
def test_bad_controller_quorum_voters_refused(cluster_factory, voters):
    c = cluster_factory(start=False)
    node = c.extra_node(1, controller=True, args=["--controller.quorum.voters=%s" % voters])
    refused(node, "controller.quorum.voters")


def test_controller_not_in_voters_refused(cluster_factory):
    c = cluster_factory(start=False)
    node = c.extra_node(4, config_from=1, roles="broker,controller", controller=True)
    refused(node, "controller.quorum.voters", "4")


@pytest.mark.parametrize("setting,value", [("process.roles", "broker,bogus"), ("node.id", "1000"), ("node.id", "-1")])
def test_bad_node_settings_refused(cluster_factory, setting, value):
    c = cluster_factory(start=False)
    node = c.extra_node(1, controller=True, args=["--%s=%s" % (setting, value)])
    refused(node, setting)


# --------------------------------------------------------------------------
# scripts/cluster against the real broker


class _LogFile:
    """Lets conftest's report hook attach a script-started node's log."""

    def __init__(self, path):
        self.log_path = path

    def log_tail(self, lines=80):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            text = []
        return "----- %s (last %d lines) -----\n%s" % (self.log_path, lines, "\n".join(text[-lines:]))


def test_script_start_status_kill_start_node_stop(request, binary, data_root):
    require_cluster_mode(binary)
    d = os.path.join(data_root, "script-%s" % uuid.uuid4().hex[:8])
    port, cport, mport = pick_ports(3), pick_ports(3), pick_ports(3)
    env = dict(os.environ, TIDELOG_BIN=binary)
    logs = [_LogFile(os.path.join(d, "node-%d.log" % n)) for n in NODE_IDS]
    request.node.__dict__.setdefault("_tidelog_brokers", []).extend(logs)

    def run(*args, extra=(), timeout=120):
        cmd = [SCRIPT] + list(args) + ["--dir", d] + (["--"] + list(extra) if extra else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        return r.returncode, r.stdout + r.stderr

    try:
        rc, out = run("start", "--port", str(port), "--controller-port", str(cport), "--metrics-port", str(mport),
                      extra=["--broker.session.timeout.ms=3000", "--broker.heartbeat.interval.ms=500"])
        assert rc == 0 and "cluster formed" in out, out
        want = sorted((n * 1000, "127.0.0.1", port + n - 1) for n in NODE_IDS)
        for n in NODE_IDS:
            md = metadata(port + n - 1, topics=[])
            assert sorted((b[0], b[1], b[2]) for b in md["brokers"]) == want, (n, md)
        rc, out = run("status")
        assert rc == 0 and out.count(": running, pid") == 3, out
        rc, out = run("kill", "2")
        assert rc == 0, out
        rc, out = run("status")
        assert rc != 0 and "node 2: not running" in out, out
        rc, out = run("start-node", "2")
        assert rc == 0 and "cluster formed" in out, out
        rc, out = run("status")
        assert rc == 0, out
        rc, out = run("stop")
        assert rc == 0 and len(re.findall(r"^node \d: exited", out, re.M)) == 3, out
        assert not any(os.path.exists(os.path.join(d, "node-%d.pid" % n)) for n in NODE_IDS)
    finally:
        # Whatever happened, no node outlives the test.
        for n in NODE_IDS:
            try:
                with open(os.path.join(d, "node-%d.pid" % n)) as f:
                    pid = int(f.read().strip())
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if ("--log.dirs=%s/node-%d" % (d, n)).encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
    for log in logs:
        assert "panicked at" not in log.log_tail(100000), log.log_tail()
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# stage 2: replication


def produce_in_background(target, topic, n, **extra):
    """Thread producing `n` keyed acks=all records with retries; returns
    (thread, acked list, errors list, records)."""
    records = make_records(n, keys=50)
    acked, errors = [], []

    def run():
        cfg = target.producer_config(**{"linger.ms": 5, "message.timeout.ms": 30000, "retries": 1000000,
                                        "retry.backoff.ms": 100, "max.in.flight.requests.per.connection": 1})
        cfg.update(extra)
        p = Producer(cfg)

        def cb(err, msg):
            if err is not None:
                errors.append(err)
            else:
                acked.append((msg.partition(), msg.offset(), msg.key(), msg.value()))

        for k, v in records:
            while True:
                try:
                    p.produce(topic, key=k, value=v, on_delivery=cb)
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
            time.sleep(0.001)
        p.flush(90)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, acked, errors, records


def test_acks_all_rf3_leader_kill_loses_no_acked_record(cluster):
    c = cluster
    topic = unique_topic("repl")
    create_topic(c, topic, 3, 3, config={"min.insync.replicas": "2"})
    parts = c.wait_topic(topic, 3)
    t, acked, errors, records = produce_in_background(c, topic, 3000)
    wait_until("1000 acks before the kill", lambda: len(acked) >= 1000 or errors, timeout=30)
    assert not errors, "delivery errors before the kill: %r" % errors[:3]
    victim = node_of(parts[0].leader)
    c.kill9(victim)
    t.join(120)
    assert not t.is_alive(), "producer still running"
    assert not errors, "delivery errors (%d) after the leader kill, first %r" % (len(errors), errors[:3])
    assert len(acked) == len(records)
    survivors = [n for n in NODE_IDS if n != victim]
    c.wait_topic(topic, 3, via=survivors, led_by=survivors)
    ends = ends_of(c.node(survivors[0]), topic, 3)
    consumed = consume_confluent(c.node(survivors[0]), topic, ends, timeout=60)
    check_contiguous(consumed)
    by_pos = {(p, o): (k, v) for p, recs in consumed.items() for o, k, v in recs}
    lost = [(p, o) for p, o, k, v in acked if by_pos.get((p, o)) != (k, v)]
    assert not lost, "%d acked records lost or moved, first %r" % (len(lost), lost[:5])
    # Per key, what was consumed is in produce order (retries may duplicate, never reorder).
    seen = collections.defaultdict(list)
    for p in sorted(consumed):
        for _, k, v in consumed[p]:
            seen[k].append(v)
    for k, vs in seen.items():
        firsts = list(dict.fromkeys(vs))
        want = [v for kk, v in records if kk == k]
        assert firsts == want[: len(firsts)], "key %r reordered" % k
    c.start(victim)
    c.wait_topic(topic, 3)


def test_isr_shrinks_and_grows_back(cluster):
    c = cluster
    topic = unique_topic("isr")
    create_topic(c, topic, 3, 3, config={"min.insync.replicas": "2"})
    fail_fast = {"message.timeout.ms": 20000}
    produce_confluent(c, topic, make_records(300), **fail_fast)
    parts = c.wait_topic(topic, 3)
    assert all(sorted(p.isr) == sorted(p.replicas) for p in parts.values()), parts
    leader = node_of(c.controller())
    follower = next(n for n in NODE_IDS if n != leader)
    c.kill9(follower)
    survivors = [n for n in NODE_IDS if n != follower]

    def shrunk():
        ps = topic_partitions(c.metadata(survivors[0], topics=[topic]), topic)
        return all(len(p.isr) == 2 and all(node_of(r) != follower for r in p.isr) for p in ps.values())

    wait_until("ISR without node %d" % follower, shrunk, timeout=45)
    produce_confluent(c.node(survivors[0]), topic, [(b"k%d" % i, b"two-of-three-%d" % i) for i in range(300)], **fail_fast)
    c.start(follower)

    def grown():
        ps = topic_partitions(c.metadata(follower, topics=[topic]), topic)
        return all(sorted(p.isr) == sorted(p.replicas) for p in ps.values())

    wait_until("ISR back to 3", grown, timeout=45)
