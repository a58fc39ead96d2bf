"""Fixtures for the iSCSI gateway: a `clonectl serve --iscsi-portal` on a
free loopback port, with every process and mount it recorded cleaned up at
teardown by what run/iscsi.json names (never by name patterns)."""

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.support.processes import terminate_pid

IQN_PREFIX = "iqn.2026-11.org.clonectl.test:"
TOOLS = ("tgtd", "tgtadm", "nbdfuse", "fusermount3", "iscsi-inq",
         "iscsi-readcapacity16", "iscsi-ls", "iscsi-test-cu", "qemu-io",
         "qemu-img")


def _missing_tools():
    return [t for t in TOOLS if shutil.which(t) is None]


def _why_not():
    missing = _missing_tools()
    if missing:
        return ("iSCSI tools missing: {} (scripts/setup installs tgt, "
                "libiscsi-bin, fuse3, qemu-block-extra)".format(
                    " ".join(missing)))
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: nbdfuse cannot mount here"
    return None


# Use as `pytestmark = needs_iscsi` in every test module of this directory.
needs_iscsi = pytest.mark.skipif(_why_not() is not None,
                                 reason=str(_why_not()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounted(path):
    path = os.path.realpath(str(path))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def iscsi_record(state_dir):
    try:
        with open(os.path.join(str(state_dir), "run", "iscsi.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class IscsiServer:
    def __init__(self, server, port):
        self.server = server
        self.port = port
        self.portal = "127.0.0.1:{}".format(port)

    def url(self, name, lun=1, host="127.0.0.1"):
        return "iscsi://{}:{}/{}{}/{}".format(host, self.port, IQN_PREFIX,
                                             name, lun)

    def iqn(self, name):
        return IQN_PREFIX + name

    def targets(self):
        r = subprocess.run(["iscsi-ls", "iscsi://" + self.portal],
                           capture_output=True, text=True, timeout=30)
        return sorted(line.split()[0][len("Target:" + IQN_PREFIX):]
                      for line in r.stdout.splitlines()
                      if line.startswith("Target:"))

    def wait_targets(self, expected, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            got = self.targets()
            if got == sorted(expected):
                return got
            if time.monotonic() > deadline:
                pytest.fail("iSCSI targets {} never became {}:\n{}".format(
                    got, sorted(expected), self.server.log()))
            time.sleep(0.3)


@pytest.fixture
def iscsi_server(server_factory, process_guard, state_dir):
    """start(extra_args=()) -> IscsiServer serving every LU over iSCSI."""
    started = []

    def start(extra_args=(), portal_host="127.0.0.1", **kwargs):
        port = free_port()
        srv = server_factory(extra_args=["--iscsi-portal",
                                         "{}:{}".format(portal_host, port),
                                         "--iqn-prefix", IQN_PREFIX]
                             + list(extra_args), **kwargs)
        guard_recorded(srv.state_dir, process_guard)
        started.append(srv)
        return IscsiServer(srv, port)

    yield start
    # server_factory (set up first) stops the managers after this; anything
    # a killed manager left recorded is cleaned here.
    for srv in started:
        srv.stop()
        rec = iscsi_record(srv.state_dir)
        if rec:
            cleanup_record(rec)


def guard_recorded(state_dir, guard):
    rec = iscsi_record(state_dir) or {}
    if rec.get("tgtd"):
        guard.add(rec["tgtd"]["pid"])
    for m in (rec.get("mounts") or {}).values():
        guard.add(m["pid"])


def cleanup_record(rec):
    if rec.get("tgtd"):
        terminate_pid(rec["tgtd"]["pid"], 5)
    for m in (rec.get("mounts") or {}).values():
        terminate_pid(m["pid"], 5)
        if mounted(m["mountpoint"]):
            subprocess.run(["fusermount3", "-u", "-z", m["mountpoint"]])
