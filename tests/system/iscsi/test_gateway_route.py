"""The iSCSI gateway's own route into the exports: only the gateway can use
it (the export name carries a secret made at each server start and given
to nbdkit in a private file), it passes every check a host connection
passes (a secondary's volume stays read-only), it is counted and shown
apart from host connections, and `clone remove` makes the gateway let go
of the clone's export before the clone goes."""

import json
import os
import stat
import time

import pytest

from tests.support.cli import run_clonectl, status_json
from tests.support.iscsilib import iscsi_record, mounted, needs_iscsi
from tests.support.tools import QemuIoSession, qemu_io

nbd = pytest.importorskip("nbd")

pytestmark = needs_iscsi


def _refused(socket_path, name, readonly=False):
    h = nbd.NBD()
    h.set_export_name(name)
    if readonly:
        h.set_opt_mode(True)
    with pytest.raises(nbd.Error):
        h.connect_unix(socket_path)
        if readonly:
            h.opt_go()


def _listed(socket_path):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(socket_path)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    return names


def _lu(state_dir, name):
    return [e for e in status_json(state_dir)["lus"] if e["name"] == name][0]


def _clone(state_dir, name):
    return json.loads(run_clonectl(state_dir, "clone", "status", name,
                                   "--json").stdout)


def _wait(pred, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "never: " + what
        time.sleep(0.1)


def test_only_the_gateway_can_use_its_route(iscsi_server, clonectl,
                                            state_dir):
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server()
    assert srv.targets() == ["d1"]
    sock = srv.server.socket
    for name in ("iscsi-gateway:d1", "iscsi-gateway:0123456789abcdef:d1",
                 "iscsi-gateway:", "iscsi-gateway::d1"):
        _refused(sock, name)
    assert _listed(sock) == ["d1"]
    # The real gateway holds d1 (nbdfuse opens several connections), shown
    # apart from host connections.
    d1 = _lu(state_dir, "d1")
    assert d1["connections"] == 0 and d1["gateway_connections"] >= 1
    # Its secret is in a private file, not on nbdkit's command line.
    path = state_dir / "run" / "gateway.secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 32
    with open("/proc/{}/cmdline".format(srv.server.nbdkit_pid), "rb") as f:
        assert secret.encode() not in f.read()
    # And the gateway still serves: written over iSCSI, read over NBD.
    qemu_io(srv.url("d1"), "write -P 0x5a 0 64k", "flush")
    h = nbd.NBD()
    h.set_export_name("d1")
    h.connect_unix(sock)
    assert h.pread(65536, 0) == b"\x5a" * 65536
    h.shutdown()


def test_a_secondarys_volume_is_read_only_through_the_gateway(
        iscsi_server, clonectl, state_dir):
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server()
    clonectl("rsg", "create", "g", "--volume", "d1", "--srl-size", "1M")
    clonectl("rsg", "demote", "g")  # d1 is now a consistent secondary's
    sock = srv.server.socket
    _refused(sock, "iscsi-gateway:d1")
    _refused(sock, "iscsi-gateway:d1", readonly=True)
    # The gateway mounts it again read-only, as a host would get it.
    _wait(lambda: (iscsi_record(state_dir) or {}).get("mounts", {}).get(
        "d1", {}).get("readonly") is True, "d1 mounted read-only")
    deadline = time.monotonic() + 20
    while True:  # until the rebuilt target takes logins
        refused = qemu_io(srv.url("d1"), "write -P 0x11 0 64k", check=False)
        out = refused.stdout + refused.stderr
        if "write protected" in out or refused.returncode == 0 or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert refused.returncode != 0
    assert "write protected" in out, out
    with open(state_dir / "lus" / "d1.img", "rb") as f:
        assert f.read(65536) == bytes(65536)
    group = run_clonectl(state_dir, "rsg", "status", "g", "--json").stdout
    assert '"consistent": true' in group


def test_clone_remove_makes_the_gateway_let_go_first(
        iscsi_server, clonectl, state_dir, process_guard):
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server()
    clonectl("clone", "add", "d1", "c1")
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")
    srv.wait_targets(["c1", "d1"])
    c1 = _clone(state_dir, "c1")
    assert c1["connections"] == 0 and c1["gateway_connections"] >= 1
    mountpoint = iscsi_record(state_dir)["mounts"]["c1"]["mountpoint"]
    initiator = QemuIoSession(srv.url("c1"), process_guard)
    try:
        assert " ops; " in initiator.command("write -P 0x33 0 64k")
        clonectl("clone", "remove", "c1")
        # Once remove has answered, the gateway has let go already: no
        # target (the logged-in initiator was cut off), no mount.
        assert srv.targets() == ["d1"]
        assert "c1" not in iscsi_record(state_dir)["mounts"]
        assert not mounted(mountpoint)
    finally:
        # Its session is gone: it would try to log in again, not quit.
        initiator.proc.kill()
        initiator.proc.wait()
    assert not (state_dir / "lus" / "c1.img").exists()
    assert json.loads(run_clonectl(state_dir, "clone", "list",
                                   "--json").stdout) == []
    assert srv.server.running()
