"""The iSCSI side of `clonectl serve --iscsi-portal`, with real initiators:
libiscsi's tools (iscsi-inq, iscsi-readcapacity16, iscsi-ls) and QEMU's
iscsi:// block driver (qemu-img, qemu-io).  Every byte read back over NBD
was written over iSCSI and the reverse: one data path."""

import os
import signal
import subprocess
import time

import pytest

from target import iscsi
from tests.support.cli import MiB, run_clonectl, status_json
from tests.support.tools import QemuIoSession, qemu_io, run
from tests.support.processes import pid_alive, wait_pid_gone
from tests.support.servers import Server
from tests.support.iscsilib import (cleanup_record, guard_recorded,
                                    iscsi_record, IscsiServer, mounted,
                                    needs_iscsi)

pytestmark = needs_iscsi


def write_pattern_file(path, size, seed):
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(size))
    return path


# ------------------------------------------------------------------ basics

def test_targets_answer_inquiry_capacity_and_read_only(iscsi_server,
                                                       clonectl):
    clonectl("lu", "create", "d1", "--size", "64M")
    clonectl("lu", "create", "ro", "--size", "16M", "--read-only")
    srv = iscsi_server()
    assert srv.targets() == ["d1", "ro"]

    for name, size in (("d1", 64 * MiB), ("ro", 16 * MiB)):
        inq = run("iscsi-inq", srv.url(name)).stdout
        assert "Peripheral Device Type:DIRECT_ACCESS" in inq
        cap = run("iscsi-readcapacity16", srv.url(name)).stdout
        assert "Total size:{}".format(size) in cap, cap
        assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap
    ls = run("iscsi-ls", "-s", "iscsi://" + srv.portal).stdout
    assert "Lun:1    Type:DIRECT_ACCESS (Size:63M)" in ls, ls

    # The read-only LU is a read-only target; the other takes writes.
    refused = qemu_io(srv.url("ro"), "write -P 0x11 0 64k", check=False)
    assert refused.returncode != 0
    assert "write protected" in refused.stdout + refused.stderr
    qemu_io(srv.url("d1"), "write -P 0x11 0 64k", "flush")

    st = status_json(srv.server.state_dir)
    assert sorted(st["iscsi"]) == [srv.iqn("d1"), srv.iqn("ro")]
    assert st["server"]["iscsi"]["portal"] == srv.portal
    text = run_clonectl(srv.server.state_dir, "status").stdout
    assert "iSCSI portal " + srv.portal in text


def test_patterns_cross_between_iscsi_and_nbd(iscsi_server, clonectl,
                                              tmp_path):
    clonectl("lu", "create", "d1", "--size", "16M")
    srv = iscsi_server()
    nbd_uri = srv.server.uri("d1")
    a = write_pattern_file(tmp_path / "a.raw", 16 * MiB, 1)
    b = write_pattern_file(tmp_path / "b.raw", 16 * MiB, 2)

    # Written by QEMU's iSCSI initiator, read back over NBD.
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", a,
        srv.url("d1"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", a, nbd_uri)
    # Written over NBD, read back through iSCSI.
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", b, nbd_uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", b, srv.url("d1"))
    # And the comparison can fail: a is no longer there.
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", a,
               srv.url("d1"), check=False).returncode == 1


def test_exports_come_and_go_without_restart(iscsi_server, clonectl):
    clonectl("lu", "create", "d1", "--size", "16M")
    srv = iscsi_server()
    assert srv.targets() == ["d1"]
    pid = srv.server.pid

    clonectl("lu", "create", "d2", "--size", "8M")
    srv.wait_targets(["d1", "d2"])
    qemu_io(srv.url("d1"), "write -P 0x21 0 1M", "flush")

    clonectl("clone", "add", "d1", "c1")
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")
    srv.wait_targets(["c1", "d1", "d2"])
    # The fractured clone is its own target, with the data of the fracture.
    qemu_io(srv.url("c1"), "read -P 0x21 0 1M", "write -P 0x22 1M 1M",
            "flush")
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 1M 1M",
        srv.server.uri("c1"))
    # The gateway's own mount does not make the resync refuse; the clone's
    # target goes away when it is no longer exported.
    clonectl("clone", "sync", "c1", "--wait")
    srv.wait_targets(["d1", "d2"])
    assert srv.server.pid == pid and srv.server.running()


# ------------------------------------------------------------------ access

def _non_loopback_ipv4():
    out = subprocess.run(["hostname", "-I"], capture_output=True,
                         text=True).stdout.split()
    for addr in out:
        if "." in addr and not addr.startswith("127."):
            return addr
    return None


def test_initiator_allow_list_refuses_others(iscsi_server, clonectl):
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server(extra_args=["--iscsi-allow",
                                   "d1=iqn.2026-11.test:good"])
    ok = run("iscsi-inq", "-i", "iqn.2026-11.test:good", srv.url("d1"))
    assert "DIRECT_ACCESS" in ok.stdout
    bad = run("iscsi-inq", "-i", "iqn.2026-11.test:bad", srv.url("d1"),
              check=False)
    assert bad.returncode != 0
    assert "Login Failed" in bad.stdout + bad.stderr
    assert "DIRECT_ACCESS" not in bad.stdout


def test_default_allows_loopback_initiators_only(iscsi_server, clonectl):
    addr = _non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to log "
                    "in from")
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server(portal_host="0.0.0.0")
    run("iscsi-inq", srv.url("d1"))
    bad = run("iscsi-inq", srv.url("d1", host=addr), check=False)
    assert bad.returncode != 0, bad.stdout
    assert "Login Failed" in bad.stdout + bad.stderr


# ------------------------------------------------------------------ crashes

def test_gateway_tgtd_runs_with_its_malloc_tunables(iscsi_server, clonectl):
    """The gateway's tgtd keeps freed command buffers (without the tunables
    glibc gives the heap back and tgtd faults zeroed pages in for every
    1 MiB read), and 1 MiB reads through it return the LU's bytes."""
    clonectl("lu", "create", "d1", "--size", "16M")
    srv = iscsi_server()
    qemu_io(srv.server.uri("d1"), "write -P 0x3c 0 16M", "flush")
    pid = iscsi_record(srv.server.state_dir)["tgtd"]["pid"]
    with open("/proc/{}/environ".format(pid), "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0")
                   if b"=" in item)
    # glibc cuts GLIBC_TUNABLES at the first ':' in place as it parses it,
    # so /proc shows the first tunable only (what glibc makes of the whole
    # string: tests/unit/test_iscsi_tgtd_environment.py).
    shown = env.get(b"GLIBC_TUNABLES", b"").decode()
    assert shown == iscsi.TGTD_MALLOC_TUNABLES.split(":")[0], shown
    # 16 reads of 1 MiB, the same buffers reused between them.
    qemu_io(srv.url("d1"), *["read -P 0x3c {}M 1M".format(i)
                             for i in range(16)])


def test_flushed_iscsi_writes_survive_kill9_of_nbdkit(iscsi_server,
                                                      clonectl):
    clonectl("lu", "create", "d1", "--size", "16M")
    srv = iscsi_server()
    # qemu-io's flush is SYNCHRONIZE CACHE; the writes are plain WRITEs.
    qemu_io(srv.url("d1"), "write -P 0x5a 0 4M", "write -P 0xa5 8M 1M",
            "flush")
    old = srv.server.nbdkit_pid
    os.kill(old, signal.SIGKILL)
    assert wait_pid_gone(old, 10)
    deadline = time.monotonic() + 30
    while srv.server.refresh()["nbdkit_pid"] == old:
        assert time.monotonic() < deadline, srv.server.log()
        time.sleep(0.2)
    # Over NBD, from the new nbdkit ...
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 4M",
        "-c", "read -P 0xa5 8M 1M", "-c", "read -P 0 4M 4M",
        srv.server.uri("d1"))
    # ... and through iSCSI again once the manager rebuilt the gateway.
    srv.wait_targets(["d1"])
    qemu_io(srv.url("d1"), "read -P 0x5a 0 4M", "read -P 0xa5 8M 1M")
    # The rebuilt gateway takes writes through the new nbdkit.
    qemu_io(srv.url("d1"), "write -P 0x77 12M 1M", "flush")
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x77 12M 1M",
        srv.server.uri("d1"))


def test_manager_kill9_leaves_nothing_after_restart_and_stop(
        iscsi_server, clonectl, process_guard):
    clonectl("lu", "create", "d1", "--size", "8M")
    clonectl("lu", "create", "d2", "--size", "8M")
    srv = iscsi_server()
    first = iscsi_record(srv.server.state_dir)
    assert sorted(first["mounts"]) == ["d1", "d2"]
    for m in first["mounts"].values():
        assert mounted(m["mountpoint"])

    os.kill(srv.server.pid, signal.SIGKILL)
    srv.server.proc.wait(10)
    for pid in [first["tgtd"]["pid"], srv.server.nbdkit_pid] + \
            [m["pid"] for m in first["mounts"].values()]:
        assert wait_pid_gone(pid, 15), pid
    # The dead nbdfuse mounts stay behind until the next serve.
    left = [m["mountpoint"] for m in first["mounts"].values()
            if mounted(m["mountpoint"])]
    try:
        port = int(first["portal"].rsplit(":", 1)[1])
        srv2 = IscsiServer(Server(
            srv.server.state_dir, str(srv.server.requested_socket) + "2",
            srv.server.log_path.with_suffix(".2"), process_guard,
            ["--iscsi-portal", "127.0.0.1:{}".format(port),
             "--iqn-prefix", "iqn.2026-11.org.clonectl.test:"]).start(),
            port)
        guard_recorded(srv2.server.state_dir, process_guard)
        log = srv2.server.log()
        for mp in left:
            assert "unmounting stale " + mp in log, log
        second = iscsi_record(srv2.server.state_dir)
        assert second["tgtd"]["pid"] != first["tgtd"]["pid"]
        for name, m in second["mounts"].items():
            with open("/proc/self/mountinfo") as f:
                n = sum(line.split()[4] == m["mountpoint"] for line in f)
            assert n == 1, (name, n)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 1M", "-c",
            "flush", srv2.url("d2"))

        # Clean stop: tgtd, mounts, nbdkit all gone, records removed.
        status, obeyed, nbdkit_left = srv2.server.stop()
        assert status == 0 and obeyed and not nbdkit_left, srv2.server.log()
        assert not pid_alive(second["tgtd"]["pid"])
        for m in second["mounts"].values():
            assert not pid_alive(m["pid"])
            assert not mounted(m["mountpoint"])
        assert iscsi_record(srv2.server.state_dir) is None
        port_ctl = second["tgtd"]["control_port"]
        assert not os.path.exists("/var/run/tgtd/socket.{}".format(port_ctl))
        log = srv2.server.log()
        assert log.index("iSCSI gateway stopped") < \
            log.rindex("nbdkit stopped"), log
    finally:
        rec = iscsi_record(srv.server.state_dir)
        if rec:
            cleanup_record(rec)
    # The data written through iSCSI is in the LU.
    with open(srv.server.state_dir / "lus" / "d2.img", "rb") as f:
        assert f.read(MiB) == b"\x31" * MiB


# ------------------------------------------------------------------ restore

def test_protected_restore_shows_clone_data_to_a_logged_in_initiator(
        iscsi_server, clonectl, process_guard):
    clonectl("lu", "create", "d1", "--size", "16M")
    srv = iscsi_server()
    nbd = srv.server.uri("d1")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xc1 0 16M", nbd)
    clonectl("clone", "add", "d1", "c1")
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")

    session = QemuIoSession(srv.url("d1"), process_guard)
    try:
        # -f: FUA writes, each one durable when acknowledged.
        out = session.command("write -f -P 0x5e 0 16M")
        assert "wrote 16777216/16777216" in out, out
        assert "Pattern verification failed" not in \
            session.command("read -P 0x5e 0 16M")
        # The logged-in initiator shows in status.
        st = status_json(srv.server.state_dir)
        sessions = st["iscsi"][srv.iqn("d1")]["sessions"]
        assert len(sessions) == 1 and sessions[0]["address"] == \
            "127.0.0.1", sessions
        text = run_clonectl(srv.server.state_dir, "status").stdout
        assert sessions[0]["initiator"] in text

        clonectl("clone", "restore", "c1")  # protected, not waited for
        out = session.command("read -P 0xc1 0 16M")
        assert "Pattern verification failed" not in out, out
        assert "read 16777216/16777216" in out, out
    finally:
        session.close()
    # The clone was never written.
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xc1 0 16M",
        srv.server.uri("c1"))


def test_tgtd_killed_is_restarted_with_its_targets(iscsi_server, clonectl,
                                                   process_guard):
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server()
    qemu_io(srv.url("d1"), "write -P 0x4b 0 1M", "flush")
    first = iscsi_record(srv.server.state_dir)
    os.kill(first["tgtd"]["pid"], signal.SIGKILL)
    assert wait_pid_gone(first["tgtd"]["pid"], 10)
    deadline = time.monotonic() + 20
    while True:
        rec = iscsi_record(srv.server.state_dir)
        if rec and rec.get("tgtd") and rec["tgtd"]["pid"] != \
                first["tgtd"]["pid"] and "d1" in rec["mounts"]:
            break
        assert time.monotonic() < deadline, srv.server.log()
        time.sleep(0.2)
    guard_recorded(srv.server.state_dir, process_guard)
    srv.wait_targets(["d1"])
    qemu_io(srv.url("d1"), "read -P 0x4b 0 1M")
    assert "tgtd died" in srv.server.log()
