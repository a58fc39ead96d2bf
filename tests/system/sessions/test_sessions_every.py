"""`session update --every`: scheduled updates in the foreground.

What it holds to: each interval starts a whole update (mark, transfer,
unmark), so changes made between intervals reach the destination without
anyone running a command; a failed update is reported and retried at the
next interval instead of ending the schedule.
"""

import json
import subprocess
import time

from tests.support.cli import CLONECTL, run_clonectl
from tests.support.tools import qemu_io, read_all

MiB = 1 << 20


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def start_qemu_nbd(image, sock, guard):
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-x", "dst",
                             "-k", str(sock), str(image)],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    guard.add(proc.pid)
    wait_for(lambda: sock.exists(), 10, "qemu-nbd did not start")
    return proc


def test_update_every_interval(state_dir, server_factory, process_guard,
                               tmp_path):
    run_clonectl(state_dir, "lu", "create", "src", "--size", "16M")
    srv = server_factory()
    image, sock = tmp_path / "dst.img", tmp_path / "dst.sock"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    dest = start_qemu_nbd(image, sock, process_guard)
    src, dst = srv.uri("src"), "nbd+unix:///dst?socket={}".format(sock)
    run_clonectl(state_dir, "session", "create", "src", "s", "--dest", dst)
    qemu_io(src, "write -P 0x41 0 1M")
    proc = subprocess.Popen(
        [CLONECTL, "--state-dir", str(state_dir), "session", "update", "s",
         "--every", "1s"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    process_guard.add(proc.pid)
    try:
        wait_for(lambda: read_all(dst) == read_all(src), 30,
                 "the first scheduled update did not happen")
        # A change made while the schedule runs arrives by itself.
        qemu_io(src, "write -P 0x42 4M 2M")
        wait_for(lambda: read_all(dst) == read_all(src), 30,
                 "a later scheduled update did not happen")
        # Updates that fail (the destination is down) are reported and
        # the schedule goes on; once it is back, the changes arrive.
        dest.kill()
        dest.wait(10)
        sock.unlink()
        qemu_io(src, "write -P 0x43 8M 1M")
        time.sleep(2.5)
        assert proc.poll() is None, "the schedule ended"
        dest = start_qemu_nbd(image, sock, process_guard)
        wait_for(lambda: read_all(dst) == read_all(src), 30,
                 "the schedule did not recover")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        dest.kill()
        dest.wait(10)
    assert "update failed" in err, err
    st = json.loads(run_clonectl(state_dir, "session", "status", "s",
                                 "--json").stdout)
    assert st["last_transfer"]["result"] == "completed"
    assert "transfer completed" in out
