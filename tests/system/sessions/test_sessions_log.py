"""A session transfer is recorded in run/serve.log: its start and its end
with the figures (bytes, seconds, extents, destinations)."""

import re
import time
from pathlib import Path

import pytest


from tests.support.clonelib import MiB

pytest.importorskip("nbd")


def wait_log(state_dir, pattern, timeout=10.0):
    log = Path(state_dir) / "run" / "serve.log"
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if m:
            return m
        if time.monotonic() > deadline:
            pytest.fail("no {!r} in serve.log:\n{}".format(
                pattern, log.read_text(errors="replace")[-3000:]))
        time.sleep(0.05)


def test_transfer_start_and_end_are_logged_with_figures(session_env, dests,
                                                        tmp_path):
    env = session_env.setup(size=4 * MiB)
    dfile = dests.make_file(tmp_path / "dest.img", 4 * MiB)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    env.update()
    wait_log(env.state_dir, r"INFO clonectl\.sessions: transfer of session s1 "
             r"\(src\) started: 64 extents of 65536 bytes to 1 destinations$")
    m = wait_log(env.state_dir, r"^\S+Z INFO clonectl\.sessions: transfer of "
                 r"session s1 \(src\) completed: (\d+) bytes written and "
                 r"(\d+) zeroed in [\d.]+ s, 64 extents, 1 of 1 destinations$")
    assert int(m.group(1)) + int(m.group(2)) == 4 * MiB
