"""Cluster harness: three tidelog nodes on one host, started the way
`scripts/cluster` starts them.

Node N runs `tidelog --config config/cluster/node-N.properties` with flags
for what must differ per test run: `log.dirs` (a fresh dir under the tests'
data root), `num.shards`, `listeners` (client and CONTROLLER ports),
`controller.quorum.voters` and `metrics.listeners`, all on free ports, plus
the test timings (`broker.session.timeout.ms=3000`, heartbeats every 500 ms).
Each node is a `conftest.Broker` (same process control, log file, log tail
on failure), so it behaves like the single-node brokers of the other tests.

Fixtures (import them into the test module):
  cluster_factory  call it to get a `Cluster` (started unless start=False);
                   every process it ran is checked and stopped at teardown
  cluster          a started 3-node cluster, one shard per node

At teardown every node still running gets SIGTERM (all at once, as
`scripts/cluster stop` does) and must exit 0; a node that died on its own
(not through `kill9`/`stop`), or a panic in any log, fails the test. The logs
of every node are attached to a failure. A passing test deletes its dirs.

The tests skip, saying why, when the binary has no cluster mode (its
`--help` lists no `controller.quorum.voters`).

Nodes elsewhere than 127.0.0.1 (tests/netns.py puts each in its own network
namespace): `hosts` {node: address} is where a node listens, advertises and
is reached (its voter address too), and `prefixes` {node: [argv...]} goes in
front of its command line (`ip netns exec NS`, which execs the broker, so the
process the harness signals is still the broker itself).
"""

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

import kafka_wire as kw
from conftest import REPO, START_TIMEOUT_S, STOP_TIMEOUT_S, Broker, BrokerError, pick_ports

CONFIG_DIR = os.path.join(REPO, "config", "cluster")
SCRIPT = os.path.join(REPO, "scripts", "cluster")
NODE_IDS = (1, 2, 3)
BROKER_IDS_PER_NODE = 1000

# Test timings: fencing after 3 s keeps the fault tests short.
SESSION_TIMEOUT_MS = 3000
HEARTBEAT_INTERVAL_MS = 500
TEST_ARGS = (
    "--broker.session.timeout.ms=%d" % SESSION_TIMEOUT_MS,
    "--broker.heartbeat.interval.ms=%d" % HEARTBEAT_INTERVAL_MS,
)

# What a node logs once its registration is committed (scripts/cluster waits
# for the same line).
REGISTERED_LINE = r"node \d+: registered with the controller quorum"

# Kafka error codes the cluster tests look for.
REQUEST_TIMED_OUT = 7
TOPIC_ALREADY_EXISTS = 36
INVALID_REPLICATION_FACTOR = 38


# --------------------------------------------------------------------------
# ids and config files


def broker_id(node, shard=0):
    return node * BROKER_IDS_PER_NODE + shard


def node_of(broker):
    return broker // BROKER_IDS_PER_NODE


def node_config(n):
    return os.path.join(CONFIG_DIR, "node-%d.properties" % n)


def read_properties(path):
    """{name: value} with the broker's rules: `#` and `!` start comments,
    the first `=` or `:` separates name and value."""
    out = {}
    with open(path) as f:
        for i, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line[0] in "#!":
                continue
            m = re.match(r"([^=:]*)[=:](.*)", line)
            if m is None:
                raise ValueError("%s:%d: expected name=value, got %r" % (path, i, line))
            name = m.group(1).strip()
            if name in out:
                raise ValueError("%s:%d: %s set twice" % (path, i, name))
            out[name] = m.group(2).strip()
    return out


def parse_voters(value):
    """`1@host:port,...` -> {1: (host, port)}."""
    out = {}
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)@([^:]+):(\d+)\s*", part)
        if m is None:
            raise ValueError("bad voter %r in %r" % (part, value))
        out[int(m.group(1))] = (m.group(2), int(m.group(3)))
    return out


def parse_listeners(value):
    """`NAME://host:port,...` -> {NAME: (host, port)}."""
    out = {}
    for part in value.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]+)://([^:]*):(\d+)\s*", part)
        if m is None:
            raise ValueError("bad listener %r in %r" % (part, value))
        out[m.group(1).upper()] = (m.group(2), int(m.group(3)))
    return out


_capable = {}


def cluster_capable(binary):
    """True when `binary --help` lists controller.quorum.voters."""
    if binary not in _capable:
        try:
            r = subprocess.run([binary, "--help"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            _capable[binary] = b"controller.quorum.voters" in r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _capable[binary] = False
    return _capable[binary]


def require_cluster_mode(binary):
    if not cluster_capable(binary):
        pytest.skip("%s has no cluster mode yet: its --help lists no controller.quorum.voters" % binary)


def node_cpus(index, shards):
    """CPUs for the node at 1-based `index`, as scripts/cluster picks them:
    its shards on their own CPUs, round robin when there are fewer CPUs
    (the broker pins shard i to the i-th CPU of its affinity mask)."""
    cpus = sorted(os.sched_getaffinity(0))
    out = []
    for s in range(shards):
        c = cpus[((index - 1) * shards + s) % len(cpus)]
        if c not in out:
            out.append(c)
    return out


# --------------------------------------------------------------------------
# raw requests to one port (no client-side routing: exactly that node answers)


def metadata(port, topics=None, version=8, timeout=10.0, host="127.0.0.1"):
    """Metadata v8 from the broker at `host`:`port`: {"brokers": [(id, host, port, rack)],
    "cluster_id", "controller", "topics": [kafka_wire.MetadataTopic]}."""
    with kw.Conn(port, host=host, timeout=timeout) as c:
        return kw.metadata(c, version, topics, allow_auto_topic_creation=False)


def topic_partitions(md, name):
    """{partition: kafka_wire.MetadataPartition} of topic `name` in a
    metadata() answer, or None when the topic is absent or has an error."""
    for t in md["topics"]:
        if t.name == name:
            if t.error_code != 0:
                return None
            return {p.index: p for p in t.partitions}
    return None


def create_topics_body(topics, timeout_ms, validate_only=False):
    """CreateTopics v4 body. `topics`: [(name, partitions, replication factor)]
    or [(name, partitions, rf, {config: value})]."""

    def topic(t):
        name, partitions, rf = t[:3]
        configs = t[3] if len(t) > 3 else {}
        return (
            kw.string(name)
            + kw.i32(partitions)
            + kw.i16(rf)
            + kw.i32(0)  # no manual assignments
            + kw.array(sorted(configs.items()), lambda kv: kw.string(kv[0]) + kw.nullable_string(kv[1]))
        )

    return kw.array(topics, topic) + kw.i32(timeout_ms) + kw.i8(1 if validate_only else 0)


def parse_create_topics_v4(r):
    """{name: (error code, error message)}."""
    r.i32()  # throttle_time_ms
    return {name: (code, msg) for name, code, msg in r.array(lambda rr: (rr.string(), rr.i16(), rr.string()))}


def create_topics_raw(port, topics, timeout_ms=30000, validate_only=False, socket_timeout=None, host="127.0.0.1"):
    """CreateTopics v4 sent to exactly the broker at `host`:`port` (clients
    send it to the controller; this checks that any node takes it). Returns
    {name: (error code, error message)}."""
    timeout = socket_timeout if socket_timeout is not None else timeout_ms / 1000.0 + 30
    with kw.Conn(port, host=host, timeout=timeout) as c:
        r = c.request(kw.CREATE_TOPICS, 4, create_topics_body(topics, timeout_ms, validate_only))
        return parse_create_topics_v4(r)


# --------------------------------------------------------------------------
# one node


class Node(Broker):
    """One tidelog process of the cluster (a conftest.Broker: same log, stop,
    kill9, client configs; `bootstrap` is this node's shard 0 only)."""

    def __init__(self, binary, data_dir, node_id, port, controller_port, metrics_port, voters,
                 shards=1, args=(), env=None, config_file=None, roles=None, cpu_index=None,
                 host="127.0.0.1", prefix=()):
        super().__init__(binary, data_dir, port=port, shards=shards, args=args, env=env)
        self.node_id = node_id
        self.host = host  # where it listens, advertises and is reached
        self.prefix = list(prefix)  # argv in front of its command (e.g. ip netns exec NS)
        self.controller_port = controller_port  # None: no CONTROLLER listener
        self.metrics_port = metrics_port
        self.voters = voters
        self.config_file = config_file or node_config(node_id)
        self.roles = roles  # None: process.roles from the config file
        self.cpu_index = cpu_index if cpu_index is not None else node_id
        # Set before start to advertise another port (a proxy in front of
        # this node) in advertised.listeners; None: the listener's own.
        self.advertised_port = None

    def __repr__(self):
        return "<node %d pid %s port %d>" % (self.node_id, self.proc.pid if self.proc else None, self.port)

    @property
    def bootstrap(self):
        return "%s:%d" % (self.host, self.port)

    @property
    def broker_ids(self):
        return [broker_id(self.node_id, s) for s in range(self.shards)]

    @property
    def advertised(self):
        """[(broker id, host, port)] as Metadata should list this node."""
        port = self.advertised_port if self.advertised_port is not None else self.port
        return [(broker_id(self.node_id, s), self.host, port + s) for s in range(self.shards)]

    def listeners(self):
        value = "PLAINTEXT://%s:%d" % (self.host, self.port)
        if self.controller_port is not None:
            value += ",CONTROLLER://%s:%d" % (self.host, self.controller_port)
        return value

    def accepts(self, port):
        try:
            with socket.create_connection((self.host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def command(self):
        cmd = list(self.prefix)
        if shutil.which("taskset"):
            cmd += ["taskset", "-c", ",".join(map(str, node_cpus(self.cpu_index, self.shards)))]
        cmd += [
            self.binary,
            "--config", self.config_file,
            "--log.dirs=%s" % self.log_dirs,
            "--num.shards=%d" % self.shards,
            "--listeners=%s" % self.listeners(),
            "--controller.quorum.voters=%s" % self.voters,
            "--metrics.listeners=%s:%d" % (self.host, self.metrics_port),
        ]
        if self.roles is not None:
            cmd.append("--process.roles=%s" % self.roles)
        if self.advertised_port is not None:
            cmd.append("--advertised.listeners=PLAINTEXT://%s:%d" % (self.host, self.advertised_port))
        return cmd + self.args

    def check_running(self, what):
        if self.proc.poll() is not None:
            raise BrokerError("node %d exited with %s %s\n%s" % (self.node_id, self.proc.returncode, what, self.log_tail()))

    def wait_ready(self, timeout=START_TIMEOUT_S):
        """Every shard port accepts, this run of the node logged that it
        registered with the controller quorum, and its own Metadata lists its
        brokers. (Its Metadata alone is not enough: a restarted node lists
        itself from its stored image before it registers, and one restarted
        right after a crash waits out the old process's session first.)"""
        deadline = time.monotonic() + timeout
        while not all(self.accepts(p) for p in self.ports):
            self.check_running("during startup")
            if time.monotonic() > deadline:
                raise BrokerError("node %d ports %r not accepting after %ss\n%s" % (self.node_id, self.ports, timeout, self.log_tail()))
            time.sleep(0.1)
        while self.wait_log(REGISTERED_LINE, since=self.start_mark, timeout=0) is None:
            self.check_running("during startup")
            if time.monotonic() > deadline:
                raise BrokerError("node %d: no %r log line after %ss\n%s" % (self.node_id, REGISTERED_LINE, timeout, self.log_tail()))
            time.sleep(0.1)
        last = None
        while True:
            self.check_running("during startup")
            try:
                md = metadata(self.port, topics=[], timeout=5, host=self.host)
                ids = {b[0] for b in md["brokers"]}
                if set(self.broker_ids) <= ids:
                    return self
                last = "its Metadata lists brokers %r" % (md["brokers"],)
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                last = repr(e)
            if time.monotonic() > deadline:
                raise BrokerError("node %d not registered after %ss: %s\n%s" % (self.node_id, timeout, last, self.log_tail()))
            time.sleep(0.2)

    def run_to_exit(self, timeout=60):
        """Starts a process that is expected to exit by itself (refused start).
        Returns (exit code, its log output of this run)."""
        self.spawn()
        self.expect_exit = True
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("node.id %d process still running after %ss (expected it to exit)\n%s"
                                 % (self.node_id, timeout, self.log_tail()))
        out = self.log_since(self.start_mark)
        # Without the harness's own line (it echoes the command line).
        return rc, "\n".join(l for l in out.splitlines() if not l.startswith("===== test harness"))


# --------------------------------------------------------------------------
# the cluster


class Cluster:
    """Three nodes (`NODE_IDS`) on free ports under `root`."""

    def __init__(self, binary, root, shards=1, args=(), env=None, register=None, hosts=None, prefixes=None):
        self.binary = binary
        self.root = root
        self.shards = shards
        self.args = list(TEST_ARGS) + list(args)
        self.env = env
        self.register = register or (lambda proc: None)
        self.hosts = {n: (hosts or {}).get(n, "127.0.0.1") for n in NODE_IDS}
        self.controller_ports = {n: pick_ports(1) for n in NODE_IDS}
        self.voters = ",".join("%d@%s:%d" % (n, self.hosts[n], self.controller_ports[n]) for n in NODE_IDS)
        self.nodes = {}
        self.extra = []
        for n in NODE_IDS:
            node = Node(
                binary,
                os.path.join(root, "node-%d" % n),
                n,
                port=pick_ports(shards),
                controller_port=self.controller_ports[n],
                metrics_port=pick_ports(1),
                voters=self.voters,
                shards=shards,
                args=self.args,
                env=env,
                host=self.hosts[n],
                prefix=(prefixes or {}).get(n, ()),
            )
            self.nodes[n] = node
            self.register(node)

    def __getitem__(self, n):
        return self.nodes[n]

    def node(self, n):
        return self.nodes[n]

    def __repr__(self):
        return "<cluster %s>" % " ".join(repr(n) for n in self.nodes.values())

    # -- addresses and client configs (duck-types conftest.Broker for clients.py)

    @property
    def live(self):
        """Node ids whose process is running."""
        return [n for n, node in self.nodes.items() if node.alive()]

    @property
    def bootstrap(self):
        return ",".join(self.nodes[n].bootstrap for n in NODE_IDS)

    def bootstrap_of(self, nodes):
        return ",".join(self.nodes[n].bootstrap for n in nodes)

    def producer_config(self, **extra):
        return Broker.producer_config(self, **extra)

    def consumer_config(self, **extra):
        return Broker.consumer_config(self, **extra)

    def admin(self, nodes=None):
        """confluent AdminClient bootstrapped from `nodes` (default: the live ones)."""
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_of(nodes or self.live), "log_level": 3})

    def advertised(self, nodes=None):
        """Sorted [(broker id, host, port)] of `nodes` (default: the live ones)."""
        return sorted(b for n in (nodes or self.live) for b in self.nodes[n].advertised)

    # -- process control

    def start(self, n=None, timeout=START_TIMEOUT_S):
        """Starts node `n` (or every node not running), waits until it is
        registered and every running node lists every running node."""
        todo = [n] if n is not None else [k for k in NODE_IDS if not self.nodes[k].alive()]
        deadline = time.monotonic() + timeout
        for k in todo:
            self.nodes[k].spawn()
        for k in todo:
            self.nodes[k].wait_ready(max(1.0, deadline - time.monotonic()))
        self.wait_brokers(timeout=max(1.0, deadline - time.monotonic()))
        return self

    def stop(self, n=None, timeout=STOP_TIMEOUT_S):
        """SIGTERM node `n` (or every running node, all at once) and wait.
        Each must exit 0 within `timeout`; returns {node: seconds it took}."""
        todo = [n] if n is not None else self.live
        took, started = {}, time.monotonic()
        for k in todo:
            node = self.nodes[k]
            assert node.alive(), "stop(%d): node is not running" % k
            node.expect_exit = True
            node.proc.send_signal(signal.SIGTERM)
        problems = []
        for k in todo:
            node = self.nodes[k]
            try:
                rc = node.proc.wait(max(0.1, started + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
                problems.append("node %d did not exit within %ss of SIGTERM\n%s" % (k, timeout, node.log_tail()))
                continue
            took[k] = time.monotonic() - started
            node.mark_log("SIGTERM: exit %s after %.1fs" % (rc, took[k]))
            if rc != 0:
                problems.append("node %d exited %r on SIGTERM\n%s" % (k, rc, node.log_tail()))
        if problems:
            raise BrokerError("\n\n".join(problems))
        return took

    def kill9(self, n):
        self.nodes[n].kill9()

    # -- waiting on what the cluster says

    def metadata(self, n, topics=None, timeout=10.0):
        return metadata(self.nodes[n].port, topics=topics, timeout=timeout, host=self.nodes[n].host)

    def wait_brokers(self, count=None, via=None, nodes=None, timeout=START_TIMEOUT_S):
        """Until Metadata from each node in `via` (default: the running ones)
        lists exactly the brokers of `nodes` (default: the running ones) with
        their ports; `count`, if given, is checked against that. Returns
        {node: metadata} of the last round."""
        nodes = list(nodes or self.live)
        via = list(via or self.live)
        want = self.advertised(nodes)
        if count is not None:
            assert count == len(want), "wait_brokers(%d) but nodes %r have %d brokers" % (count, nodes, len(want))
        deadline = time.monotonic() + timeout
        while True:
            got, last = {}, {}
            for n in via:
                self.nodes[n].check_running("while waiting for brokers %r" % (want,))
                try:
                    md = self.metadata(n, topics=[], timeout=5)
                except Exception as e:  # noqa: BLE001 - retried until the deadline
                    last[n] = repr(e)
                    continue
                have = sorted((b[0], b[1], b[2]) for b in md["brokers"])
                last[n] = have
                if have == want:
                    got[n] = md
            if len(got) == len(via):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    "after %ss Metadata does not list exactly %r\nper node: %r" % (timeout, want, last)
                )
            time.sleep(0.2)

    def controller(self, via=None, timeout=30):
        """The controller broker id that every node in `via` (default: the
        running ones) reports, once they agree."""
        via = list(via or self.live)
        deadline = time.monotonic() + timeout
        while True:
            seen = {}
            for n in via:
                try:
                    seen[n] = self.metadata(n, topics=[], timeout=5)["controller"]
                except Exception as e:  # noqa: BLE001
                    seen[n] = repr(e)
            values = set(seen.values())
            if len(values) == 1:
                (c,) = values
                if isinstance(c, int) and c >= 0 and node_of(c) in via:
                    return c
            if time.monotonic() > deadline:
                raise AssertionError("nodes do not agree on a running controller after %ss: %r" % (timeout, seen))
            time.sleep(0.2)

    def cluster_id(self, via=None, timeout=30):
        """The non-empty cluster id every node in `via` (default: the running
        ones) reports, once they agree."""
        via = list(via or self.live)

        def agreed():
            ids = {self.metadata(n, topics=[], timeout=5)["cluster_id"] for n in via}
            return next(iter(ids)) if len(ids) == 1 else None  # "" (no id yet) is false too

        return wait_until("nodes %r agree on a non-empty cluster id" % via, agreed, timeout=timeout)

    def wait_topic(self, name, partitions, via=None, timeout=30, led_by=None):
        """Until every node in `via` (default: the running ones) shows topic
        `name` with `partitions` partitions, each led by a broker of a node in
        `led_by` (default: the running ones), and all agree on leaders,
        epochs and replicas. Returns {partition: MetadataPartition}."""
        via = list(via or self.live)
        led_by = set(led_by or self.live)
        deadline = time.monotonic() + timeout
        while True:
            views, last = [], {}
            for n in via:
                try:
                    md = self.metadata(n, topics=[name], timeout=5)
                except Exception as e:  # noqa: BLE001
                    last[n] = repr(e)
                    continue
                parts = topic_partitions(md, name)
                last[n] = parts if parts is not None else md["topics"]
                if (
                    parts is not None
                    and sorted(parts) == list(range(partitions))
                    and all(p.leader >= 0 and node_of(p.leader) in led_by for p in parts.values())
                ):
                    views.append({i: (p.leader, p.leader_epoch, p.replicas) for i, p in parts.items()})
                    if len(views) == 1:
                        first = parts
            if len(views) == len(via) and all(v == views[0] for v in views):
                return first
            if time.monotonic() > deadline:
                raise AssertionError(
                    "topic %s not seen with %d partitions led by nodes %r on nodes %r after %ss: %r"
                    % (name, partitions, sorted(led_by), via, timeout, last)
                )
            time.sleep(0.2)

    # -- extra processes

    def extra_node(self, node_id, config_from=None, roles=None, controller=False, args=(), shards=None):
        """Another process (not started) with `node_id`, node `config_from`'s
        config file, its own data dir and ports, the cluster's voters."""
        config_from = config_from or (node_id if node_id in NODE_IDS else 1)
        shards = shards or self.shards
        node = Node(
            self.binary,
            os.path.join(self.root, "extra-%d-%s" % (node_id, uuid.uuid4().hex[:6])),
            node_id,
            port=pick_ports(shards),
            controller_port=pick_ports(1) if controller else None,
            metrics_port=pick_ports(1),
            voters=self.voters,
            shards=shards,
            args=self.args + ["--node.id=%d" % node_id] + list(args),
            env=self.env,
            config_file=node_config(config_from),
            roles=roles,
            cpu_index=config_from,
        )
        self.extra.append(node)
        self.register(node)
        return node

    @property
    def processes(self):
        return list(self.nodes.values()) + self.extra


# --------------------------------------------------------------------------
# fixtures


def _teardown_problems(cluster):
    problems = []
    for p in cluster.processes:
        if p.proc is not None and p.proc.poll() is not None and not p.expect_exit:
            problems.append(
                "node.id %d died during the test with exit code %s\n%s" % (p.node_id, p.proc.returncode, p.log_tail())
            )
    running = [n for n in cluster.live]
    if running:
        try:
            cluster.stop()
        except BrokerError as e:
            problems.append("at teardown: %s" % e)
    for p in cluster.extra:
        if p.alive():
            try:
                rc = p.stop()
            except BrokerError as e:
                problems.append(str(e))
            else:
                if rc != 0:
                    problems.append("extra node.id %d exited %r on SIGTERM\n%s" % (p.node_id, rc, p.log_tail()))
    for p in cluster.processes:
        if re.search(r"panicked at", p.log_text()):
            problems.append("node.id %d panicked during the test\n%s" % (p.node_id, p.log_tail()))
    return problems


@pytest.fixture
def cluster_factory(request, binary, data_root):
    require_cluster_mode(binary)
    made = []
    # conftest's report hook attaches the log tail of every process in this list.
    procs = getattr(request.node, "_tidelog_brokers", None)
    if procs is None:
        procs = []
        request.node._tidelog_brokers = procs

    def make(shards=1, args=(), start=True, env=None, hosts=None, prefixes=None):
        name = "%s-%s" % (re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80], uuid.uuid4().hex[:8])
        c = Cluster(binary, os.path.join(data_root, name), shards=shards, args=args, env=env, register=procs.append,
                    hosts=hosts, prefixes=prefixes)
        made.append(c)
        if start:
            c.start()
        return c

    yield make

    problems = []
    for c in made:
        problems += _teardown_problems(c)
    failed = getattr(request.node, "_tidelog_failed", False)
    if not problems and not failed:
        for c in made:
            shutil.rmtree(c.root, ignore_errors=True)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory()


# --------------------------------------------------------------------------
# small client helpers


def wait_until(what, check, timeout=30, interval=0.2):
    """Calls `check()` until it returns a true value (returned) or `timeout`
    passes (AssertionError naming `what` and the last value or exception)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = check()
            if v:
                return v
            last = v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        if time.monotonic() > deadline:
            raise AssertionError("%s: not true after %ss; last: %r" % (what, timeout, last))
        time.sleep(interval)


def create_topic(cluster, name, partitions, replication_factor, nodes=None, config=None, timeout=30):
    """CreateTopics through confluent's AdminClient (it sends it to the
    controller) bootstrapped from `nodes`; raises on error; waits until every
    running node shows the topic led."""
    from confluent_kafka.admin import NewTopic

    admin = cluster.admin(nodes)
    fut = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=config or {})],
        operation_timeout=timeout,
        request_timeout=timeout,
    )[name]
    fut.result(timeout=timeout + 10)
    return cluster.wait_topic(name, partitions)


def leaders_by_node(parts):
    """Counter {node: partitions it leads}."""
    return collections.Counter(node_of(p.leader) for p in parts.values())
