"""`log.unflushed.max.bytes`: when the disk is slower than the network, the
accumulator (records appended and not yet written) stays bounded and
producers are pushed back through TCP instead (issue 20, bounded memory).

The slow disk is real: the broker's data directory is an ext4 loop
filesystem, and the broker process is moved into a cgroup-v1 blkio group
that throttles writes to that loop device to 1 MiB/s. Skips, saying why,
where loop filesystems or the blkio controller are not available.
"""

import os
import threading
import time
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

import loopfs
from conftest import create_topic, pick_ports, unique_topic

BLKIO = "/sys/fs/cgroup/blkio"
LIMIT = 2 << 20
THROTTLE_BPS = 1 << 20
REQUEST_MAX = 1 << 20  # the producer's message.max.bytes: one request at most
VALUE = 10_000
COUNT = 1200  # 12 MB: about 12 s of the throttled disk


def scrape(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def gauge(text, name):
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("%s not in the scrape:\n%s" % (name, text))


class Throttle:
    """A blkio cgroup that limits writes to one block device."""

    def __init__(self, dev):
        self.dev = "%d:%d" % (os.major(dev), os.minor(dev))
        self.path = os.path.join(BLKIO, "tidelog-test-%d-%d" % (os.getpid(), time.monotonic_ns()))

    def __enter__(self):
        os.mkdir(self.path)
        return self

    def limit(self, bps):
        with open(os.path.join(self.path, "blkio.throttle.write_bps_device"), "w") as f:
            f.write("%s %d" % (self.dev, bps))

    def add(self, pid):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def __exit__(self, *exc):
        try:
            self.limit(0)
        except OSError:
            pass
        # Move whatever is left back to the root group, then remove ours.
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:
                with open(os.path.join(BLKIO, "cgroup.procs"), "w") as f:
                    f.write(pid)
        except OSError:
            pass
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def slow_fs(data_root):
    if not os.path.exists(os.path.join(BLKIO, "blkio.throttle.write_bps_device")):
        pytest.skip("no cgroup-v1 blkio controller with throttling at %s" % BLKIO)
    with loopfs.mounted(data_root, "slow-fs", 256) as fs:
        yield fs


def test_slow_disk_bounds_the_accumulator_and_loses_nothing(broker_factory, slow_fs):
    data = os.path.join(slow_fs.mnt, "data")
    os.makedirs(data)
    metrics_port = pick_ports(1)
    b = broker_factory(
        shards=1,
        log_dirs=data,
        args=[
            "--log.unflushed.max.bytes=%d" % LIMIT,
            "--metrics.listeners=127.0.0.1:%d" % metrics_port,
        ],
    )
    topic = unique_topic("unflushed")
    create_topic(b, topic, 1)
    assert gauge(scrape(metrics_port), "tidelog_unflushed_waits_total") == 0

    acked, errors = [], []

    def on_delivery(err, msg):
        if err is None:
            acked.append(msg.offset())
        else:
            errors.append(err)

    producer = Producer(
        b.producer_config(
            **{
                "acks": "1",
                "linger.ms": 5,
                "message.max.bytes": REQUEST_MAX,
                "message.timeout.ms": 120000,
                "request.timeout.ms": 60000,
                "queue.buffering.max.kbytes": 64 << 10,
            }
        )
    )
    values = [("%06d-" % i).encode() + b"v" * (VALUE - 7) for i in range(COUNT)]

    with Throttle(os.stat(data).st_dev) as throttle:
        throttle.limit(THROTTLE_BPS)
        throttle.add(b.proc.pid)

        stop = threading.Event()
        seen = []

        def watch():
            while not stop.is_set():
                text = scrape(metrics_port)
                seen.append((gauge(text, "tidelog_unflushed_bytes"), gauge(text, "tidelog_unflushed_waits_total")))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for v in values:
            producer.produce(topic, value=v, partition=0, on_delivery=on_delivery)
            producer.poll(0)
        # Six seconds of the throttled disk: the producer has far more
        # queued than the disk takes, so the broker sits at its bound.
        deadline = time.time() + 6
        while time.time() < deadline:
            producer.poll(0.1)
        stop.set()
        watcher.join(10)
        during = len(acked)
        throttle.limit(0)

    assert seen, "no metrics scraped"
    most = max(u for u, _ in seen)
    waits = seen[-1][1]
    # The accumulator reached its bound (the disk really was slow), produce
    # waited, and it never held more than the bound plus the one request a
    # connection dispatches once under it.
    assert waits > 0, "no produce waited for the flusher: %r" % seen[-10:]
    assert most >= LIMIT // 2, "the throttled disk never fell behind: most %d" % most
    assert most <= LIMIT + REQUEST_MAX + (64 << 10), "unflushed reached %d over a bound of %d" % (most, LIMIT)
    assert during < COUNT, "all %d records were acked through a 1 MiB/s disk in 6 s" % COUNT

    # With the disk back at full speed everything goes through, in order.
    assert producer.flush(120) == 0
    assert not errors, errors[:5]
    assert sorted(acked) == list(range(COUNT))
    deadline = time.time() + 30
    while gauge(scrape(metrics_port), "tidelog_unflushed_bytes") != 0:
        assert time.time() < deadline, "unflushed bytes never drained"
        time.sleep(0.1)

    c = Consumer(
        {
            "bootstrap.servers": b.bootstrap,
            "group.id": "unflushed-check",
            "enable.auto.commit": False,
            "fetch.max.bytes": 4 << 20,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + 60
    while len(got) < COUNT and time.time() < deadline:
        m = c.poll(1.0)
        if m is not None and m.error() is None:
            got.append((m.offset(), m.value()))
    c.close()
    assert [o for o, _ in got] == list(range(COUNT))
    assert [v for _, v in got] == values
