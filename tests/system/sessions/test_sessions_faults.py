"""Failing destinations of incremental session transfers, end to end: the
destination is a real NBD server that answers requests with an error
(nbdkit's error filter, or a flush that fails), not our own
CLONECTL_FAULTS hook.

Each test serves a Source LU with `clonectl serve`, gives the session a
destination that works for the first (full) copy, then turns the fault on
by creating a trigger file (the error filter's error-*-file= parameters:
errors happen only while the file exists), makes changes, marks, writes
after the mark (copy on first write), and transfers.  Then the trigger file
is removed ("the disk came back") and the next transfer completes.

What the tests hold to:

- a transfer to a failing destination fails: `session transfer --wait` (and
  `session update`) exit 1 with a message naming the destination and the
  errno (ENOSPC, EIO: as the symbolic name and as its strerror text), no
  traceback, no hang; `session status --json` shows the same error in the
  destination's last_error and in last_transfer;
- the destination is not recorded consistent (not even when every write
  reached it and only the final flush failed), the session stays marked,
  and its pending map still holds every extent not yet flushed to it:
  exactly the changed extents when nothing got through, exactly those
  after the last checkpoint when the fault came mid-transfer;
- once the fault is gone the next transfer sends only what was pending,
  completes, and leaves the destination byte-equal to a copy of the Source
  taken at the mark (qemu-img compare), not with the writes made after it.

nbdkit 1.32's error filter injects errors into pread, pwrite, zero, trim,
extents and cache, but not into flush (`error-flush-*` does not exist
there).  The failing flush therefore comes from a small nbdkit python
plugin written by the test (FLUSH_PLUGIN: a file whose flush fails with EIO
while the trigger file exists).  The transfer engine never reads its
destinations; test_failing_reads_of_the_destination_do_not_matter pins that
with pread and block status failing all the time.

Helpers: tests/support/sessionlib.py and tests/support/clonelib.py.
"""

import errno
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest


from tests.support.tools import qemu_io
from tests.support.clonelib import GRANULARITY, KiB, MiB, read_range
from tests.support.sessionlib import assert_differ, assert_same, NbdProcess
from tests.support.cli import CLONECTL

pytest.importorskip("nbd")

SIZE = 16 * MiB
EXTENTS = SIZE // GRANULARITY
# Changed between the first update and the mark: 4 data extents and 16
# extents of write-zeroes (see _change_then_mark).
CHANGED_DATA, CHANGED_ZERO = 4, 16
CHANGED = CHANGED_DATA + CHANGED_ZERO
# libnbd's text for the errors (the message names the symbol too).
NOSPACE = os.strerror(errno.ENOSPC)
IOERROR = os.strerror(errno.EIO)

FLUSH_PLUGIN = textwrap.dedent('''\
    """nbdkit python plugin: file=PATH served read-write; flush fails with
    EIO while trigger=PATH exists (writes always succeed)."""
    import errno
    import os

    import nbdkit

    API_VERSION = 2
    params = {}


    def config(key, value):
        if key not in ("file", "trigger"):
            raise RuntimeError("unknown parameter " + key)
        params[key] = value


    def thread_model():
        return nbdkit.THREAD_MODEL_PARALLEL


    def open(readonly):
        return os.open(params["file"], os.O_RDWR)


    def close(fd):
        os.close(fd)


    def get_size(fd):
        return os.fstat(fd).st_size


    def can_multi_conn(fd):
        return True


    def can_flush(fd):
        return True


    def pread(fd, buf, offset, flags):
        buf[:] = os.pread(fd, len(buf), offset)


    def pwrite(fd, buf, offset, flags):
        os.pwrite(fd, buf, offset)


    def zero(fd, count, offset, flags):
        os.pwrite(fd, bytes(count), offset)


    def flush(fd, flags):
        if os.path.exists(params["trigger"]):
            nbdkit.set_error(errno.EIO)
            raise OSError(errno.EIO, "injected flush failure")
        os.fsync(fd)
    ''')


# ---------------------------------------------------------------- helpers

def _dest_file(tmp_path, size=SIZE, name="dest.img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _error_params(trigger, kinds, err):
    """nbdkit error filter parameters: every request of kinds (pwrite,
    zero, ...) fails with err while the file trigger exists."""
    out = []
    for k in kinds:
        out += ["error-{}={}".format(k, err), "error-{}-rate=100%".format(k),
                "error-{}-file={}".format(k, trigger)]
    return out


def _flush_failing_dest(dests, dfile, trigger):
    """A destination served by FLUSH_PLUGIN (see the module docstring)."""
    plugin = dests.tmp_path / "flushfail.py"
    plugin.write_text(FLUSH_PLUGIN)
    sock, log = dests._next("flushfail")
    cmd = ["nbdkit", "-f", "-U", sock, "python", plugin,
           "file=" + str(dfile), "trigger=" + str(trigger)]
    p = NbdProcess(cmd, sock, "", log, dests.guard)
    dests.procs.append(p)
    return p.start()


def _first_update(env, dfile):
    """The first update: a full copy to the still healthy destination."""
    st = env.update()
    assert_same(dfile, env.img("src"), "after the first update")
    d = st["destinations"][0]
    assert d["consistency"] == "consistent" and d["last_error"] is None, d
    return d["last_success"]


def _change_then_mark(env, tmp_path):
    """Changes since the first update (CHANGED_DATA extents of data,
    CHANGED_ZERO of write-zeroes), a copy of the Source as of the mark, the
    mark, then host writes after it over marked extents (copy on first
    write) and elsewhere.  Returns the copy."""
    qemu_io(env.uri("src"), "write -P 0xab 1M 256k", "write -z 8M 1M")
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1")
    st = env.sstatus()
    assert st["marked"] and st["extents_to_send"] == CHANGED, st
    _write_after_mark(env)
    assert env.sstatus()["cofw_count"] >= 2, env.sstatus()
    return at_mark


def _write_after_mark(env):
    qemu_io(env.uri("src"), "write -P 0xef 1M 64k", "write -P 0x22 8M 4k",
            "write -P 0x11 12M 128k")


def _assert_failed(proc, dest, name, text):
    """A failed transfer command: exit 1, the destination and the errno
    named (symbol and strerror), no traceback."""
    err = proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stdout, err)
    assert err.startswith("clonectl: error:"), err
    assert "transfer failed" in err and dest.uri in err, err
    assert name in err and text in err, err
    assert "traceback" not in (proc.stdout + err).lower(), err
    assert "transfer completed" not in proc.stdout, proc.stdout


def _assert_failed_status(st, dest, name, text, pending, last_success):
    """The session after a transfer failed on its only destination."""
    assert st["marked"] is True and not st["transferring"], st
    d = st["destinations"][0]
    assert d["consistency"] == "inconsistent", d
    assert d["state"] == "inconsistent", d
    assert d["last_success"] == last_success, d
    err = d["last_error"] or ""
    assert name in err and text in err and dest.uri in err, d
    assert d["pending_extents"] == pending, d
    assert st["extents_to_send"] == pending, st
    last = st["last_transfer"]
    assert last["result"].startswith("failed") and name in last["result"], \
        last
    assert list(last["destinations_failed"]) == [dest.uri], last
    assert name in last["destinations_failed"][dest.uri], last


def _assert_resumed(env, proc, dfile, at_mark, sent, zeroed=0):
    """The transfer after the fault went away: completed, sent only what
    was pending, the destination holds the point in time of the mark."""
    assert proc.returncode == 0 and "transfer completed" in proc.stdout, \
        (proc.stdout, proc.stderr)
    st = env.sstatus()
    last = st["last_transfer"]
    assert last["result"] == "completed", last
    assert last["bytes_sent"] == sent and last["bytes_zeroed"] == zeroed, \
        last
    d = st["destinations"][0]
    assert d["consistency"] == "consistent" and d["last_error"] is None, d
    assert d["pending_extents"] == 0 and st["marked"] is False, st
    assert_same(dfile, at_mark, "destination vs the Source at the mark")
    assert_differ(dfile, env.img("src"), "writes after the mark were sent")
    return st


# ---------------------------------------------------------------- ENOSPC

def test_enospc_on_writes_fails_the_transfer_then_it_resumes(
        session_env, dests, tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    trigger = tmp_path / "enospc"
    dest = dests.nbdkit(dfile, filters=["error"], params=_error_params(
        trigger, ("pwrite", "zero", "trim"), "ENOSPC"))
    env.create("s1", dest.uri)
    last_success = _first_update(env, dfile)
    before = env.copy_source_file(tmp_path / "before.raw")

    at_mark = _change_then_mark(env, tmp_path)
    trigger.touch()     # the destination's disk is full from now on
    proc = env.transfer_wait("s1", check=False, timeout=60)
    _assert_failed(proc, dest, "ENOSPC", NOSPACE)
    _assert_failed_status(env.sstatus(), dest, "ENOSPC", NOSPACE,
                          CHANGED, last_success)
    # A backup that failed is what monitoring is for: the status is
    # degraded, saying why, until a transfer completes.
    proc = env.cli("status", "--json", check=False)
    assert proc.returncode == 4, proc.stdout
    assert any(r.startswith("session s1: its last transfer failed")
               for r in json.loads(proc.stdout)["degraded"]), proc.stdout
    # Every write and write-zeroes was refused: not a byte changed there.
    assert_same(dfile, before, "a refused transfer changed the destination")
    # The engine has writes and write-zeroes in flight on several
    # connections: whichever the destination refused first ended it.
    assert re.search("injecting ENOSPC error into (pwrite|zero)",
                     dest.log()), dest.log()

    # While the disk is still full, another attempt fails the same way and
    # the pending map is untouched.
    proc = env.transfer_wait("s1", check=False, timeout=60)
    _assert_failed(proc, dest, "ENOSPC", NOSPACE)
    _assert_failed_status(env.sstatus(), dest, "ENOSPC", NOSPACE,
                          CHANGED, last_success)

    trigger.unlink()    # space was freed
    proc = env.transfer_wait("s1", check=False, timeout=60)
    _assert_resumed(env, proc, dfile, at_mark, CHANGED_DATA * GRANULARITY,
                    CHANGED_ZERO * GRANULARITY)
    assert env.cli("status", check=False).returncode == 0
    # The writes after the mark are tracked: one more update sends them.
    env.update()
    assert_same(dfile, env.img("src"), "after one more update")


# ---------------------------------------------------------------- EIO

def test_eio_on_the_final_flush_keeps_the_destination_inconsistent(
        session_env, dests, tmp_path):
    """Every write reaches the destination, only its flush fails: it holds
    the right bytes, but nothing says they are durable, so it is neither
    consistent nor cleared from the pending map.  `session update` resumes
    the marked session instead of marking again."""
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    trigger = tmp_path / "eio-flush"
    dest = _flush_failing_dest(dests, dfile, trigger)
    env.create("s1", dest.uri)
    last_success = _first_update(env, dfile)

    qemu_io(env.uri("src"), "write -P 0xab 1M 256k", "write -z 8M 1M")
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    trigger.touch()
    proc = env.cli("session", "update", "s1", check=False, timeout=60)
    _assert_failed(proc, dest, "EIO", IOERROR)
    st = env.sstatus()
    _assert_failed_status(st, dest, "EIO", IOERROR, CHANGED,
                          last_success)
    assert "flush" in st["destinations"][0]["last_error"], st
    # The data did arrive (the writes succeeded) ...
    assert_same(dfile, at_mark, "the writes before the failed flush")
    # ... yet one more failing update resends it all and still fails.
    _write_after_mark(env)
    proc = env.cli("session", "update", "s1", check=False, timeout=60)
    _assert_failed(proc, dest, "EIO", IOERROR)
    _assert_failed_status(env.sstatus(), dest, "EIO", IOERROR,
                          CHANGED, last_success)
    assert env.sstatus()["last_transfer"]["bytes_sent"] == \
        CHANGED_DATA * GRANULARITY

    trigger.unlink()
    proc = env.cli("session", "update", "s1", check=False, timeout=60)
    st = _assert_resumed(env, proc, dfile, at_mark, CHANGED_DATA * GRANULARITY,
                         CHANGED_ZERO * GRANULARITY)
    assert st["destinations"][0]["last_success"] > last_success, st


BIG = 96 * MiB
BIG_EXTENTS = BIG // GRANULARITY
CHECKPOINT_EXTENTS = 64 * MiB // GRANULARITY   # sessions.transfer.CHECKPOINT_BYTES
FAST, SLOW = "400M", "48M"   # bits per second: ~50 MB/s, ~6 MB/s
LATE = 88 * MiB   # an offset the failing transfer has not flushed


def test_eio_on_writes_after_a_checkpoint_keeps_the_rest_pending(
        session_env, dests, tmp_path):
    """The first full copy fails with EIO after its checkpoint (64 MiB
    flushed and cleared): exactly the extents after the checkpoint stay
    pending, and the next transfer sends only those.  The rate filter
    (outside the error filter, so requests waiting for it see the trigger)
    slows the destination down after 60 MiB, so that the fault surely comes
    after the checkpoint and before the end."""
    env = session_env.setup(size=BIG)
    dfile = _dest_file(tmp_path, BIG)
    trigger = tmp_path / "eio"
    rate = tmp_path / "rate"
    _set_rate(rate, FAST)
    dest = dests.nbdkit(
        dfile, filters=["rate", "error"],
        params=["rate=" + FAST, "rate-file=" + str(rate), "burstiness=0.5"]
        + _error_params(trigger, ("pwrite", "zero"), "EIO"))
    env.create("s1", dest.uri)
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1")
    assert env.sstatus()["extents_to_send"] == BIG_EXTENTS

    waiter = _transfer_in_background(env)
    try:
        env.wait_transfer(pred=lambda st: (st["transfer"] or {}).get(
            "bytes_sent", 0) >= 60 * MiB)
        _set_rate(rate, SLOW)
        env.wait_transfer(pred=lambda st: st["transferring"] and st[
            "destinations"][0]["pending_extents"] <=
            BIG_EXTENTS - CHECKPOINT_EXTENTS)
        trigger.touch()
        # A host write to an extent not flushed yet: its old data is saved.
        late = os.urandom(128 * KiB)
        env.write_export("src", LATE, late)
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    proc = subprocess.CompletedProcess(waiter.args, waiter.returncode, out,
                                       err)
    _assert_failed(proc, dest, "EIO", IOERROR)
    pending = BIG_EXTENTS - CHECKPOINT_EXTENTS
    _assert_failed_status(env.sstatus(), dest, "EIO", IOERROR,
                          pending, None)
    assert "injecting EIO error into pwrite" in dest.log(), dest.log()
    # What the checkpoint cleared did reach the destination.
    assert read_range(dfile, 0, 64 * MiB) == read_range(at_mark, 0, 64 * MiB)

    trigger.unlink()
    _set_rate(rate, FAST)
    # The same server again (same file and socket): nbdkit 1.32 may abort
    # ("raw_send_socket: Assertion `sock >= 0' failed") when a client drops
    # its connections while the rate filter still holds requests of them,
    # as the engine does with a failed destination.
    dest.stop()
    dest = dests.restart(dest)
    proc = env.transfer_wait("s1", check=False, timeout=60)
    st = _assert_resumed(env, proc, dfile, at_mark, pending * GRANULARITY)
    assert read_range(dfile, LATE, len(late)) != late
    assert st["destinations"][0]["bytes_sent"] >= BIG, st


def _set_rate(path, value):
    tmp = Path(str(path) + ".new")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)


def _transfer_in_background(env):
    """`session transfer s1 --wait` in the background."""
    cmd = [CLONECTL, "--state-dir", str(env.state_dir), "session", "transfer",
           "s1", "--wait"]
    env_vars = dict(os.environ)
    env_vars.pop("CLONECTL_STATE", None)
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_vars)


# ---------------------------------------------------------------- reads

def test_failing_reads_of_the_destination_do_not_matter(session_env, dests,
                                                        tmp_path):
    """The transfer engine only writes, zeroes and flushes a destination:
    with every pread, block status and cache request failing (EIO, all the
    time) updates complete.  If the engine ever reads its destinations
    (say, to verify), this fails, and wants a test of a failing read."""
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    dest = dests.nbdkit(dfile, filters=["error"], params=[
        "error=EIO", "error-pread-rate=100%", "error-extents-rate=100%",
        "error-cache-rate=100%"])
    env.create("s1", dest.uri)
    _first_update(env, dfile)
    qemu_io(env.uri("src"), "write -P 0xab 1M 256k", "write -z 8M 1M")
    st = env.update()
    assert st["last_transfer"]["bytes_sent"] == CHANGED_DATA * GRANULARITY
    assert_same(dfile, env.img("src"), "after the incremental update")
    assert "injecting" not in dest.log(), \
        "the transfer read the destination:\n" + dest.log()
