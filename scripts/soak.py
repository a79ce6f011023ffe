#!/usr/bin/env python3
"""tidelog soak: a real release broker under mixed load for a while, checked.

Starts `target/release/tidelog` (2 shards) on free ports with a fresh data dir
on a disk file system, then runs together for --duration seconds:

  * tidelog-bench `run --verify --strict`: one paced producer (acks=all) into
    the topic `soak` (6 partitions, 1 MiB segments, retention.ms and
    retention.bytes per partition small enough that time and size retention
    delete sealed segments all the time: see --retention-ms), read by 3 Kafka
    consumer groups of 2 members each (fan-out: every group reads every
    record). The bench checks
    every record (offsets forward, per-producer order, per group every offset
    read exactly once) and every group must read exactly what was acked.
  * a keyed confluent-kafka producer into `soak-compact` (cleanup.policy
    compact, small segments; every 97th record a tombstone); afterwards the
    topic is read back from the start: the last record of every key is the
    last one acked for it (offset and value), offsets and per-key sequences
    only go forward, and compaction must have dropped records.
  * a topic create/delete loop (confluent-kafka AdminClient): create a topic,
    produce a few acks=all records to it, delete it, every --churn-interval s.
    Every call must succeed, and at the end no deleted topic may be listed in
    Metadata or left on disk.
  * a sampler: every --sample-interval s the broker's RSS (/proc/PID/status
    VmRSS), open files (entries of /proc/PID/fd) and threads (Threads) go to
    samples.csv, with records produced and committed per group; one progress
    line per sample on the terminal; samples.svg plots the three series.

Verdict (verdict.json, and printed): PASS only if the bench exits 0 with no
verification finding, the compaction and churn checks hold, retention and
compaction both ran (per the broker's /metrics), the broker never died, never
logged a panic and exits 0 on SIGTERM, and resource use stayed within:

  RSS: end <= 1.25 x median(RSS over the reference window) + 32 MiB
  FDs: end <= max(FDs over the reference window) + 16

where the reference window is the samples from 25% to 50% of --duration (the
first 25% is warm-up: caches, io_uring rings, group state fill up there) and
"end" is the last sample taken while the load still ran. Threads are sampled
and plotted but not judged (io_uring adds and retires iou-wrk worker threads
with load). Exit status 0 on PASS, 1 on FAIL, 2 on a usage or setup error.
"""

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCH_TOPIC = "soak"
BENCH_PARTITIONS = 6
COMPACT_TOPIC = "soak-compact"
COMPACT_PARTITIONS = 2
CHURN_PREFIX = "soak-churn-"
SHARDS = 2

WARMUP_FRACTION = 0.25
REFERENCE_END_FRACTION = 0.50
RSS_FACTOR = 1.25
RSS_SLACK_MIB = 32
FD_SLACK = 16
READBACK_TIMEOUT_S = 60  # the compacted topic's read-back (a few thousand records) takes seconds


def log(msg):
    print(msg, flush=True)


# --------------------------------------------------------------------------
# file systems and ports (as tests/conftest.py does)


def fs_type(path):
    path = os.path.realpath(path)
    best, best_type = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mount_point = parts[4].replace("\\040", " ")
            fstype = parts[parts.index("-") + 1]
            if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(
                best
            ):
                best, best_type = mount_point, fstype
    return best_type


def port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_ports(count):
    """First of `count` consecutive free ports below the ephemeral range."""
    lo, hi = 20000, 32000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            hi = min(hi, int(f.read().split()[0]) - count - 1)
    except OSError:
        pass
    rnd = random.Random()
    for _ in range(1000):
        p = rnd.randrange(lo, hi)
        if all(port_free(q) for q in range(p, p + count)):
            return p
    raise RuntimeError("no %d consecutive free ports" % count)


def port_accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# /proc and /metrics


FD_KINDS = ("socket", "bench_topic", "compact_topic", "churn_topics", "other_data", "other")


def fd_kind(target, data_dir):
    """What an open file of the broker is, for the per-kind FD columns."""
    if target.startswith("socket:"):
        return "socket"
    if target.startswith(data_dir + "/"):
        part = target[len(data_dir) + 1 :].split("/")[0]
        topic = part.rsplit("-", 1)[0]
        if topic == BENCH_TOPIC:
            return "bench_topic"
        if topic == COMPACT_TOPIC:
            return "compact_topic"
        if part.startswith(CHURN_PREFIX):
            return "churn_topics"
        return "other_data"
    return "other"


def proc_sample(pid, data_dir):
    """(rss_kib, fds, threads, {fd kind: count}) of a live process, or None
    once it is gone."""
    try:
        rss = threads = None
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        names = os.listdir("/proc/%d/fd" % pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    kinds = dict.fromkeys(FD_KINDS, 0)
    for n in names:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, n))
        except OSError:
            continue  # closed meanwhile
        kinds[fd_kind(target, data_dir)] += 1
    return rss, len(names), threads, kinds


def scrape(url):
    """Counters summed over shards: {metric name: value}; {} if unreachable."""
    out = {}
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


# --------------------------------------------------------------------------
# broker


class Broker:
    def __init__(self, binary, out_dir, extra_args):
        self.binary = binary
        self.data = os.path.join(out_dir, "data")
        self.log_path = os.path.join(out_dir, "broker.log")
        self.port = pick_ports(SHARDS + 1)
        self.metrics_port = self.port + SHARDS
        self.args = [
            "--log.dirs=%s" % self.data,
            "--listeners=PLAINTEXT://127.0.0.1:%d" % self.port,
            "--num.shards=%d" % SHARDS,
            "--metrics.listeners=127.0.0.1:%d" % self.metrics_port,
            # Retention and compaction look for work every 5 s (defaults: 5 min, 15 s).
            "--log.retention.check.interval.ms=5000",
            "--log.cleaner.backoff.ms=5000",
            "--log.cleaner.min.cleanable.ratio=0.2",
            # A fixed tail-fetch cache (default: 1/8 of memory per shard, up to 1 GiB,
            # which at the soak's rate would still be filling at the end of 30
            # minutes and read as growth): 16 MiB per shard fills during warm-up.
            "--fetch.cache.max.bytes=16777216",
        ] + list(extra_args)
        self.proc = None

    @property
    def bootstrap(self):
        return "127.0.0.1:%d" % self.port

    @property
    def metrics_url(self):
        return "http://127.0.0.1:%d/metrics" % self.metrics_port

    def start(self, timeout=60):
        os.makedirs(self.data, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        logf = open(self.log_path, "ab")
        logf.write(("===== soak: %s %s\n" % (self.binary, " ".join(self.args))).encode())
        logf.flush()
        self.proc = subprocess.Popen(
            [self.binary] + self.args,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("tidelog exited with %s during startup\n%s" % (self.proc.returncode, self.log_tail()))
            if all(port_accepts(self.port + i) for i in range(SHARDS)) and "tidelog ready" in self.log_text():
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tidelog not ready after %ss\n%s" % (timeout, self.log_tail()))
            time.sleep(0.1)
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        while True:
            try:
                if len(admin.list_topics(timeout=5).brokers) == SHARDS:
                    return
            except Exception:  # noqa: BLE001 - retried until the deadline
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("tidelog Metadata not ready after %ss\n%s" % (timeout, self.log_tail()))
            time.sleep(0.2)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM; the exit code, or None if it had to be SIGKILLed."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=60):
        return "----- %s (last %d lines) -----\n%s" % (
            self.log_path,
            lines,
            "\n".join(self.log_text().splitlines()[-lines:]),
        )


def create_topic(bootstrap, name, partitions, config, timeout=30):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)],
        operation_timeout=timeout,
        request_timeout=timeout,
    )[name]
    fut.result(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        t = admin.list_topics(topic=name, timeout=10).topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions and all(
            p.leader >= 0 for p in t.partitions.values()
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("topic %s not ready: %r" % (name, t))
        time.sleep(0.2)


# --------------------------------------------------------------------------
# load: compacted keyed topic


class CompactWriter(threading.Thread):
    """Keyed acks=all writes to the compacted topic at `rate` records/s; every
    97th is a tombstone. Remembers the last acked (offset, value) per key."""

    def __init__(self, bootstrap, rate, keys, stop, idempotent=False):
        super().__init__(name="compact-writer", daemon=True)
        self.bootstrap = bootstrap
        self.idempotent = idempotent
        self.rate = rate
        self.keys = keys
        self.stop = stop
        self.sent = 0
        self.acked = 0
        self.tombstones = 0
        self.errors = []
        self.last = {}  # key bytes -> (partition, offset, value or None)
        self.lock = threading.Lock()

    def on_delivery(self, err, msg):
        if err is not None:
            self.errors.append("compacted produce: %s" % err)
            return
        with self.lock:
            self.acked += 1
            k = msg.key()
            prev = self.last.get(k)
            if prev is None or msg.offset() > prev[1]:
                self.last[k] = (msg.partition(), msg.offset(), msg.value())

    def run(self):
        from confluent_kafka import Producer

        try:
            p = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "acks": "all",
                    "enable.idempotence": self.idempotent,
                    "linger.ms": 5,
                    "log_level": 3,
                }
            )
            rnd = random.Random(7)
            seq = 0
            t0 = time.monotonic()
            while not self.stop.is_set():
                due = int((time.monotonic() - t0) * self.rate)
                while seq < due and not self.stop.is_set():
                    key = b"key-%04d" % rnd.randrange(self.keys)
                    seq += 1
                    if seq % 97 == 0:
                        value = None
                        self.tombstones += 1
                    else:
                        value = b"%s seq=%09d " % (key, seq) + b"v" * 120
                    while True:
                        try:
                            p.produce(COMPACT_TOPIC, key=key, value=value, on_delivery=self.on_delivery)
                            break
                        except BufferError:
                            p.poll(0.05)
                    self.sent += 1
                p.poll(0.02)
            left = p.flush(60)
            if left:
                self.errors.append("compacted produce: %d records not delivered within 60 s of the end" % left)
        except Exception as e:  # noqa: BLE001 - reported in the verdict
            self.errors.append("compacted writer: %r" % (e,))


def raw_fetch_probe(bootstrap, topic, partition, offset):
    """What the partition's leader answers a plain Fetch v4 at `offset`: a
    summary for a failure message (error code, high watermark, bytes, batches
    and the first batch's base offset and record count)."""
    import struct

    sys.path.insert(0, os.path.join(REPO, "tests"))
    try:
        import kafka_wire as kw
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3}).list_topics(topic=topic, timeout=10)
        leader = md.topics[topic].partitions[partition].leader
        port = int(md.brokers[leader].port)
        with kw.Conn(port) as conn:
            body = kw.fetch_body_v4([(topic, [(partition, offset, 1 << 20)])], max_wait_ms=0, min_bytes=0)
            r = conn.recv_response(conn.send_request(1, 4, body))
            r.i32()
            r.i32()
            r.string()
            r.i32()
            r.i32()
            err, hw = r.i16(), r.i64()
            r.i64()
            r.i32()
            rec = r.kbytes() or b""
        batches, first, pos = 0, None, 0
        while pos + 12 <= len(rec):
            base, length = struct.unpack_from(">qi", rec, pos)
            if pos + 12 + length > len(rec):
                break
            if first is None and len(rec) >= pos + 61:
                first = (base, struct.unpack_from(">i", rec, pos + 57)[0])
            batches += 1
            pos += 12 + length
        return {"error": err, "high_watermark": hw, "bytes": len(rec), "batches": batches, "first_batch_base_and_count": first}
    except Exception as e:  # noqa: BLE001 - only for the message
        return repr(e)


def check_compacted(bootstrap, writer, metrics):
    """Reads the compacted topic from the start; returns (facts, problems)."""
    from confluent_kafka import Consumer, TopicPartition

    problems = []
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "soak-compact-check-unused",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    ends = {}
    for part in range(COMPACT_PARTITIONS):
        lo, hi = c.get_watermark_offsets(TopicPartition(COMPACT_TOPIC, part), timeout=10)
        ends[part] = hi
    c.assign([TopicPartition(COMPACT_TOPIC, part, 0) for part in range(COMPACT_PARTITIONS)])
    seen = {}  # key -> (partition, offset, value)
    last_offset = {part: -1 for part in range(COMPACT_PARTITIONS)}
    last_seq = {}
    read = 0
    eof = set()
    deadline = time.monotonic() + READBACK_TIMEOUT_S
    while len(eof) < COMPACT_PARTITIONS:
        if time.monotonic() > deadline:
            try:
                pos = {tp.partition: tp.offset for tp in c.position([TopicPartition(COMPACT_TOPIC, q) for q in ends])}
            except Exception as e:  # noqa: BLE001 - only for the message
                pos = repr(e)
            probes = {}
            if isinstance(pos, dict):
                for q, off in pos.items():
                    if q not in eof:
                        probes[q] = raw_fetch_probe(bootstrap, COMPACT_TOPIC, q, off)
            problems.append(
                "compacted read-back stalled: end offsets %r not reached within %d s; consumer positions %r, last offsets read %r, %d records read; a raw Fetch v4 at each stuck position answered %r"
                % (ends, READBACK_TIMEOUT_S, pos, last_offset, read, probes)
            )
            break
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            if m.error().code() == -191:  # _PARTITION_EOF
                if m.offset() >= ends[m.partition()]:
                    eof.add(m.partition())
                continue
            problems.append("compacted read-back: %s" % m.error())
            break
        read += 1
        part, off, key, value = m.partition(), m.offset(), m.key(), m.value()
        if off <= last_offset[part]:
            problems.append("compacted: partition %d offset %d after %d" % (part, off, last_offset[part]))
        last_offset[part] = off
        if value is not None:
            mm = re.match(rb"(key-\d+) seq=(\d+) ", value)
            if not mm or mm.group(1) != key:
                problems.append("compacted: offset %d/%d value %r does not belong to key %r" % (part, off, value[:40], key))
            else:
                s = int(mm.group(2))
                if s <= last_seq.get(key, -1):
                    problems.append("compacted: key %r sequence %d after %d" % (key, s, last_seq[key]))
                last_seq[key] = s
        seen[key] = (part, off, value)
    c.close()
    with writer.lock:
        last = dict(writer.last)
    missing = [k for k in last if k not in seen]
    wrong = [k for k in last if k in seen and seen[k] != last[k]]
    extra = [k for k in seen if k not in last]
    if missing:
        problems.append("compacted: %d keys acked but absent after compaction, e.g. %r" % (len(missing), missing[:3]))
    if wrong:
        k = wrong[0]
        problems.append(
            "compacted: %d keys' last record is not their last acked one, e.g. %r: read %r, acked %r"
            % (len(wrong), k, seen[k][:2], last[k][:2])
        )
    if extra:
        problems.append("compacted: %d keys never acked were read, e.g. %r" % (len(extra), extra[:3]))
    removed = metrics.get("tidelog_compaction_records_removed_total", 0)
    runs = metrics.get("tidelog_compaction_runs_total", 0)
    if runs <= 0 or removed <= 0:
        problems.append("compaction never ran (compaction runs %d, records removed %d)" % (runs, removed))
    if read >= writer.acked:
        problems.append("compacted: read back %d records of %d acked: nothing was compacted away" % (read, writer.acked))
    facts = {
        "acked": writer.acked,
        "tombstones_sent": writer.tombstones,
        "keys": len(last),
        "read_back": read,
        "compaction_runs": int(runs),
        "compaction_records_removed": int(removed),
    }
    return facts, problems


# --------------------------------------------------------------------------
# load: topic create/delete loop


class Churn(threading.Thread):
    """Create a topic, produce to it, delete it, every `interval` seconds."""

    def __init__(self, bootstrap, interval, stop):
        super().__init__(name="topic-churn", daemon=True)
        self.bootstrap = bootstrap
        self.interval = interval
        self.stop = stop
        self.cycles = 0
        self.errors = []
        self.names = []

    def run(self):
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        n = 0
        while not self.stop.is_set():
            t0 = time.monotonic()
            name = "%s%05d" % (CHURN_PREFIX, n)
            n += 1
            self.names.append(name)
            try:
                create_topic(self.bootstrap, name, 2, {"segment.bytes": "65536"})
                failed = []

                def cb(err, _msg, failed=failed):
                    if err is not None:
                        failed.append(str(err))

                # A producer per cycle, dropped before the delete: a long-lived
                # one keeps the deleted topic in its metadata and asks for it
                # again at its next refresh (5 min), which auto-creates it
                # (auto.create.topics.enable=true, as in Kafka).
                producer = Producer(
                    {
                        "bootstrap.servers": self.bootstrap,
                        "acks": "all",
                        "linger.ms": 0,
                        "allow.auto.create.topics": False,
                        "log_level": 3,
                    }
                )
                for i in range(20):
                    producer.produce(name, key=b"k%d" % i, value=b"churn %d" % i, on_delivery=cb)
                left = producer.flush(30)
                del producer
                if left or failed:
                    raise RuntimeError("%d records undelivered, errors %r" % (left, failed[:3]))
                admin.delete_topics([name], operation_timeout=30, request_timeout=30)[name].result(timeout=30)
                self.cycles += 1
            except Exception as e:  # noqa: BLE001 - reported in the verdict
                self.errors.append("churn %s: %s" % (name, e))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))


def check_churn(broker, churn):
    """No deleted topic in Metadata or on disk (waits up to 30 s for deletion)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    deadline = time.monotonic() + 30
    while True:
        listed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(CHURN_PREFIX)]
        on_disk = []
        for root, dirs, _files in os.walk(broker.data):
            on_disk += [os.path.join(root, d) for d in dirs if CHURN_PREFIX in d]
        if not listed and not on_disk:
            return []
        if time.monotonic() > deadline:
            problems = []
            if listed:
                problems.append("churn: deleted topics still in Metadata: %r" % sorted(listed)[:5])
            if on_disk:
                problems.append("churn: deleted topics' directories still on disk: %r" % sorted(on_disk)[:5])
            return problems
        time.sleep(1)


# --------------------------------------------------------------------------
# sampler


class Sampler(threading.Thread):
    def __init__(self, broker, interval, group_ids, csv_path, stop, counters):
        super().__init__(name="sampler", daemon=True)
        self.broker = broker
        self.interval = interval
        self.group_ids = group_ids
        self.csv_path = csv_path
        self.stop = stop
        self.counters = counters  # callable -> dict of extra progress numbers
        self.samples = []  # dicts
        self.t0 = time.monotonic()
        self.broker_gone_at = None

    def progress(self):
        """(produced to the bench topic, [committed per group]): high watermarks
        and committed offsets through confluent-kafka."""
        from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
        from confluent_kafka.admin import AdminClient

        produced, committed = None, []
        try:
            if not hasattr(self, "_consumer"):
                self._consumer = Consumer(
                    {"bootstrap.servers": self.broker.bootstrap, "group.id": "soak-sampler-unused", "log_level": 3}
                )
                self._admin = AdminClient({"bootstrap.servers": self.broker.bootstrap, "log_level": 3})
            produced = sum(
                self._consumer.get_watermark_offsets(TopicPartition(BENCH_TOPIC, p), timeout=5)[1]
                for p in range(BENCH_PARTITIONS)
            )
            reqs = [ConsumerGroupTopicPartitions(g) for g in self.group_ids]
            for g, fut in zip(self.group_ids, [self._admin.list_consumer_group_offsets([r])[r.group_id] for r in reqs]):
                try:
                    res = fut.result(timeout=5)
                    committed.append(sum(max(tp.offset, 0) for tp in res.topic_partitions if tp.topic == BENCH_TOPIC))
                except Exception:  # noqa: BLE001 - a group not yet formed
                    committed.append(0)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass
        return produced, committed

    def sample(self):
        s = proc_sample(self.broker.proc.pid, os.path.realpath(self.broker.data)) if self.broker.alive() else None
        if s is None:
            if self.broker_gone_at is None:
                self.broker_gone_at = time.monotonic() - self.t0
            return None
        rss, fds, threads, kinds = s
        produced, committed = self.progress()
        m = scrape(self.broker.metrics_url)
        row = {
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "rss_kib": rss,
            "fds": fds,
            "threads": threads,
        }
        for k in FD_KINDS:
            row["fds_" + k] = kinds[k]
        row.update({
            "bench_produced": produced if produced is not None else "",
        })
        for i in range(len(self.group_ids)):
            row["group%d_committed" % i] = committed[i] if i < len(committed) else ""
        row["retention_segments_deleted"] = int(m.get("tidelog_retention_segments_deleted_total", 0))
        row["compaction_records_removed"] = int(m.get("tidelog_compaction_records_removed_total", 0))
        row.update(self.counters())
        self.samples.append(row)
        self.write_csv()
        log(
            "t=%6.0fs rss %7.1f MiB fds %4d (sock %d soak %d compact %d churn %d) threads %3d | produced %s committed %s | retention deleted %d seg, compaction removed %d rec | compact acked %d churn %d"
            % (
                row["elapsed_s"],
                rss / 1024.0,
                fds,
                kinds["socket"],
                kinds["bench_topic"],
                kinds["compact_topic"],
                kinds["churn_topics"],
                threads,
                row["bench_produced"],
                "/".join(str(c) for c in committed) or "-",
                row["retention_segments_deleted"],
                row["compaction_records_removed"],
                row.get("compact_acked", 0),
                row.get("churn_cycles", 0),
            )
        )
        return row

    def write_csv(self):
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.samples[0].keys()))
            w.writeheader()
            w.writerows(self.samples)

    def run(self):
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.sample()
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self):
        if hasattr(self, "_consumer"):
            self._consumer.close()
            del self._consumer


# --------------------------------------------------------------------------
# bounds and the SVG


def judge_resources(samples, duration):
    """The bound checks over the samples taken during the load."""
    during = [s for s in samples if s["elapsed_s"] <= duration + 1]
    warm = duration * WARMUP_FRACTION
    ref = [s for s in during if warm <= s["elapsed_s"] <= duration * REFERENCE_END_FRACTION]
    out = {"warmup_s": warm, "reference_window_s": [warm, duration * REFERENCE_END_FRACTION]}
    if len(ref) < 2 or not during:
        out["problems"] = ["too few samples (%d in the reference window) to judge growth" % len(ref)]
        return out
    end = during[-1]
    rss_ref = statistics.median(s["rss_kib"] for s in ref) / 1024.0
    fd_ref = max(s["fds"] for s in ref)
    rss_bound = RSS_FACTOR * rss_ref + RSS_SLACK_MIB
    fd_bound = fd_ref + FD_SLACK
    post = [s for s in during if s["elapsed_s"] >= warm]
    slope = None
    if len(post) >= 3:
        xs = [s["elapsed_s"] / 60.0 for s in post]
        ys = [s["rss_kib"] / 1024.0 for s in post]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    out.update(
        {
            "end_elapsed_s": end["elapsed_s"],
            "rss_end_mib": round(end["rss_kib"] / 1024.0, 1),
            "rss_reference_median_mib": round(rss_ref, 1),
            "rss_bound_mib": round(rss_bound, 1),
            "rss_max_mib": round(max(s["rss_kib"] for s in during) / 1024.0, 1),
            "rss_slope_after_warmup_mib_per_min": round(slope, 3) if slope is not None else None,
            "fds_end": end["fds"],
            "fds_reference_max": fd_ref,
            "fds_bound": fd_bound,
            "fds_max": max(s["fds"] for s in during),
            "threads_end": end["threads"],
            "threads_min": min(s["threads"] for s in during),
            "threads_max": max(s["threads"] for s in during),
        }
    )
    growth = {k: end["fds_" + k] - max(s["fds_" + k] for s in ref) for k in FD_KINDS}
    out["fds_growth_by_kind"] = growth
    problems = []
    if out["rss_end_mib"] > rss_bound:
        problems.append(
            "RSS grew: %.1f MiB at the end > bound %.1f MiB (%.2f x reference median %.1f MiB + %d MiB)"
            % (out["rss_end_mib"], rss_bound, RSS_FACTOR, rss_ref, RSS_SLACK_MIB)
        )
    if end["fds"] > fd_bound:
        problems.append(
            "open files grew: %d at the end > bound %d (reference max %d + %d); end minus reference max by kind: %s"
            % (end["fds"], fd_bound, fd_ref, FD_SLACK, ", ".join("%s %+d" % kv for kv in growth.items()))
        )
    out["problems"] = problems
    return out


def write_svg(path, samples, duration, res):
    """Three stacked panels (RSS MiB, open FDs, threads) over elapsed time."""
    if not samples:
        return
    W, PH, L, R, T, GAP = 900, 170, 70, 20, 40, 45
    H = T + 3 * PH + 3 * GAP
    xmax = max(max(s["elapsed_s"] for s in samples), duration, 1.0)
    series = [
        ("RSS (MiB)", [s["rss_kib"] / 1024.0 for s in samples], "#1f77b4", res.get("rss_bound_mib")),
        ("open files", [s["fds"] for s in samples], "#d62728", res.get("fds_bound")),
        ("threads", [s["threads"] for s in samples], "#2ca02c", None),
    ]
    xs = [s["elapsed_s"] for s in samples]
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (W, H),
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="%d" y="20" font-size="14">tidelog soak: broker RSS, open files, threads every sample (%d samples, %.0f s)</text>'
        % (L, len(samples), xmax),
    ]

    def sx(x):
        return L + (W - L - R) * x / xmax

    for i, (name, ys, color, bound) in enumerate(series):
        top = T + i * (PH + GAP)
        bottom = top + PH
        hi = max(ys + ([bound] if bound else []))
        lo = 0.0
        hi = hi * 1.1 if hi > 0 else 1.0

        def sy(y, top=top, lo=lo, hi=hi):
            return top + PH - PH * (y - lo) / (hi - lo)

        warm = duration * WARMUP_FRACTION
        ref_end = duration * REFERENCE_END_FRACTION
        out.append(
            '<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#eeeeee"/>' % (sx(0), top, sx(warm) - sx(0), PH)
        )
        out.append(
            '<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#e3eefc"/>' % (sx(warm), top, sx(ref_end) - sx(warm), PH)
        )
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#444"/>' % (L, top, W - L - R, PH))
        for k in range(5):
            y = lo + (hi - lo) * k / 4
            out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>' % (L, W - R, sy(y), sy(y)))
            out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (L - 5, sy(y) + 4, "%.0f" % y))
        out.append('<text x="%d" y="%d" font-size="12" fill="%s">%s</text>' % (L + 5, top - 6, color, name))
        if bound:
            out.append(
                '<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#999" stroke-dasharray="5,4"/>'
                % (L, W - R, sy(bound), sy(bound))
            )
            out.append(
                '<text x="%d" y="%.1f" text-anchor="end" fill="#666">bound at the end %.0f</text>'
                % (W - R - 4, sy(bound) - 4, bound)
            )
        pts = " ".join("%.1f,%.1f" % (sx(x), sy(y)) for x, y in zip(xs, ys))
        out.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>' % (color, pts))
        for k in range(6):
            x = xmax * k / 5
            out.append('<text x="%.1f" y="%d" text-anchor="middle">%.0f s</text>' % (sx(x), bottom + 14, x))
    out.append(
        '<text x="%d" y="%d" fill="#666">grey: warm-up (first %d%%, not judged); blue: reference window (%d-%d%%); dashed: the bound the last sample is held to</text>'
        % (L, H - 8, WARMUP_FRACTION * 100, WARMUP_FRACTION * 100, REFERENCE_END_FRACTION * 100)
    )
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# --------------------------------------------------------------------------
# main


def parse_args(argv):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="More in bench/README.md, section Soak.",
        formatter_class=Formatter,
    )
    p.add_argument("--duration", type=float, default=1800, help="seconds of load (bench produce + consume, compacted writes, topic churn)")
    p.add_argument("--sample-interval", type=float, default=10, help="seconds between samples of the broker's RSS, open files and threads")
    p.add_argument("--out", default=None, help="directory for samples.csv, samples.svg, verdict.json, broker.log, bench/ (default target/soak/<unix time>)")
    p.add_argument("--rate-mb", type=float, default=2.0, help="bench produce rate in MB/s of record values (1 KiB records, acks=all)")
    p.add_argument("--compact-rate", type=float, default=500, help="records/s written to the compacted topic")
    p.add_argument("--compact-keys", type=int, default=500, help="distinct keys in the compacted topic")
    p.add_argument(
        "--compact-idempotent",
        action="store_true",
        help="write the compacted topic with enable.idempotence=true. Off by default: tidelog's cleaner used to keep "
        "every batch it emptied if it carried a producer id, and librdkafka gave up with MSG_SIZE_TOO_LARGE after about "
        "10 fetches in a row that held only empty batches; it now keeps only each producer's last, as Kafka does "
        "(bench/README.md, Soak)",
    )
    p.add_argument("--churn-interval", type=float, default=3, help="seconds between topic create/produce/delete cycles")
    p.add_argument(
        "--retention-ms",
        type=int,
        default=None,
        help="retention.ms of the bench topic; default min(60 s, duration / 6), so retention is in its steady state before the warm-up (first 25%%) ends",
    )
    p.add_argument(
        "--retention-bytes",
        type=int,
        default=None,
        help="retention.bytes (per partition) of the bench topic; default 80%% of what a partition receives in retention.ms, in whole MiB, at least 2 MiB",
    )
    p.add_argument("--segment-bytes", type=int, default=1 << 20, help="segment.bytes of the bench topic")
    p.add_argument("--compact-segment-bytes", type=int, default=256 << 10, help="segment.bytes of the compacted topic")
    p.add_argument("--keep-data", action="store_true", help="keep the broker's data dir after a PASS (it is always kept after a FAIL)")
    p.add_argument("--broker-arg", action="append", default=[], metavar="ARG", help="extra broker flag, e.g. --broker-arg=--log.preallocate.bytes=1048576 (repeatable)")
    p.add_argument("--tidelog-bin", default=os.environ.get("TIDELOG_BIN") or os.path.join(REPO, "target", "release", "tidelog"), help="broker binary (env TIDELOG_BIN)")
    p.add_argument("--bench-bin", default=os.environ.get("TIDELOG_BENCH_BIN") or os.path.join(REPO, "target", "release", "tidelog-bench"), help="tidelog-bench binary (env TIDELOG_BENCH_BIN)")
    a = p.parse_args(argv)
    if a.duration < 20:
        p.error("--duration must be at least 20 s")
    if a.sample_interval <= 0:
        p.error("--sample-interval must be positive")
    if a.retention_ms is None:
        a.retention_ms = int(min(60000, a.duration * 1000 / 6))
    if a.retention_bytes is None:
        per_partition = a.rate_mb * 1e6 / BENCH_PARTITIONS * a.retention_ms / 1000
        a.retention_bytes = max(2, int(0.8 * per_partition / (1 << 20))) << 20
    return a


def main(argv=None):
    a = parse_args(argv)
    broker_holder = []
    try:
        return soak(a, broker_holder)
    finally:
        # Whatever happened (an exception, ^C), the broker we started goes.
        for b in broker_holder:
            if b.alive():
                b.stop()


def soak(a, broker_holder):
    for b in (a.tidelog_bin, a.bench_bin):
        if not (os.path.isfile(b) and os.access(b, os.X_OK)):
            log("binary not found: %s (cargo build --release, or set TIDELOG_BIN / TIDELOG_BENCH_BIN)" % b)
            return 2
    out = os.path.abspath(a.out or os.path.join(REPO, "target", "soak", str(int(time.time()))))
    os.makedirs(out, exist_ok=True)
    if fs_type(out) in ("tmpfs", "ramfs"):
        log("%s is on tmpfs: tidelog needs O_DIRECT (use --out on a disk)" % out)
        return 2
    broker = Broker(os.path.abspath(a.tidelog_bin), out, a.broker_arg)
    broker_holder.append(broker)
    problems = []
    verdict = {"duration_s": a.duration, "out": out, "host_cpus": os.cpu_count()}
    log("soak: %s for %.0f s, out %s" % (a.tidelog_bin, a.duration, out))
    log(
        "bench topic %s: %d partitions, %.1f MB/s, segment.bytes %d, retention.ms %d, retention.bytes %d"
        % (BENCH_TOPIC, BENCH_PARTITIONS, a.rate_mb, a.segment_bytes, a.retention_ms, a.retention_bytes)
    )
    verdict["settings"] = {
        k: getattr(a, k)
        for k in ("rate_mb", "compact_rate", "compact_idempotent", "compact_keys", "churn_interval", "retention_ms", "retention_bytes", "segment_bytes", "compact_segment_bytes", "sample_interval")
    }
    verdict["binaries"] = {}
    for name, path in (("tidelog", a.tidelog_bin), ("tidelog-bench", a.bench_bin)):
        st = os.stat(path)
        verdict["binaries"][name] = {
            "path": os.path.abspath(path),
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
            "size": st.st_size,
        }
    try:
        verdict["git_head"] = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    broker.start()
    log("broker pid %d on %s, metrics %s" % (broker.proc.pid, broker.bootstrap, broker.metrics_url))
    create_topic(
        broker.bootstrap,
        BENCH_TOPIC,
        BENCH_PARTITIONS,
        {
            "segment.bytes": str(a.segment_bytes),
            "retention.ms": str(a.retention_ms),
            "retention.bytes": str(a.retention_bytes),
        },
    )
    create_topic(
        broker.bootstrap,
        COMPACT_TOPIC,
        COMPACT_PARTITIONS,
        {"cleanup.policy": "compact", "segment.bytes": str(a.compact_segment_bytes)},
    )

    stop = threading.Event()
    writer = CompactWriter(broker.bootstrap, a.compact_rate, a.compact_keys, stop, a.compact_idempotent)
    churn = Churn(broker.bootstrap, a.churn_interval, stop)
    prefix = "soak-%d" % int(time.time())
    group_ids = ["%s-%d" % (prefix, g) for g in range(3)]
    sampler_stop = threading.Event()
    sampler = Sampler(
        broker,
        a.sample_interval,
        group_ids,
        os.path.join(out, "samples.csv"),
        sampler_stop,
        lambda: {"compact_acked": writer.acked, "churn_cycles": churn.cycles},
    )
    warmup = 5
    bench_out = os.path.join(out, "bench")
    bench_cmd = [
        os.path.abspath(a.bench_bin),
        "run",
        "--workload", os.path.join(REPO, "bench", "workloads", "fan-out-3-groups.toml"),
        "--bootstrap", broker.bootstrap,
        "--topic", BENCH_TOPIC,
        "--no-create-topic",
        "--producers", "1",
        "--consumers", "2",
        "--groups", "3",
        "--group-id-prefix", prefix,
        "--rate-mb", str(a.rate_mb),
        "--warmup-s", str(warmup),
        "--duration-s", str(max(1.0, a.duration - warmup)),
        "--drain-timeout-s", "60",
        "--verify",
        "--strict",
        "--quiet",
        "--no-baseline",
        "--hiccup-interval-us", "0",
        "--broker-pid", str(broker.proc.pid),
        "--data-dir", broker.data,
        "--out", bench_out,
    ]
    log("bench: %s" % " ".join(bench_cmd))
    bench_log = open(os.path.join(out, "bench.log"), "wb")
    bench = None
    load_end = None
    try:
        sampler.start()
        bench = subprocess.Popen(bench_cmd, stdout=bench_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        writer.start()
        churn.start()
        while time.monotonic() - sampler.t0 < a.duration:
            if not broker.alive():
                problems.append("broker died during the soak with exit code %s" % broker.proc.returncode)
                break
            if bench.poll() is not None:
                break
            time.sleep(0.5)
        load_end = time.monotonic() - sampler.t0
        # One last sample at the end of the load, before anything stops.
        sampler_stop.set()
        sampler.join(30)
        if broker.alive():
            sampler.sample()
        stop.set()
        writer.join(90)
        churn.join(90)
        try:
            bench_rc = bench.wait(timeout=a.duration + 180)
        except subprocess.TimeoutExpired:
            bench.kill()
            bench_rc = bench.wait()
            problems.append("tidelog-bench did not finish within the duration + 180 s: killed")
    finally:
        stop.set()
        sampler_stop.set()
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
        bench_log.close()
    sampler.join(30)
    sampler.close()
    verdict["load_s"] = round(load_end or 0, 1)

    # -- bench verification
    verdict["bench_exit"] = bench_rc
    bench_facts = {}
    try:
        with open(os.path.join(bench_out, "summary.json")) as f:
            summary = json.load(f)
        v = summary.get("verify") or {}
        r = summary.get("results") or {}
        bench_facts = {
            "produced": r.get("produced_total"),
            "consumed_per_group": r.get("consumed_total_per_group"),
            "records_checked": v.get("records"),
            "duplicate_offsets": v.get("duplicate_offsets"),
            "missing_offsets": v.get("missing_offsets"),
            "offset_regressions": v.get("offset_regressions"),
            "producer_order_violations": v.get("producer_order_violations"),
            "first_problem": v.get("first_problem"),
            "failed_records": r.get("failed_records"),
            "errors": r.get("errors"),
        }
    except (OSError, ValueError) as e:
        problems.append("no bench summary.json: %s" % e)
    verdict["bench"] = bench_facts
    if bench_rc != 0:
        with open(os.path.join(out, "bench.log"), "rb") as f:
            tail = f.read().decode("utf-8", "replace").splitlines()[-15:]
        problems.append("tidelog-bench --verify --strict exited %s: %s" % (bench_rc, " | ".join(tail)))
    if bench_facts and not bench_facts.get("records_checked"):
        problems.append("the bench verified no records")

    # -- compaction, retention, churn
    metrics = scrape(broker.metrics_url) if broker.alive() else {}
    if broker.alive():
        problems += writer.errors[:5]
        facts, compact_problems = check_compacted(broker.bootstrap, writer, metrics)
        verdict["compaction"] = facts
        problems += compact_problems
        problems += churn.errors[:5]
        problems += check_churn(broker, churn)
    verdict["churn"] = {"cycles": churn.cycles, "errors": len(churn.errors)}
    if churn.cycles == 0:
        problems.append("the topic create/delete loop completed no cycle")
    seg_deleted = int(metrics.get("tidelog_retention_segments_deleted_total", 0))
    verdict["retention"] = {
        "segments_deleted": seg_deleted,
        "bytes_deleted": int(metrics.get("tidelog_retention_bytes_deleted_total", 0)),
    }
    if seg_deleted == 0:
        problems.append("retention deleted no segment")

    # -- resources
    res = judge_resources(sampler.samples, load_end or a.duration)
    verdict["resources"] = res
    problems += res["problems"]
    write_svg(os.path.join(out, "samples.svg"), sampler.samples, load_end or a.duration, res)

    # -- broker health
    rc = broker.stop()
    verdict["broker_exit_on_sigterm"] = rc
    if rc != 0:
        problems.append("broker exited %s on SIGTERM (None: did not exit within 60 s)" % rc)
    text = broker.log_text()
    if "panicked at" in text:
        problems.append("the broker log has a panic: %s" % re.search(r".*panicked at.*", text).group(0))
    verdict["broker_log_errors"] = len(re.findall(r"\bERROR\b", text))
    verdict["broker_log_warnings"] = len(re.findall(r"\bWARN\b", text))

    verdict["problems"] = problems
    verdict["verdict"] = "PASS" if not problems else "FAIL"
    with open(os.path.join(out, "verdict.json"), "w") as f:
        json.dump(verdict, f, indent=2)
    print_verdict(verdict, res, bench_facts)
    if not problems and not a.keep_data:
        shutil.rmtree(broker.data, ignore_errors=True)
    return 0 if not problems else 1


def print_verdict(verdict, res, bench):
    log("")
    log("==== soak verdict: %s (load %.0f s on %d CPUs)" % (verdict["verdict"], verdict["load_s"], verdict["host_cpus"]))
    if bench:
        log(
            "bench: produced %s, consumed per group %s, records verified %s, read twice %s, never read %s, order violations %s, offset regressions %s"
            % (
                bench.get("produced"),
                bench.get("consumed_per_group"),
                bench.get("records_checked"),
                bench.get("duplicate_offsets"),
                bench.get("missing_offsets"),
                bench.get("producer_order_violations"),
                bench.get("offset_regressions"),
            )
        )
    c = verdict.get("compaction")
    if c:
        log(
            "compaction: %d acked (%d tombstones) over %d keys, %d read back, %d compaction runs removed %d records"
            % (c["acked"], c["tombstones_sent"], c["keys"], c["read_back"], c["compaction_runs"], c["compaction_records_removed"])
        )
    log("retention: %d segments (%d bytes) deleted" % (verdict["retention"]["segments_deleted"], verdict["retention"]["bytes_deleted"]))
    log("churn: %d create/produce/delete cycles, %d errors" % (verdict["churn"]["cycles"], verdict["churn"]["errors"]))
    if "rss_end_mib" in res:
        log(
            "RSS: end %.1f MiB, reference median %.1f MiB, bound %.1f MiB, max %.1f MiB, slope after warm-up %s MiB/min"
            % (res["rss_end_mib"], res["rss_reference_median_mib"], res["rss_bound_mib"], res["rss_max_mib"], res["rss_slope_after_warmup_mib_per_min"])
        )
        log("open files: end %d, reference max %d, bound %d, max %d" % (res["fds_end"], res["fds_reference_max"], res["fds_bound"], res["fds_max"]))
        log("threads: end %d, min %d, max %d (not judged)" % (res["threads_end"], res["threads_min"], res["threads_max"]))
    log("broker: exit %s on SIGTERM, log ERROR lines %d, WARN lines %d" % (verdict["broker_exit_on_sigterm"], verdict["broker_log_errors"], verdict["broker_log_warnings"]))
    for p in verdict["problems"]:
        log("FAIL: %s" % p)
    log("outputs: %s/{samples.csv,samples.svg,verdict.json,broker.log,bench.log,bench/}" % verdict["out"])


if __name__ == "__main__":
    sys.exit(main())
