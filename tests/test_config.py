"""Settings from flags (`--name=value` and `--name value`), environment
(`TIDELOG_NAME`) and a server.properties file, later wins; one data dir per
broker (lock file); produce with acks 0, 1 and -1."""

import os
import subprocess
import time

from confluent_kafka import Producer

from clients import check_contiguous, consume_confluent, produce_confluent, watermarks
from conftest import Broker, create_topic, pick_ports, unique_topic, wait_topic


def auto_created_partitions(broker):
    topic = unique_topic("auto")
    produce_confluent(broker, topic, [(b"k", b"v")])
    deadline = time.monotonic() + 30
    while True:
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_space_separated_flags_and_env(broker_factory):
    # `--name value` form for the flag, num.partitions from the environment.
    b = broker_factory(start=False, env={"TIDELOG_NUM_PARTITIONS": "4"})
    b.command = lambda: [b.binary, "--log.dirs", b.log_dirs, "--listeners", "PLAINTEXT://127.0.0.1:%d" % b.port, "--num.shards", "2"]
    b.start()
    assert auto_created_partitions(b) == 4


def test_config_file_then_env_then_flags(broker_factory, tmp_path):
    props = tmp_path / "server.properties"
    props.write_text("# tidelog test\nnum.partitions=5\nauto.create.topics.enable=true\nmessage.max.bytes=50000\n")
    # file says 5 partitions, env says 2, flag says 3: the flag wins.
    b = broker_factory(args=["--config", str(props), "--num.partitions=3"], env={"TIDELOG_NUM_PARTITIONS": "2"})
    assert auto_created_partitions(b) == 3
    b2 = broker_factory(args=["--config=%s" % props], env={"TIDELOG_NUM_PARTITIONS": "2"})
    assert auto_created_partitions(b2) == 2
    b3 = broker_factory(args=["--config=%s" % props])
    assert auto_created_partitions(b3) == 5
    # message.max.bytes from the file is enforced.
    topic = unique_topic("cfgmax")
    create_topic(b3, topic, 1)
    errs = []
    p = Producer(b3.producer_config(**{"message.max.bytes": 1_000_000, "retries": 0}))
    p.produce(topic, value=b"x" * 60_000, on_delivery=lambda e, m: errs.append(e))
    assert p.flush(30) == 0
    assert len(errs) == 1 and errs[0] is not None and errs[0].code() == 10, errs


def test_second_broker_on_same_data_dir_refused(broker):
    other = Broker(broker.binary, broker.data_dir + "-second", log_dirs=broker.log_dirs)
    r = subprocess.run(other.command(), capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode > 0, "second broker on %s: exit %r\n%s" % (broker.log_dirs, r.returncode, out)
    assert "lock" in out.lower(), out
    assert b"tidelog ready" not in r.stdout + r.stderr
    # The first broker is untouched.
    topic = unique_topic("lock")
    create_topic(broker, topic, 1)
    assert produce_confluent(broker, topic, [(b"k", b"v")]) == [(0, 0, b"k", b"v")]


def test_acks_0_1_all(broker):
    topic = unique_topic("acks")
    create_topic(broker, topic, 2)
    everything = []
    for acks in ("1", "all", "0"):
        recs = [(b"k%d" % (i % 10), b"acks-%s-%d" % (acks.encode(), i)) for i in range(2000)]
        acked = produce_confluent(broker, topic, recs, acks=acks)
        if acks != "0":
            # acks=0: no response, so librdkafka reports offset -1 (unknown).
            assert all(o >= 0 for _, o, _, _ in acked)
        everything += recs
    deadline = time.monotonic() + 30
    while True:
        ends = {p: hi for p, (_, hi) in watermarks(broker, topic, [0, 1]).items()}
        if sum(ends.values()) >= len(everything) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(ends.values()) == len(everything), ends
    got = consume_confluent(broker, topic, ends)
    check_contiguous(got)
    assert sorted((k, v) for r in got.values() for _, k, v in r) == sorted(everything)


def test_bad_broker_default_of_a_topic_config_is_refused(broker_factory):
    """log.retention.ms, log.message.timestamp.after.max.ms, ... are checked
    at start as a topic's own value would be, not silently replaced by the
    built-in default."""
    import subprocess

    for flag, name in (
        ("--log.message.timestamp.after.max.ms=soon", "log.message.timestamp.after.max.ms"),
        ("--log.retention.ms=-5", "log.retention.ms"),
        ("--log.cleanup.policy=shred", "log.cleanup.policy"),
    ):
        b = broker_factory(start=False, args=[flag])
        r = subprocess.run(b.command(), capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, flag
        assert name in r.stdout + r.stderr, (flag, r.stdout + r.stderr)
    # A good value starts.
    b = broker_factory(args=["--log.message.timestamp.after.max.ms=60000"])
    assert b.proc.poll() is None
