"""Cold fetches are isolated from everything else a shard does.

Cold Fetch responses (read from segment files, e.g. everything after a
restart) go out on each shard's own send threads (`fetch.sendfile.threads`),
at most that many per shard at once, the rest waiting their turn. Those
threads are not the ones that roll segments or write checkpoints, and hot
(cached) responses are sent by the shard itself, so:

- one consumer can read a hundred cold partitions at once, in both clients,
  every byte by sendfile;
- consumers that stop reading their sockets hold every send thread, yet
  producers (acks=all, across many segment rolls), hot reads and
  ListOffsets/Metadata go on, and the threads come back once those sockets
  close;
- fetch.sendfile.max.bytes.per.second is one budget for every shard's send
  threads, and they run at the configured CPU and I/O priority.

Content, order and counts are asserted, plus one lower bound on time that
only pacing can explain (a budget cannot be faster than its rate); deadlines
just keep a broken broker from hanging the run.
"""

import os
import socket
import time
import zlib

from confluent_kafka import Consumer, Producer, TopicPartition

import kafka_wire as kw
from conftest import create_topic, unique_topic
from test_fetch_paths import check_exact, consume_range, fetch_stats, leaders, payload, send


def produce_partitions(broker, topic, partitions, count, size, **extra):
    """`count` records of `size` bytes to every partition of `partitions` with
    ONE producer (seq-major, so all partitions fill at once); values are
    payload(p, seq, size). Asserts every record was acked at offset seq."""
    cfg = {"linger.ms": 5, "batch.size": 256 * 1024}
    cfg.update(extra)
    p = Producer(broker.producer_config(**cfg))
    errors = []
    offsets = {q: [] for q in partitions}

    def delivered(err, msg):
        if err:
            errors.append(err)
        else:
            offsets[msg.partition()].append(msg.offset())

    for seq in range(count):
        for q in partitions:
            send(p, topic, q, payload(q, seq, size), delivered)
    assert p.flush(120) == 0
    assert not errors, errors[:3]
    for q in partitions:
        assert sorted(offsets[q]) == list(range(count)), "partition %d acked offsets" % q


# --------------------------------------------------------------------------
# 1. a hundred cold partitions in one consumer


def test_hundred_partitions_cold_in_one_consumer(broker):
    topic = unique_topic("wide")
    partitions, n, size = 120, 300, 2000
    create_topic(broker, topic, partitions)
    produce_partitions(broker, topic, range(partitions), n, size)
    broker.restart()  # empties the recent-batch cache: all 120 partitions are cold

    got = consume_range(broker, topic, {p: 0 for p in range(partitions)}, {p: n for p in range(partitions)})
    for p in range(partitions):
        check_exact(got, p, 0, 0, n, size)

    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    kc = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=5000)
    seen = {p: [] for p in range(partitions)}
    try:
        tps = [KTP(topic, p) for p in range(partitions)]
        kc.assign(tps)
        for tp in tps:
            kc.seek(tp, 0)
        deadline = time.monotonic() + 180
        while any(len(v) < n for v in seen.values()) and time.monotonic() < deadline:
            for tp, msgs in kc.poll(timeout_ms=1000).items():
                seen[tp.partition].extend((m.offset, zlib.crc32(m.value)) for m in msgs)
    finally:
        kc.close()
    for p in range(partitions):
        assert [o for o, _ in seen[p]] == list(range(n)), "kafka-python partition %d offsets" % p
        assert [c for _, c in seen[p]] == [zlib.crc32(payload(p, s, size)) for s in range(n)], (
            "kafka-python partition %d content" % p
        )

    assert broker.stop() == 0
    stats = fetch_stats(broker)
    assert set(stats) == set(range(broker.shards)), broker.log_tail()
    memory = sum(s[0] for s in stats.values())
    sendfile = sum(s[1] for s in stats.values())
    data = partitions * n * size
    assert memory == 0, "cold data must not be served from user-space buffers: %r" % stats
    # Both consumers received every value, and nothing went from memory.
    assert sendfile >= 2 * data, "both consumers' bytes went out by sendfile: %r < %d" % (stats, 2 * data)


# --------------------------------------------------------------------------
# 2. stalled cold readers


STALL_BYTES = 32 << 20  # far more than any socket buffer on either side
STALLS_PER_SHARD = 3  # with one send thread: 1 in flight, 2 waiting


def open_stalled_fetch(port, topic, partition, correlation_id):
    """A raw connection with a tiny receive buffer that asks for STALL_BYTES
    of `partition` from offset 0 and then never reads."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window from the SYN on
        s.settimeout(15)
        s.connect(("127.0.0.1", port))
        body = kw.fetch_body_v4([(topic, [(partition, 0, STALL_BYTES)])], max_wait_ms=500, min_bytes=1, max_bytes=STALL_BYTES)
        s.sendall(kw.frame(kw.request_header_v1(kw.FETCH, 4, correlation_id) + body))
        s.setblocking(False)  # for peek(): never wait on it
    except BaseException:
        s.close()
        raise
    return s


def peek(sock):
    """Bytes waiting in the socket's receive buffer, left there (the window stays shut)."""
    try:
        return sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""


def parse_fetch_v4_prefix(data):
    """(correlation id, topic, partition, error, high watermark, records bytes)
    from the start of a one-topic one-partition Fetch v4 response frame, or
    None while fewer bytes than that have arrived."""
    try:
        r = kw.Reader(data)
        frame_len = r.i32()
        corr = r.i32()
        r.i32()  # throttle_time_ms
        assert r.i32() == 1, "topics"
        topic = r.string()
        assert r.i32() == 1, "partitions"
        partition, error, hw = r.i32(), r.i16(), r.i64()
        r.i64()  # last_stable_offset
        aborted = r.i32()
        assert aborted <= 0, "aborted transactions %d" % aborted
        records = r.i32()
    except ValueError:
        return None
    return {"frame": frame_len, "corr": corr, "topic": topic, "partition": partition, "error": error, "hw": hw, "records": records}


def in_flight(stalled):
    """{shard: [index of each stalled socket that has received bytes]}."""
    return {shard: [i for i, (s, _) in enumerate(socks) if peek(s)] for shard, socks in stalled.items()}


def test_stalled_cold_readers_do_not_stall_producers_or_hot_reads(broker_factory):
    broker = broker_factory(args=["--fetch.sendfile.threads=1", "--log.segment.bytes=1048576"])
    shards = list(range(broker.shards))

    # Topic A: the cold backlog. Its own segment.bytes keeps each partition in
    # one segment, so a cold read is one 32 MiB file region (a cold read never
    # spans segments, and 1 MiB would fit in the socket buffers).
    backlog = unique_topic("backlog")
    a_n, a_size = 4000, 10000
    create_topic(broker, backlog, len(shards), config={"segment.bytes": str(64 << 20)})
    a_owner = leaders(broker, backlog)
    owned = {shard: [p for p, o in sorted(a_owner.items()) if o == shard] for shard in shards}
    assert all(owned.values()), "every shard leads a backlog partition: %r" % a_owner
    produce_partitions(broker, backlog, sorted(a_owner), a_n, a_size)
    broker.restart()  # the whole backlog is cold now

    hot = unique_topic("hot")
    b_n, b_size = 3000, 1000  # per partition: ~3 MiB, several 1 MiB segments each
    stalled = {shard: [] for shard in shards}
    try:
        corr = 100
        for shard in shards:
            for _ in range(STALLS_PER_SHARD):
                corr += 1
                s = open_stalled_fetch(broker.ports[shard], backlog, owned[shard][0], corr)
                stalled[shard].append((s, corr))

        # The premise: on every shard one response has started (a full-size
        # cold response, error-free) and is stuck on its unread socket.
        deadline = time.monotonic() + 60
        while not all(in_flight(stalled).values()):
            assert time.monotonic() < deadline, "no stalled response started: %r" % in_flight(stalled)
            time.sleep(0.05)
        started = in_flight(stalled)
        for shard in shards:
            assert len(started[shard]) == 1, "one send thread, one response in flight: %r" % started
            s, c = stalled[shard][started[shard][0]]
            deadline = time.monotonic() + 30
            while (head := parse_fetch_v4_prefix(peek(s))) is None:
                assert time.monotonic() < deadline, "response header incomplete: %r" % peek(s)
                time.sleep(0.05)
            assert head["corr"] == c and head["topic"] == backlog, head
            assert head["partition"] == owned[shard][0] and head["error"] == kw.NONE, head
            assert head["hw"] == a_n, head
            assert 8 << 20 < head["records"] <= STALL_BYTES, head

        # (a) acks=all producer to a new topic, across many segment rolls.
        create_topic(broker, hot, len(shards))
        b_owner = leaders(broker, hot)
        assert sorted(b_owner.values()) == shards, "one hot partition per shard: %r" % b_owner
        produce_partitions(broker, hot, sorted(b_owner), b_n, b_size)
        for p in b_owner:
            segs = kw.segment_files(os.path.join(broker.log_dirs, "%s-%d" % (hot, p)))
            assert len(segs) >= 3, "partition %d rolled its 1 MiB segments: %r" % (p, segs)

        # (b) hot reads from offset 0, all of it, exactly.
        got = consume_range(broker, hot, {p: 0 for p in b_owner}, {p: b_n for p in b_owner}, timeout=120)
        for p in b_owner:
            check_exact(got, p, 0, 0, b_n, b_size)

        # (c) ListOffsets and Metadata answer on both shards.
        c = Consumer(broker.consumer_config())
        try:
            for p in b_owner:
                assert c.get_watermark_offsets(TopicPartition(hot, p), timeout=15) == (0, b_n), p
            for p in a_owner:
                assert c.get_watermark_offsets(TopicPartition(backlog, p), timeout=15) == (0, a_n), p
            md = c.list_topics(timeout=15)
            assert {q: t.leader for q, t in md.topics[backlog].partitions.items()} == a_owner
            assert {q: t.leader for q, t in md.topics[hot].partitions.items()} == b_owner
        finally:
            c.close()

        # All of the above happened while the send threads were held: still
        # the same single response in flight per shard, the others waiting
        # (a second one started would mean the first gave up on its stall
        # timeout, i.e. something above waited for a send thread).
        assert in_flight(stalled) == started, "send threads were held throughout: %r -> %r" % (started, in_flight(stalled))
    finally:
        for socks in stalled.values():
            for s, _ in socks:
                s.close()

    # The send threads come back: the whole backlog, cold, exactly.
    got = consume_range(broker, backlog, {p: 0 for p in a_owner}, {p: a_n for p in a_owner})
    for p in a_owner:
        check_exact(got, p, 0, 0, a_n, a_size)

    assert broker.stop() == 0
    stats = fetch_stats(broker)
    assert set(stats) == set(shards), broker.log_tail()
    for p, shard in b_owner.items():
        assert stats[shard][0] >= b_n * b_size, "hot partition %d went out from memory: %r" % (p, stats)
    sendfile = sum(s[1] for s in stats.values())
    assert sendfile >= len(a_owner) * a_n * a_size, "the backlog went out by sendfile: %r" % stats


# --------------------------------------------------------------------------
# 3. a byte budget for cold sends


def test_sendfile_budget_paces_cold_reads_broker_wide(broker_factory):
    """fetch.sendfile.max.bytes.per.second is one budget for all shards: a
    cold read of both shards' partitions takes at least bytes / rate, the
    waiting shows in /metrics, and every record still arrives exactly."""
    from conftest import pick_ports
    from test_metrics import scrape, total

    rate = 2 << 20
    port = pick_ports(1)
    b = broker_factory(args=["--fetch.sendfile.max.bytes.per.second=%d" % rate, "--metrics.listeners=127.0.0.1:%d" % port])
    topic = unique_topic("paced")
    create_topic(b, topic, 2)
    owners = leaders(b, topic)
    assert len(set(owners.values())) == 2, "one partition per shard, so both shards' threads share the budget: %r" % owners
    n, size = 800, 4000
    produce_partitions(b, topic, [0, 1], n, size)
    b.restart()  # everything is cold now

    t = time.monotonic()
    got = consume_range(b, topic, {0: 0, 1: 0}, {0: n, 1: n})
    took = time.monotonic() - t
    for p in (0, 1):
        check_exact(got, p, 0, 0, n, size)
    data = 2 * n * size
    # Each shard's bucket may start with one 128 KiB burst and each send
    # thread may finish one chunk without sleeping it off: allow 1 MiB.
    floor = (data - (1 << 20)) / rate
    assert took >= floor, "cold read of %d bytes at %d B/s took %.2f s (< %.2f s): not paced" % (data, rate, took, floor)
    _, text = scrape(port)
    assert total(text, "tidelog_fetch_response_bytes_total", path="memory") == 0
    assert total(text, "tidelog_fetch_response_bytes_total", path="sendfile") >= data
    assert total(text, "tidelog_fetch_sendfile_throttle_seconds_total") > 0.5, text[-2000:]


# A producer that writes 100 bytes every 5 ms to partition 0 of argv[2] until killed.
WRITER = """
import sys
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": sys.argv[1], "linger.ms": 2, "log_level": 3})
while True:
    p.produce(sys.argv[2], b"x" * 100, partition=0)
    p.poll(0.005)
"""


def test_cold_sends_yield_to_writes_only_while_the_log_is_written(broker_factory):
    """fetch.sendfile.writing.max.bytes.per.second limits cold sends only
    while some shard is flushing produced data: the same cold read runs
    unthrottled on a quiet broker and at the writing rate next to a
    producer, and /metrics shows which limit is in force."""
    import subprocess
    import sys

    from conftest import pick_ports
    from test_metrics import scrape, total

    rate = 2 << 20
    port = pick_ports(1)
    b = broker_factory(
        args=["--fetch.sendfile.writing.max.bytes.per.second=%d" % rate, "--metrics.listeners=127.0.0.1:%d" % port]
    )
    topic, busy = unique_topic("yield"), unique_topic("yield-writer")
    create_topic(b, topic, 2)
    create_topic(b, busy, 1)
    n, size = 800, 4000
    data = 2 * n * size
    produce_partitions(b, topic, [0, 1], n, size)

    def read():
        t = time.monotonic()
        got = consume_range(b, topic, {0: 0, 1: 0}, {0: n, 1: n})
        took = time.monotonic() - t
        for p in (0, 1):
            check_exact(got, p, 0, 0, n, size)
        return took

    # Quiet broker: no limit in force, nothing waits on the budget.
    b.restart()  # everything is cold now
    took_quiet = read()
    _, text = scrape(port)
    assert total(text, "tidelog_fetch_sendfile_limit_bytes_per_second") == 0, text[-1500:]
    assert total(text, "tidelog_fetch_sendfile_throttle_seconds_total") == 0
    assert total(text, "tidelog_fetch_response_bytes_total", path="sendfile") >= data

    # The same cold read while a producer writes another topic all along. It
    # is its own process, so nothing in this one (the GIL) can pause it for
    # longer than the broker's 100 ms window.
    b.restart()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, b.bootstrap, busy])
    try:
        deadline = time.monotonic() + 30
        while total(scrape(port)[1], "tidelog_produce_bytes_total", topic=busy) < 2000:
            assert writer.poll() is None, "the writer exited with %r" % writer.returncode
            assert time.monotonic() < deadline, "the writer got nothing acked in 30 s"
            time.sleep(0.05)
        took_writing = read()
        _, text = scrape(port)
        assert writer.poll() is None, "the writer exited with %r" % writer.returncode
    finally:
        writer.kill()
        writer.wait()
    # Both shards report the broker-wide limit.
    assert total(text, "tidelog_fetch_sendfile_limit_bytes_per_second") == 2 * rate, text[-1500:]
    floor = (data - (1 << 20)) / rate
    assert took_writing >= floor, "cold read of %d bytes next to a writer took %.2f s (< %.2f s): not limited" % (
        data,
        took_writing,
        floor,
    )
    assert took_quiet < took_writing / 2, "quiet read %.2f s vs %.2f s while writing" % (took_quiet, took_writing)
    _, text = scrape(port)
    assert total(text, "tidelog_fetch_sendfile_throttle_seconds_total") > 0.5, text[-1500:]


# --------------------------------------------------------------------------
# 4. the send threads' CPU and I/O priority


def send_threads(broker):
    """{thread name: tid} of the broker's send threads."""
    pid = broker.proc.pid
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
            name = f.read().strip()
        if "-send-" in name:
            out[name] = int(tid)
    return out


def io_priority(tid):
    import subprocess

    return subprocess.run(["ionice", "-p", str(tid)], capture_output=True, text=True, check=True).stdout.strip()


def test_send_threads_run_at_the_configured_priority(broker_factory):
    b = broker_factory(args=["--fetch.sendfile.threads=3"])
    threads = send_threads(b)
    assert sorted(threads) == ["shard-%d-send-%d" % (s, k) for s in (0, 1) for k in range(3)], threads
    for name, tid in threads.items():
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE, "%s is not SCHED_IDLE" % name
        assert io_priority(tid) == "idle", "%s: ionice says %r" % (name, io_priority(tid))
    b.stop()

    b = broker_factory(args=["--fetch.sendfile.priority=low", "--fetch.sendfile.threads=1"])
    threads = send_threads(b)
    assert len(threads) == 2, threads
    for name, tid in threads.items():
        assert os.sched_getscheduler(tid) == os.SCHED_OTHER, name
        assert os.getpriority(os.PRIO_PROCESS, tid) == 10, "%s: nice %d" % (name, os.getpriority(os.PRIO_PROCESS, tid))
        assert io_priority(tid) == "best-effort: prio 7", "%s: ionice says %r" % (name, io_priority(tid))
