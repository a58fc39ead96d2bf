"""`lu rollback` refuses while hosts use the LU, so that no write lands
during or after the rollback; a host that connects while it copies must
be refused too, or its acknowledged, flushed write is overwritten by the
rollback's copy.  The LU is therefore not exported for the whole
rollback (a new connection is refused, saying why) and exported again
when it has finished."""

import os
import subprocess
import time

import pytest

from target import control
from tests.support.cli import CLONECTL
from tests.support.clonelib import MiB, read_range

nbd = pytest.importorskip("nbd")

SIZE = 256 * MiB
SAVED = 160 * MiB         # what the rollback copies back
LAST = SAVED - 4096       # the last block it copies


def test_a_host_cannot_connect_while_a_rollback_runs(clone_env):
    env = clone_env.setup(size=SIZE, clones=(), fill=False)
    sock = str(env.state_dir / "run" / "control.sock")
    assert control.call(sock, "image_protect", lu="src")["protected"]
    env.write_export("src", 0, b"\x77" * SAVED)     # saved into the image
    proc = subprocess.Popen([CLONECTL, "--state-dir", str(env.state_dir),
                             "lu", "rollback", "src"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # Once the rollback has begun copying (block 0 is the image's again),
    # a host tries to connect and write the last block it copies.
    deadline = time.monotonic() + 60
    while read_range(env.img("src"), 0, 4096) != bytes(4096):
        assert proc.poll() is None and time.monotonic() < deadline, \
            proc.communicate()
    h = nbd.NBD()
    h.set_export_name("src")
    refused = None
    mine = os.urandom(4096)
    try:
        h.connect_unix(str(env.server.socket))
    except nbd.Error as e:
        refused = e
    else:
        h.pwrite(mine, LAST)
        h.flush()
    still_running = proc.poll() is None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    if refused is None:
        got = h.pread(4096, LAST)
        h.shutdown()
        pytest.fail(
            "a host connected while `lu rollback` ran ({}; still running "
            "after its write: {}); its write of the block at {} was "
            "acknowledged and flushed, and the same connection now reads "
            "{} there".format(out.strip(), still_running, LAST,
                              "its own write" if got == mine else
                              "the image's zeroes" if got == bytes(4096)
                              else "other data"))
    assert still_running, "the rollback ended before the host tried"
    # The refusal says why (nbdkit's log has the target's message).
    assert "LU 'src' is not served: it is being rolled back to " \
        "src@protected-src" in env.server.log(), env.server.log()[-2000:]
    # Exported again afterwards, holding the image.
    assert env.read_export("src", 0, SAVED) == bytes(SAVED)
    env.write_export("src", LAST, mine)
    assert env.read_export("src", LAST, 4096) == mine
