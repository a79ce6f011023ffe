#!/usr/bin/env python3
"""Captures a seed corpus for the fuzz targets from real Kafka clients.

Starts the release `tidelog` broker (one shard, a single-node controller
quorum so the metadata log is written too), puts a small TCP proxy in front
of it (the broker advertises the proxy's port, so every client connection
goes through it), and drives kcat, confluent-kafka and kafka-python through
produce (plain, idempotent, every codec), fetch, metadata, consumer groups
and admin calls. Every request frame the proxy sees is saved, without its
length prefix, as fuzz/seeds/request/<sha1>. After a clean stop, files the
broker wrote are copied as seeds for the storage targets:

  seeds/record_batch/     segment (.log) files, cut to 64 KiB
  seeds/storage_files/    kind byte + segment / .index+.timeindex /
                          leader-epoch-checkpoint / producer snapshot /
                          tidelog-metadata.json (see storage_files.rs)
  seeds/metadata_log/     kind byte + raft.log, kind 2 + snapshot.json

Usage: fuzz/capture-corpus.py [--bin target/release/tidelog] [--out fuzz/seeds]
Needs kcat, confluent-kafka and kafka-python (tests/requirements.txt).
Run `cargo fuzz cmin <target>` afterwards if the corpus grew large.
"""

import argparse
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME_BYTES_MAX = 64 << 10
FILE_BYTES_MAX = 64 << 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save(directory, data):
    os.makedirs(directory, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
        return 1
    return 0


class Proxy:
    """Forwards 127.0.0.1:listen_port to 127.0.0.1:upstream_port and saves
    each request frame the clients send."""

    def __init__(self, listen_port, upstream_port, out_dir):
        self.upstream_port = upstream_port
        self.out_dir = out_dir
        self.saved = 0
        self.seen = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen(64)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self.requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def read_exact(sock, n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def requests(self, client, upstream):
        try:
            while True:
                prefix = self.read_exact(client, 4)
                if prefix is None:
                    break
                (size,) = struct.unpack(">i", prefix)
                frame = self.read_exact(client, max(size, 0))
                if frame is None:
                    break
                with self.lock:
                    self.seen += 1
                    if len(frame) <= FRAME_BYTES_MAX:
                        self.saved += save(self.out_dir, frame)
                upstream.sendall(prefix + frame)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("broker did not open port %d" % port)


def step(name, fn):
    """Runs one client scenario; a failure is reported and the capture goes on."""
    print("capture: %s" % name, flush=True)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a seed corpus is best effort per scenario
        print("capture: %s failed: %s" % (name, e), file=sys.stderr, flush=True)


def run(cmd, **kw):
    subprocess.run(cmd, check=True, timeout=60, stdout=subprocess.DEVNULL, **kw)


def drive_kcat(bootstrap):
    msgs = "".join("key%d:value %d\n" % (i, i) for i in range(20))
    run(["kcat", "-b", bootstrap, "-P", "-t", "kcat-topic", "-K:"], input=msgs.encode())
    run(["kcat", "-b", bootstrap, "-P", "-t", "kcat-topic", "-z", "gzip", "-H", "h1=v1"], input=b"a\nb\nc\n")
    run(["kcat", "-b", bootstrap, "-C", "-t", "kcat-topic", "-o", "beginning", "-e", "-q"])
    run(["kcat", "-b", bootstrap, "-L"])
    run(["kcat", "-b", bootstrap, "-L", "-t", "kcat-topic", "-J"])
    run(["kcat", "-b", bootstrap, "-Q", "-t", "kcat-topic:0:-1"])


def drive_confluent(bootstrap):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
        OffsetSpec,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fs = admin.create_topics([NewTopic("ck-topic", 3, 1, config={"retention.ms": "600000"}), NewTopic("ck-doomed", 1, 1)])
    for f in fs.values():
        f.result(30)
    for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
        p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 5})
        for i in range(30):
            p.produce("ck-topic", key=b"k%d" % i, value=(b"v%d-" % i) * 8, headers=[("h", b"x")], partition=i % 3)
        p.flush(30)
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for i in range(20):
        p.produce("ck-topic", value=b"idem-%d" % i, partition=0)
    p.flush(30)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "ck-group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    c.subscribe(["ck-topic"])
    got, deadline = 0, time.time() + 20
    while got < 50 and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got += 1
            if got % 10 == 0:
                c.commit(message=m, asynchronous=False)
    c.committed([TopicPartition("ck-topic", 0)], timeout=10)
    c.close()
    res = ConfigResource(ConfigResource.Type.TOPIC, "ck-topic")
    admin.describe_configs([res])[res].result(30)
    res.set_config("retention.ms", "700000")
    for f in admin.alter_configs([res]).values():
        f.result(30)
    inc = ConfigResource(
        ConfigResource.Type.TOPIC,
        "ck-topic",
        incremental_configs=[ConfigEntry("cleanup.policy", "delete", incremental_operation=AlterConfigOpType.SET)],
    )
    for f in admin.incremental_alter_configs([inc]).values():
        f.result(30)
    for f in admin.create_partitions([NewPartitions("ck-topic", 4)]).values():
        f.result(30)
    admin.list_consumer_groups().result(30)
    for f in admin.describe_consumer_groups(["ck-group"]).values():
        f.result(30)
    admin.list_offsets({TopicPartition("ck-topic", 0): OffsetSpec.latest()}).values()
    for f in admin.list_offsets({TopicPartition("ck-topic", 1): OffsetSpec.earliest()}).values():
        f.result(30)
    for f in admin.delete_records([TopicPartition("ck-topic", 1, 2)]).values():
        f.result(30)
    if hasattr(admin, "describe_cluster"):
        admin.describe_cluster().result(30)
    for f in admin.delete_consumer_groups(["ck-group"]).values():
        f.result(30)
    for f in admin.delete_topics(["ck-doomed"]).values():
        f.result(30)


def drive_kafka_python(bootstrap):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("kp-topic", 2, 1)])
    for codec in (None, "gzip", "snappy", "lz4", "zstd"):
        p = KafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=5)
        for i in range(20):
            p.send("kp-topic", key=b"k%d" % i, value=b"kafka-python %d" % i, headers=[("h", b"v")])
        p.flush(30)
        p.close()
    c = KafkaConsumer(
        "kp-topic",
        bootstrap_servers=bootstrap,
        group_id="kp-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    n = 0
    for _ in c:
        n += 1
        if n >= 30:
            break
    c.commit()
    c.close()
    admin.list_groups()
    admin.describe_groups(["kp-group"])
    admin.list_group_offsets("kp-group")
    admin.describe_cluster()
    admin.describe_topics(["kp-topic"])
    admin.describe_log_dirs()
    admin.list_partition_reassignments()
    admin.delete_groups(["kp-group"])
    admin.delete_topics(["kp-topic"])
    admin.close()


def copy_storage_seeds(data_dir, out):
    n = 0
    for root, _, files in os.walk(data_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read(FILE_BYTES_MAX)
            if name == "raft.log":
                n += save(os.path.join(out, "metadata_log"), b"\x00" + data)
            elif name.endswith(".log") and data:
                data = data.rstrip(b"\0") or data[:1]
                n += save(os.path.join(out, "record_batch"), data)
                n += save(os.path.join(out, "storage_files"), b"\x00" + data)
            elif name.endswith(".index"):
                times_path = path[: -len(".index")] + ".timeindex"
                times = open(times_path, "rb").read() if os.path.exists(times_path) else b""
                log_bytes = os.path.getsize(path[: -len(".index")] + ".log")
                rest = data + times
                split = (len(data) * 255 + len(rest) - 1) // len(rest) if rest else 0
                n += save(os.path.join(out, "storage_files"), b"\x01" + struct.pack(">Q", log_bytes) + bytes([split]) + rest)
            elif name == "leader-epoch-checkpoint":
                n += save(os.path.join(out, "storage_files"), b"\x02" + data)
            elif "snapshot" in name and not name.endswith(".json"):
                n += save(os.path.join(out, "storage_files"), b"\x03" + data)
            elif name == "tidelog-metadata.json":
                n += save(os.path.join(out, "storage_files"), b"\x05" + data)
            elif name == "snapshot.json":
                n += save(os.path.join(out, "metadata_log"), b"\x02" + data)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("TIDELOG_BIN", os.path.join(REPO, "target", "release", "tidelog")))
    ap.add_argument("--out", default=os.path.join(REPO, "fuzz", "seeds"))
    args = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="tidelog-capture-", dir="/var/tmp")
    broker_port, proxy_port, controller_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    log = open(os.path.join(scratch, "broker.log"), "wb")
    cmd = [
        args.bin,
        "--log.dirs=%s" % os.path.join(scratch, "data"),
        "--num.shards=1",
        "--node.id=1",
        "--process.roles=broker,controller",
        "--controller.quorum.voters=1@127.0.0.1:%d" % controller_port,
        "--controller.listener.names=CONTROLLER",
        "--listeners=PLAINTEXT://127.0.0.1:%d,CONTROLLER://127.0.0.1:%d" % (broker_port, controller_port),
        "--advertised.listeners=PLAINTEXT://127.0.0.1:%d" % proxy_port,
        "--metrics.listeners=127.0.0.1:%d" % metrics_port,
        "--default.replication.factor=1",
        "--offsets.topic.replication.factor=1",
    ]
    broker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(broker_port)
        proxy = Proxy(proxy_port, broker_port, os.path.join(args.out, "request"))
        bootstrap = "127.0.0.1:%d" % proxy_port
        time.sleep(1)
        step("kcat", lambda: drive_kcat(bootstrap))
        step("confluent-kafka", lambda: drive_confluent(bootstrap))
        step("kafka-python", lambda: drive_kafka_python(bootstrap))
        print("capture: %d request frames seen, %d new corpus files" % (proxy.seen, proxy.saved))
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(30)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
    print("capture: %d storage seeds" % copy_storage_seeds(os.path.join(scratch, "data"), args.out))
    if broker.returncode != 0:
        print("capture: broker exited %s; log in %s" % (broker.returncode, scratch), file=sys.stderr)
        return 1
    shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
