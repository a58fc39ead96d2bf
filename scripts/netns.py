"""Network namespaces, veth pairs, bridges and traffic shaping on pyroute2:
the one network harness of the multi-node tests (tests/support/netlib.py)
and of the replication benchmark (scripts/bench_replication.py).

Small pieces that compose; everything made through a Lab is removed by
Lab.close() (a context manager), whatever happened in between:

    with netns.Lab() as lab:
        ns = lab.namespace()                      # a fresh netns, lo up
        host_end, ns_end = lab.veth(netns.HOST, ns,
                                    "10.213.0.1/24", "10.213.0.2/24")
        ns_end.shape(delay_ms=5)                  # netem (raises NoNetem)
        ns_end.shape(rate_mbit=50)                # netem rate, else tbf
        ns_end.clear()
        proc = ns.popen(["qemu-nbd", ...])        # runs inside ns
        netns.tcp_rtt("10.213.0.2", 7000)         # a ping over TCP

A Namespace and HOST (the root namespace) offer the same calls; a Link is
one interface in one of them.  Processes enter a namespace by setns(2) in
the child before exec (so the Popen's pid is the program's own), never
through `ip netns exec`.  Traffic only ever goes to addresses of the Lab's
own namespaces and links.
"""

import contextlib
import itertools
import os
import socket
import subprocess
import time

from pyroute2 import IPRoute, NetlinkError, NetNS
from pyroute2 import netns as _netns

ROOT_HANDLE = 0x10000           # "1:" - the root qdisc this module installs


class NoNetem(Exception):
    """The kernel has no sch_netem: no added delay or loss here."""


def available():
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        _netns.listnetns()
    except OSError as e:
        return "no network namespaces: {}".format(e)
    return None


def names():
    """The names of all named network namespaces (like `ip netns list`)."""
    return sorted(_netns.listnetns())


_counter = itertools.count()


def unique(prefix):
    """A name no one else uses: prefix, this process's pid, a counter
    (short: interface names have at most 15 characters)."""
    return "{}{}x{}".format(prefix, os.getpid() % 100000, next(_counter))


class _Where:
    """What a namespace and the root namespace have in common."""

    name = None

    def ipr(self):
        raise NotImplementedError

    @contextlib.contextmanager
    def _ipr(self):
        ipr = self.ipr()
        try:
            yield ipr
        finally:
            ipr.close()

    def link(self, ifname):
        return Link(self, ifname)

    def blackhole(self, dst, on=True):
        """Drop packets to dst (an address) silently, or stop dropping."""
        with self._ipr() as ipr:
            try:
                ipr.route("add" if on else "del", dst=dst + "/32",
                          type="blackhole")
            except NetlinkError:
                if on:
                    raise

    def preexec(self):
        """Run in a child before exec: enter this namespace."""

    def popen(self, cmd, preexec_fn=None, **kwargs):
        """subprocess.Popen of cmd inside this namespace (preexec_fn, if
        given, runs after entering it)."""
        def enter():
            self.preexec()
            if preexec_fn is not None:
                preexec_fn()
        return subprocess.Popen([str(c) for c in cmd], preexec_fn=enter,
                                **kwargs)

    def run(self, cmd, check=True, timeout=60, **kwargs):
        """subprocess.run of cmd inside this namespace; output captured."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run([str(c) for c in cmd], preexec_fn=self.preexec,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError("{} failed ({}) in {}: {}".format(
                " ".join(map(str, cmd)), proc.returncode, self,
                proc.stderr))
        return proc


class Host(_Where):
    """The root network namespace."""

    def ipr(self):
        return IPRoute()

    def __str__(self):
        return "the root namespace"


HOST = Host()


class Namespace(_Where):
    """A named network namespace, made with loopback up; remove() (or the
    Lab that made it) deletes it and every interface in it."""

    def __init__(self, name):
        self.name = name
        _netns.create(name)
        try:
            self.link("lo").up()
        except BaseException:
            self.remove()
            raise

    def ipr(self):
        return NetNS(self.name)

    def preexec(self):
        _netns.setns(self.name, flags=0)

    def remove(self):
        if self.name in _netns.listnetns():
            _netns.remove(self.name)

    def __str__(self):
        return "netns " + self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Link:
    """One network interface (ifname) in a namespace or the root one."""

    def __init__(self, where, ifname):
        self.where = where
        self.ifname = ifname

    def __str__(self):
        return "{} in {}".format(self.ifname, self.where)

    def _index(self, ipr):
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise RuntimeError("no interface {}".format(self))
        return found[0]

    def _set(self, **kwargs):
        with self.where._ipr() as ipr:
            ipr.link("set", index=self._index(ipr), **kwargs)

    def up(self):
        self._set(state="up")
        return self

    def down(self):
        self._set(state="down")
        return self

    def is_up(self):
        """True if the link is administratively up (IFF_UP)."""
        with self.where._ipr() as ipr:
            return bool(ipr.get_links(self._index(ipr))[0]["flags"] & 1)

    def add_address(self, cidr):
        """Give the link an address, "10.1.2.3/24"."""
        address, prefixlen = cidr.split("/")
        with self.where._ipr() as ipr:
            ipr.addr("add", index=self._index(ipr), address=address,
                     prefixlen=int(prefixlen))
        return self

    def addresses(self):
        """The link's IPv4 addresses as "a.b.c.d/n"."""
        with self.where._ipr() as ipr:
            return ["{}/{}".format(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(index=self._index(ipr), family=2)]

    def set_master(self, bridge):
        """Enslave this link to a bridge Link in the same namespace."""
        with self.where._ipr() as ipr:
            ipr.link("set", index=self._index(ipr),
                     master=bridge._index(ipr))
        return self

    def delete(self):
        with self.where._ipr() as ipr:
            found = ipr.link_lookup(ifname=self.ifname)
            if found:
                ipr.link("del", index=found[0])

    # Traffic shaping of what leaves through this link.

    def shape(self, delay_ms=0, rate_mbit=None, loss_pct=0, limit=10000):
        """Replace the link's root qdisc: netem with the added delay, rate
        and random loss given.  Without netem in the kernel, a rate alone
        is shaped by tbf; a delay or a loss raises NoNetem.  Return what
        was applied, in words."""
        rate = "{}mbit".format(rate_mbit) if rate_mbit else None
        with self.where._ipr() as ipr:
            index = self._index(ipr)
            kwargs = {"delay": int(delay_ms * 1000), "loss": loss_pct,
                      "limit": limit}
            if rate:
                kwargs["rate"] = rate
            try:
                ipr.tc("replace", "netem", index, ROOT_HANDLE, **kwargs)
                return "netem delay {}ms rate {} loss {}%".format(
                    delay_ms, rate or "unlimited", loss_pct)
            except NetlinkError as e:
                no_netem = "no sch_netem in kernel {} ({})".format(
                    os.uname().release, e)
            if delay_ms or loss_pct or not rate:
                raise NoNetem(no_netem)
            ipr.tc("replace", "tbf", index, ROOT_HANDLE, rate=rate,
                   burst=256 << 10, latency="100ms")
            return "tbf rate {} ({})".format(rate, no_netem)

    def qdisc(self):
        """The kind of the link's root qdisc ("netem", "tbf", "noqueue")."""
        with self.where._ipr() as ipr:
            index = self._index(ipr)
            for q in ipr.get_qdiscs(index):
                if q["parent"] == 0xFFFFFFFF:
                    return q.get_attr("TCA_KIND")
        return None

    def clear(self):
        """Remove the shaping (back to the default qdisc)."""
        with self.where._ipr() as ipr:
            try:
                ipr.tc("del", index=self._index(ipr), handle=ROOT_HANDLE)
            except NetlinkError:
                pass                # nothing installed
        return self


def netem_available():
    """None if netem works here, else why not (probed in a scratch
    namespace)."""
    with Lab() as lab:
        try:
            lab.namespace().link("lo").shape(delay_ms=1)
        except NoNetem as e:
            return str(e)
    return None


def tcp_rtt(address, port, count=5, timeout=5.0):
    """Round-trip times (seconds) of `count` TCP connects to address:port
    from this process's namespace: a SYN and its SYN-ACK, or RST if
    nothing listens there, so one round trip each, like ping."""
    out = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            s.connect((address, port))
        except ConnectionRefusedError:
            pass
        finally:
            out.append(time.monotonic() - t0)
            s.close()
    return out


class Lab:
    """Namespaces, bridges and veth pairs that are all removed by close()
    (also as a context manager, and on errors while being made)."""

    def __init__(self, prefix="cln"):
        self.prefix = prefix
        self.namespaces = []
        self.host_links = []        # root-namespace interfaces made here

    def namespace(self):
        ns = Namespace(unique(self.prefix))
        self.namespaces.append(ns)
        return ns

    def bridge(self, cidr=None):
        """A bridge in the root namespace, up, with an address."""
        name = unique(self.prefix + "b")
        with HOST._ipr() as ipr:
            ipr.link("add", ifname=name, kind="bridge")
        br = HOST.link(name)
        self.host_links.append(br)
        if cidr:
            br.add_address(cidr)
        return br.up()

    def veth(self, a, b, a_cidr=None, b_cidr=None):
        """A veth pair between a and b (HOST or Namespaces), both ends up
        and addressed; return (end in a, end in b)."""
        base = unique(self.prefix)
        a_name, b_name = base + "a", base + "b"
        with HOST._ipr() as ipr:
            ipr.link("add", ifname=a_name, kind="veth", peer=b_name)
            # Deleting one end deletes both; a namespace's removal deletes
            # the ends in it.
            self.host_links.append(HOST.link(a_name))
            for name, where in ((a_name, a), (b_name, b)):
                if where is not HOST:
                    idx = ipr.link_lookup(ifname=name)[0]
                    ipr.link("set", index=idx, net_ns_fd=where.name)
        ends = (a.link(a_name), b.link(b_name))
        for end, cidr in zip(ends, (a_cidr, b_cidr)):
            if cidr:
                end.add_address(cidr)
            end.up()
        return ends

    def close(self):
        for link in reversed(self.host_links):
            with contextlib.suppress(Exception):
                link.delete()
        self.host_links.clear()
        errors = []
        for ns in reversed(self.namespaces):
            try:
                ns.remove()
            except Exception as e:     # keep removing the others
                errors.append("{}: {}".format(ns, e))
        self.namespaces.clear()
        if errors:
            raise RuntimeError("namespaces not removed: " + "; ".join(errors))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
