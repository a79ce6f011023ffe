"""Black-box test harness: starts the real `tidelog` binary and hands it to tests.

`Broker` runs one broker process (2 shards by default, so two ports P and P+1)
on free ports with a fresh data directory on a real disk file system (O_DIRECT
needs one: tmpfs is refused). Its stdout and stderr go to `broker.log` in that
directory; when a test fails, the tail of every broker log the test used is
attached to the failure report.

Fixtures:
  broker          a started 2-shard broker, stopped (SIGTERM) after the test
  broker_factory  call it with extra flags to get more brokers, all cleaned up
  binary          path of the tidelog binary (TIDELOG_BIN or target/release/tidelog)

A broker that dies on its own during a test, logs a panic, or does not exit 0
on SIGTERM at teardown makes the test error, whatever the test asserted.
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHARDS = 2
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


# --------------------------------------------------------------------------
# file systems


def fs_type(path):
    """File system type of `path`, from the longest matching mount point."""
    path = os.path.realpath(path)
    best, best_type = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mount_point = parts[4].replace("\\040", " ")
            sep = parts.index("-")
            fstype = parts[sep + 1]
            if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) and len(
                mount_point
            ) >= len(best):
                best, best_type = mount_point, fstype
    return best_type


def supports_o_direct(directory):
    probe = os.path.join(directory, ".odirect-probe-%s" % uuid.uuid4().hex)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def pick_data_root():
    """A directory on a disk file system for broker data dirs."""
    candidates = []
    if os.environ.get("TIDELOG_TEST_DIR"):
        candidates.append(os.environ["TIDELOG_TEST_DIR"])
    candidates += [os.path.join(REPO, "target", "pytest-data"), "/var/tmp/tidelog-pytest"]
    for c in candidates:
        try:
            os.makedirs(c, exist_ok=True)
        except OSError:
            continue
        if fs_type(c) in ("tmpfs", "ramfs"):
            continue
        if supports_o_direct(c):
            return c
    raise RuntimeError("no directory on a file system with O_DIRECT among %r" % candidates)


# --------------------------------------------------------------------------
# ports


def _port_free(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_handed_out = set()


def pick_ports(count):
    """First port P of `count` consecutive free ports, below the ephemeral range
    so that client connections never take them between tests."""
    lo, hi = 20000, 32000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo = int(f.read().split()[0])
        hi = min(hi, eph_lo - count - 1)
    except OSError:
        pass
    rnd = random.Random()
    for _ in range(1000):
        p = rnd.randrange(lo, hi)
        ports = range(p, p + count)
        if any(q in _handed_out for q in ports):
            continue
        if all(_port_free(q) for q in ports):
            _handed_out.update(ports)
            return p
    raise RuntimeError("no %d consecutive free ports" % count)


def port_accepts(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# broker


class BrokerError(Exception):
    pass


class Broker:
    def __init__(self, binary, data_dir, port=None, shards=DEFAULT_SHARDS, args=(), env=None, log_dirs=None):
        self.binary = binary
        self.data_dir = data_dir  # our scratch dir: holds log.dirs and broker.log
        self.log_dirs = log_dirs or os.path.join(data_dir, "data")
        self.shards = shards
        self.port = port if port is not None else pick_ports(shards)
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = os.path.join(data_dir, "broker.log")
        self.proc = None
        self.expect_exit = False  # set while we stop or kill it ourselves
        self.starts = 0
        self.start_mark = 0
        os.makedirs(self.data_dir, exist_ok=True)

    # -- addresses

    @property
    def ports(self):
        return [self.port + i for i in range(self.shards)]

    @property
    def bootstrap(self):
        return "127.0.0.1:%d" % self.port

    # -- process control

    def command(self):
        return [
            self.binary,
            "--log.dirs=%s" % self.log_dirs,
            "--listeners=PLAINTEXT://127.0.0.1:%d" % self.port,
            "--num.shards=%d" % self.shards,
        ] + self.args

    def spawn(self):
        """Starts the process without waiting for readiness."""
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.start_mark = log.tell()
        self.starts += 1
        log.write(
            ("\n===== test harness: start #%d: %s\n" % (self.starts, " ".join(self.command()))).encode()
        )
        log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.expect_exit = False
        return self.proc

    def start(self, timeout=START_TIMEOUT_S):
        self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=START_TIMEOUT_S):
        """Every shard port accepts and a Metadata request through a real
        client lists every shard as a broker."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(
                    "tidelog exited with %s during startup\n%s" % (self.proc.returncode, self.log_tail())
                )
            if all(port_accepts(p) for p in self.ports):
                break
            if time.monotonic() > deadline:
                raise BrokerError("tidelog ports %r not accepting after %ss\n%s" % (self.ports, timeout, self.log_tail()))
            time.sleep(0.1)
        # The documented readiness line, logged once every shard listens.
        while self.wait_log(r"tidelog ready", since=self.start_mark, timeout=0) is None:
            if self.proc.poll() is not None:
                raise BrokerError(
                    "tidelog exited with %s during startup\n%s" % (self.proc.returncode, self.log_tail())
                )
            if time.monotonic() > deadline:
                raise BrokerError("no 'tidelog ready' log line after %ss\n%s" % (timeout, self.log_tail()))
            time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        last = None
        while True:
            try:
                md = admin.list_topics(timeout=5)
                if len(md.brokers) == self.shards:
                    return
                last = "Metadata lists brokers %r" % (md.brokers,)
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                last = repr(e)
            if self.proc.poll() is not None:
                raise BrokerError(
                    "tidelog exited with %s during startup\n%s" % (self.proc.returncode, self.log_tail())
                )
            if time.monotonic() > deadline:
                raise BrokerError("tidelog Metadata not ready after %ss: %s\n%s" % (timeout, last, self.log_tail()))
            time.sleep(0.2)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=STOP_TIMEOUT_S):
        """SIGTERM and wait. Returns the exit code (None if it was not running).
        Raises if it does not exit within `timeout` (after SIGKILLing it)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.expect_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BrokerError("tidelog did not exit within %ss of SIGTERM\n%s" % (timeout, self.log_tail()))

    def kill9(self):
        """SIGKILL: the crash a power cut or OOM killer would cause (for the
        process; the page cache survives, so only the process crash is tested)."""
        assert self.alive(), "kill9 on a broker that is not running"
        self.expect_exit = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.mark_log("kill -9")

    def restart(self, timeout=START_TIMEOUT_S):
        """Clean stop (if running) and start again on the same data dir and ports."""
        if self.alive():
            rc = self.stop()
            assert rc == 0, "tidelog exited %r on SIGTERM\n%s" % (rc, self.log_tail())
        # The listening ports must come back to the same place for clients.
        return self.start(timeout)

    # -- log

    def mark_log(self, what):
        with open(self.log_path, "ab") as f:
            f.write(("\n===== test harness: %s\n" % what).encode())

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def log_since(self, offset):
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def wait_log(self, pattern, since=0, timeout=10.0):
        """The first log line after byte `since` matching `pattern`, or None."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_since(since).splitlines():
                if rx.search(line) and not line.startswith("===== test harness"):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def log_tail(self, lines=80):
        text = self.log_text().splitlines()
        return "----- %s (last %d lines) -----\n%s" % (self.log_path, lines, "\n".join(text[-lines:]))

    # -- clients

    def producer_config(self, **extra):
        cfg = {
            "bootstrap.servers": self.bootstrap,
            "acks": "all",
            "enable.idempotence": False,
            "log_level": 3,
        }
        cfg.update(extra)
        return cfg

    def consumer_config(self, **extra):
        cfg = {
            "bootstrap.servers": self.bootstrap,
            # confluent-kafka insists on a group id; the tests never subscribe
            # or commit, they assign() partitions and seek themselves.
            "group.id": "tidelog-tests-unused",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "log_level": 3,
        }
        cfg.update(extra)
        return cfg


# --------------------------------------------------------------------------
# fixtures


def find_binary():
    path = os.environ.get("TIDELOG_BIN") or os.path.join(REPO, "target", "release", "tidelog")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def binary():
    path = find_binary()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail("tidelog binary not found at %s: build it (cargo build --release) or set TIDELOG_BIN" % path)
    return path


@pytest.fixture(scope="session")
def data_root():
    return pick_data_root()


@pytest.fixture
def broker_factory(request, binary, data_root):
    made = []
    request.node._tidelog_brokers = made

    def make(args=(), shards=DEFAULT_SHARDS, start=True, env=None, log_dirs=None):
        name = "%s-%s" % (re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80], uuid.uuid4().hex[:8])
        b = Broker(binary, os.path.join(data_root, name), shards=shards, args=args, env=env, log_dirs=log_dirs)
        made.append(b)
        if start:
            b.start()
        return b

    yield make

    problems = []
    for b in made:
        if b.proc is None:
            continue
        if b.proc.poll() is not None:
            if not b.expect_exit:
                problems.append(
                    "tidelog died during the test with exit code %s\n%s" % (b.proc.returncode, b.log_tail())
                )
        else:
            try:
                rc = b.stop()
            except BrokerError as e:
                problems.append(str(e))
            else:
                if rc != 0:
                    problems.append("tidelog exited %r on SIGTERM at teardown\n%s" % (rc, b.log_tail()))
        if re.search(r"panicked at", b.log_text()):
            problems.append("tidelog panicked during the test\n%s" % b.log_tail())
    failed = getattr(request.node, "_tidelog_failed", False)
    if not problems and not failed:
        for b in made:
            shutil.rmtree(b.data_dir, ignore_errors=True)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def broker(broker_factory):
    return broker_factory()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item._tidelog_failed = True
        for b in getattr(item, "_tidelog_brokers", []):
            rep.sections.append(("tidelog log %s" % b.log_path, b.log_tail(120)))


# --------------------------------------------------------------------------
# shared client helpers


def unique_topic(prefix="t"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def create_topic(broker, name, partitions, replication_factor=1, config=None, timeout=30):
    """CreateTopics through confluent-kafka's AdminClient; raises on error."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 3})
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=config or {})],
        operation_timeout=timeout,
        request_timeout=timeout,
    )[name]
    fut.result(timeout=timeout)
    wait_topic(broker, name, partitions)


def wait_topic(broker, name, partitions, timeout=30):
    """Until Metadata on every shard shows the topic with all partitions led."""
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    last = None
    while True:
        ok = True
        for port in broker.ports:
            admin = AdminClient({"bootstrap.servers": "127.0.0.1:%d" % port, "log_level": 3})
            md = admin.list_topics(topic=name, timeout=10)
            t = md.topics.get(name)
            last = t
            if t is None or t.error is not None or len(t.partitions) != partitions or any(
                p.leader < 0 for p in t.partitions.values()
            ):
                ok = False
                break
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError("topic %s not ready with %d partitions: %r" % (name, partitions, last))
        time.sleep(0.2)
