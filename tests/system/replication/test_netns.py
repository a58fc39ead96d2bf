"""The network harness of the multi-node tests and the replication
benchmark (scripts/netns.py): namespaces, veth pairs, addresses, shaping,
processes inside a namespace, and removal of all of it whatever happens."""

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support.cli import REPO
from tests.support.netlib import netns

# A TCP sink inside a namespace: accept one connection, read to EOF, reply
# with the byte count, exit.
SINK = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 0))
    s.listen(1)
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode())
    c.close()
""")


def start_sink(where, address):
    proc = where.popen([sys.executable, "-c", SINK, address],
                       stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def send_through(address, port, nbytes):
    """Seconds to get nbytes to the sink and its count back."""
    t0 = time.monotonic()
    with socket.create_connection((address, port), timeout=30) as s:
        s.sendall(bytes(nbytes))
        s.shutdown(socket.SHUT_WR)
        got = s.recv(64)
    took = time.monotonic() - t0
    assert int(got) == nbytes
    return took


def stop(proc):
    try:
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def pair(netlab, n):
    ns = netlab.namespace()
    host_end, ns_end = netlab.veth(netns.HOST, ns, "10.213.{}.1/24".format(n),
                                   "10.213.{}.2/24".format(n))
    return ns, host_end, ns_end, "10.213.{}.2".format(n)


def test_namespace_created_and_removed():
    lab = netns.Lab("cltl")
    ns = lab.namespace()
    try:
        assert ns.name in netns.names()
        assert ns.link("lo").is_up()
    finally:
        lab.close()
    assert ns.name not in netns.names()
    assert not os.path.exists("/run/netns/" + ns.name)


def test_error_inside_a_lab_removes_everything():
    made = []
    with pytest.raises(ZeroDivisionError):
        with netns.Lab("cltl") as lab:
            made.append(lab.namespace().name)
            made.append(lab.veth(netns.HOST, lab.namespace())[0].ifname)
            1 / 0
    assert not set(made[::2]) & set(netns.names())
    with pytest.raises(RuntimeError, match="no interface"):
        netns.HOST.link(made[1]).is_up()


def test_veth_addresses_links_up_and_processes_inside(netlab):
    ns, host_end, ns_end, address = pair(netlab, 241)
    assert host_end.addresses() == ["10.213.241.1/24"]
    assert ns_end.addresses() == ["10.213.241.2/24"]
    assert host_end.is_up() and ns_end.is_up()
    # A process started in the namespace is in it (and is the program
    # itself, not a wrapper).
    sink, port = start_sink(ns, address)
    try:
        assert os.stat("/proc/{}/ns/net".format(sink.pid)).st_ino == \
            os.stat("/run/netns/" + ns.name).st_ino
        assert send_through(address, port, 1000) < 5
    finally:
        stop(sink)
    # Two namespaces joined directly.
    other = netlab.namespace()
    a, b = netlab.veth(ns, other, "10.213.242.1/24", "10.213.242.2/24")
    assert a.where is ns and b.where is other
    sink, port = start_sink(other, "10.213.242.2")
    try:
        ns.run([sys.executable, "-c",
                "import socket; s = socket.create_connection("
                "('10.213.242.2', {})); s.close()".format(port)])
    finally:
        stop(sink)
    # Down cuts it: the namespace's address is unreachable.
    ns_end.down()
    assert not ns_end.is_up()
    with pytest.raises(OSError):
        socket.create_connection((address, 9), timeout=0.5).close()


def test_delay_measured_by_tcp_round_trips(netlab):
    why = netns.netem_available()
    if why:
        pytest.skip(why)
    ns, host_end, ns_end, address = pair(netlab, 243)
    before = statistics.median(netns.tcp_rtt(address, 9, 5))
    assert ns_end.shape(delay_ms=30).startswith("netem delay 30ms")
    assert ns_end.qdisc() == "netem"
    shaped = statistics.median(netns.tcp_rtt(address, 9, 5))
    ns_end.clear()
    after = statistics.median(netns.tcp_rtt(address, 9, 5))
    assert before < 0.01 and after < 0.01, (before, after)
    assert shaped >= 0.03, shaped


def test_loss_applied_and_cleared(netlab):
    why = netns.netem_available()
    if why:
        pytest.skip(why)
    ns, host_end, ns_end, address = pair(netlab, 244)
    host_end.shape(loss_pct=100)
    with pytest.raises(socket.timeout):
        socket.create_connection((address, 9), timeout=0.5)
    host_end.clear()
    assert host_end.qdisc() != "netem"
    assert max(netns.tcp_rtt(address, 9, 3, timeout=2)) < 1


def test_rate_applied_and_cleared(netlab):
    ns, host_end, ns_end, address = pair(netlab, 245)
    nbytes = 1 << 20
    sink, port = start_sink(ns, address)
    try:
        free = send_through(address, port, nbytes)
    finally:
        stop(sink)
    # 8 Mbit/s: 1 MiB takes a second (less a burst of the shaper).
    how = host_end.shape(rate_mbit=8)
    assert host_end.qdisc() == how.split()[0]
    sink, port = start_sink(ns, address)
    try:
        shaped = send_through(address, port, nbytes)
    finally:
        stop(sink)
    host_end.clear()
    assert host_end.qdisc() not in ("netem", "tbf")
    sink, port = start_sink(ns, address)
    try:
        cleared = send_through(address, port, nbytes)
    finally:
        stop(sink)
    assert shaped >= 0.6, (how, shaped)
    assert free < 0.3 and cleared < 0.3, (free, cleared)


def test_delay_without_netem_is_refused():
    if netns.netem_available() is None:
        pytest.skip("netem works here")
    with netns.Lab("cltl") as lab:
        with pytest.raises(netns.NoNetem):
            lab.namespace().link("lo").shape(delay_ms=1)


def test_failing_tests_leave_no_namespace(tmp_path):
    """The fixtures remove their namespaces after a test that fails."""
    names = tmp_path / "names"
    test = tmp_path / "test_failing.py"
    test.write_text(textwrap.dedent("""
        NAMES = {names!r}

        def test_lab_fails(netlab):
            ns = netlab.namespace()
            netlab.veth(__import__("netns").HOST, ns, None, None)
            open(NAMES, "a").write(ns.name + "\\n")
            assert False, "fails on purpose"

        def test_cluster_fails(cluster):
            ns = cluster.net.add_ns(0)[0]
            open(NAMES, "a").write(ns.name + "\\n")
            raise RuntimeError("fails on purpose")
    """.format(names=str(names))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.support.netlib",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test)],
        cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert "2 failed" in proc.stdout, proc.stdout + proc.stderr
    made = names.read_text().split()
    assert len(made) == 2
    assert not set(made) & set(netns.names())
