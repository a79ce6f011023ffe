"""Network namespaces for the cluster tests: each node in its own namespace,
links between them that a test cuts and slows for real (iproute2 only: `ip`
and `tc`, no iptables).

```text
 root namespace (pytest, clients)                 router namespace  tlXXXX-r
   tlXXXXh 10.S.254.2 ──veth── tlXXXXg 10.S.254.1   ip_forward=1 (its own)
   route 10.S.0.0/16 via 10.S.254.1                 │
                                                    ├─ tlXXXXr1 10.S.1.1 ──veth── eth0 10.S.1.2  namespace tlXXXX-1 (node 1)
                                                    ├─ tlXXXXr2 10.S.2.1 ──veth── eth0 10.S.2.2  namespace tlXXXX-2 (node 2)
                                                    └─ tlXXXXr3 10.S.3.1 ──veth── eth0 10.S.3.2  namespace tlXXXX-3 (node 3)
```

Every packet between two nodes, and between a client and a node, is routed
by the router namespace, so faults are set there and nothing in the root
namespace changes but one veth and its route (no sysctl of the host is
touched: forwarding is enabled inside the router namespace only).

- `cut(a, b)`: policy rules `from A to B blackhole` (and back) in the router:
  packets between the two nodes are dropped silently (no ICMP, no reset),
  as a partitioned network does; TCP connections hang until their timeouts.
  Clients in the root namespace (source 10.S.254.2) still reach both.
- `isolate(n)`: `cut(n, m)` for every other node: alive and reachable by
  clients, cut off from its peers and from the controller quorum.
- `throttle(node, sender, port, kbit)`: the router's link towards `node`
  sends what `sender`'s `port` sends to it at `kbit` (htb class + u32 filter
  + a small byte fifo; everything else on that link is not held back).
  This kernel has no sch_netem (tc says "Specified qdisc kind is unknown"),
  so a slow link is a narrow one rather than a delayed one.
- `heal()`: undoes every cut and throttle.

Names are `tl<4 hex>-*` and the subnet 10.S.0.0/16 is one no route of the
host uses, both picked per run. `teardown()` deletes every link and
namespace it made (so its rules, qdiscs and the root route go with them)
and runs from the fixture's finalizer whatever the test did.

The fixture `net` skips the test, saying why, when namespaces cannot be made
here (not root, no CAP_NET_ADMIN, no `ip`).
"""

import os
import random
import shutil
import subprocess

import pytest

NODES = (1, 2, 3)


class NetnsUnavailable(Exception):
    pass


def run(*argv, check=True):
    """Runs one iproute2 command; returns (exit code, stderr)."""
    r = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode, (r.stderr or r.stdout).strip()))
    return r.returncode, (r.stderr or r.stdout).strip()


def _subnets_in_use():
    """Second octets of 10.x addresses the host already routes."""
    used = set()
    _, out = run("ip", "-4", "route", "show", "table", "all", check=False)
    _, addrs = run("ip", "-4", "-o", "addr", "show", check=False)
    for word in (out + " " + addrs).split():
        if word.startswith("10."):
            parts = word.split(".")
            if len(parts) > 1 and parts[1].isdigit():
                used.add(int(parts[1]))
    return used


class Net:
    """The namespaces of one test run (see the module doc)."""

    def __init__(self, nodes=NODES):
        self.nodes = tuple(nodes)
        self.tag = "tl%04x" % random.randrange(1 << 16)
        self.octet = None  # 10.<octet>.0.0/16, chosen by setup()
        self.router = "%s-r" % self.tag
        self.made_ns = []
        self.made_root_link = False
        self.cuts = {}  # (a, b) -> rule preference
        self.throttled = set()

    # -- names and addresses

    def ns(self, n):
        return "%s-%d" % (self.tag, n)

    def addr(self, n):
        """Node `n`'s address (inside its namespace)."""
        return "10.%d.%d.2" % (self.octet, n)

    def router_link(self, n):
        """The router's end of node `n`'s veth."""
        return "%sr%d" % (self.tag, n)

    def hosts(self):
        return {n: self.addr(n) for n in self.nodes}

    def prefixes(self):
        """argv prefixes that run a node's command in its namespace
        (`ip netns exec` execs it: the pid is the command's own)."""
        return {n: ["ip", "netns", "exec", self.ns(n)] for n in self.nodes}

    def __repr__(self):
        return "<net %s 10.%d.0.0/16 cuts %r throttled %r>" % (self.tag, self.octet, sorted(self.cuts), sorted(self.throttled))

    # -- building and removing

    def setup(self):
        """Creates everything; NetnsUnavailable (after undoing what was made)
        when this host does not let us."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN); running as uid %d" % os.geteuid())
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2's `ip` is not installed")
        free = sorted(set(range(100, 250)) - _subnets_in_use())
        if not free:
            raise NetnsUnavailable("no free 10.x.0.0/16 subnet among 10.100-10.249")
        self.octet = random.choice(free)
        code, err = run("ip", "netns", "add", self.router, check=False)
        if code != 0:
            raise NetnsUnavailable("`ip netns add` failed: %s" % err)
        self.made_ns.append(self.router)
        try:
            self._build()
        except RuntimeError as e:
            problems = self.teardown()
            raise NetnsUnavailable("building the namespaces failed: %s%s" % (
                e, "; teardown: %s" % "; ".join(problems) if problems else ""))
        return self

    def _build(self):
        s, r, tag = self.octet, self.router, self.tag
        ip_r = ("ip", "-n", r)
        run(*ip_r, "link", "set", "lo", "up")
        run("ip", "link", "add", tag + "h", "type", "veth", "peer", "name", tag + "g", "netns", r)
        self.made_root_link = True
        run("ip", "addr", "add", "10.%d.254.2/24" % s, "dev", tag + "h")
        run("ip", "link", "set", tag + "h", "up")
        run(*ip_r, "addr", "add", "10.%d.254.1/24" % s, "dev", tag + "g")
        run(*ip_r, "link", "set", tag + "g", "up")
        run("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for n in self.nodes:
            ns = self.ns(n)
            run("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            run(*ip_r, "link", "add", self.router_link(n), "type", "veth", "peer", "name", "eth0", "netns", ns)
            run(*ip_r, "addr", "add", "10.%d.%d.1/24" % (s, n), "dev", self.router_link(n))
            run(*ip_r, "link", "set", self.router_link(n), "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", "%s/24" % self.addr(n), "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "route", "add", "default", "via", "10.%d.%d.1" % (s, n))
        run("ip", "route", "add", "10.%d.0.0/16" % s, "via", "10.%d.254.1" % s)

    def teardown(self):
        """Removes every link and namespace this run made (rules, qdiscs and
        the root route go with them). Returns the problems, if any."""
        problems = []
        if self.made_root_link:
            code, err = run("ip", "link", "del", self.tag + "h", check=False)
            if code != 0 and "Cannot find" not in err:
                problems.append("ip link del %sh: %s" % (self.tag, err))
            self.made_root_link = False
        for ns in reversed(self.made_ns):
            code, err = run("ip", "netns", "del", ns, check=False)
            if code != 0:
                problems.append("ip netns del %s: %s" % (ns, err))
        self.made_ns = []
        self.cuts.clear()
        self.throttled.clear()
        _, left = run("ip", "netns", "list", check=False)
        if self.tag in left:
            problems.append("namespaces still listed after teardown: %s" % left)
        return problems

    # -- faults

    def cut(self, a, b):
        """Drops every packet between nodes `a` and `b`, both ways, silently."""
        for src, dst in ((a, b), (b, a)):
            if (src, dst) in self.cuts:
                continue
            pref = 1000 + 10 * src + dst
            run("ip", "-n", self.router, "rule", "add", "from", self.addr(src), "to", self.addr(dst),
                "blackhole", "pref", str(pref))
            self.cuts[(src, dst)] = pref

    def isolate(self, n):
        """Cuts node `n` off from every other node; clients still reach it."""
        for m in self.nodes:
            if m != n:
                self.cut(n, m)

    def throttle(self, node, sender, port, kbit):
        """What node `sender` sends from TCP `port` to node `node` goes at
        `kbit` kbit/s through a fifo of 64 KiB (TCP sees a narrow link that
        drops when full); the rest of `node`'s traffic is not held back."""
        dev = self.router_link(node)
        tc = ("tc", "-n", self.router)
        run(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        self.throttled.add(node)
        run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
        run(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb",
            "rate", "%dkbit" % kbit, "ceil", "%dkbit" % kbit, "burst", "16k", "cburst", "16k")
        run(*tc, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "bfifo", "limit", "65536")
        run(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "src", "%s/32" % self.addr(sender), "match", "ip", "sport", str(port), "0xffff",
            "flowid", "1:20")

    def unthrottle(self, node):
        if node in self.throttled:
            run("tc", "-n", self.router, "qdisc", "del", "dev", self.router_link(node), "root")
            self.throttled.discard(node)

    def heal(self):
        """Undoes every cut and throttle."""
        for (src, dst), pref in sorted(self.cuts.items()):
            run("ip", "-n", self.router, "rule", "del", "pref", str(pref))
        self.cuts.clear()
        for node in sorted(self.throttled):
            self.unthrottle(node)


@pytest.fixture
def net():
    """A `Net`, set up; skips the test (with the reason) where namespaces
    cannot be made; everything is removed at the end, even on failure."""
    try:
        n = Net().setup()
    except NetnsUnavailable as e:
        pytest.skip("network namespaces unavailable: %s" % e)
    try:
        yield n
    finally:
        problems = n.teardown()
        if problems:
            pytest.fail("netns teardown: %s" % "; ".join(problems), pytrace=False)
