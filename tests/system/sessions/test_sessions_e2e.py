"""Incremental copy sessions end to end, with real clients: a
Source served by `clonectl serve`, destinations served by qemu-nbd and by a
second `clonectl serve`, host writes by qemu-io, libnbd and fio --verify,
the frozen image read by nbdcopy and qemu-img.

What the tests hold to:

- a host write acknowledged (and flushed) is never lost: fio
  verifies every block it wrote while transfers ran;
- coverage: every change reaches the next transfer: after
  the writes stop, one more update leaves each destination byte-equal to
  the Source (`qemu-img compare`), and only changed extents are sent
  (bytes sent = changed extents x granularity);
- consistency: a completed marked transfer leaves the
  destination byte-equal to the Source as of the mark (a copy taken at the
  mark, or read from the frozen export), never with writes made after it;
  a full copy while unmarked leaves it `inconsistent` until the next marked
  transfer completes;
- the frozen image: `SOURCE@NAME` serves the point in time,
  read-only, while hosts write to the Source, and disappears at unmark.

Helpers: tests/support/sessionlib.py (destinations) and
tests/support/clonelib.py.
"""

import os
import random
import subprocess
import threading
import time

import pytest


from tests.support.clonelib import fio as clonelib_fio
from tests.support.clonelib import nbd_exports
from tests.support.tools import qemu_io
from tests.support.clonelib import GRANULARITY, KiB, MiB, read_range
from tests.support.sessionlib import assert_differ, assert_same
from tests.support.cli import run_clonectl

pytest.importorskip("nbd")

SIZE = 64 * MiB
EXTENTS = SIZE // GRANULARITY


def _dest_file(tmp_path, size=SIZE, name="dest.img"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ---------------------------------------------------------------- qemu-nbd

def test_qemu_nbd_destination_gets_the_point_in_time(session_env, dests,
                                                     tmp_path):
    env = session_env.setup(size=SIZE)
    dfile = _dest_file(tmp_path)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    st = env.sstatus()
    assert st["marked"] is False and st["destinations"][0]["needs_full"], st
    assert read_range(dfile, 0, SIZE) == bytes(SIZE), \
        "session create wrote to the destination"

    # Host writes, then the first update: a full copy.
    qemu_io(env.uri("src"), "write -P 0xab 1M 128k", "write -P 0x5a 33M 4k")
    st = env.update()
    assert_same(dfile, env.img("src"), "after the first update")
    d = st["destinations"][0]
    assert d["state"] == "consistent" and d["consistency"] == "consistent", d
    assert d["pending_extents"] == 0 and not d["needs_full"], d
    assert d["bytes_sent"] == SIZE, d   # random data: nothing is zero
    assert d["last_success"] and d["last_error"] is None, d
    last = st["last_transfer"]
    assert last["result"] == "completed", last
    assert last["bytes_sent"] == SIZE and last["bytes_zeroed"] == 0, last
    assert st["marked"] is False and st["tracked_extents"] == 0, st

    # More writes: 4 data extents, 16 zeroed extents (a 1 MiB write-zeroes).
    qemu_io(env.uri("src"), "write -P 0xcd 8M 256k", "write -z 20M 1M")
    assert env.sstatus()["tracked_extents"] == 4 + 16
    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    env.cli("session", "mark", "s1", "--export")
    frozen = env.copy_export("src@s1", tmp_path / "frozen.raw")
    assert_same(frozen, at_mark, "frozen export vs copy taken at the mark")
    st = env.sstatus()
    assert st["marked"] and st["extents_to_send"] == 20, st
    assert st["frozen_export"] == "src@s1", st

    # Writes after the mark, over marked extents (copy on first write) and
    # elsewhere: none may reach the destination in this transfer.
    qemu_io(env.uri("src"), "write -P 0xef 8256k 64k", "write -P 0x11 40M 128k",
            "write -P 0x22 20M 4k")
    cofw = env.sstatus()["cofw_count"]
    assert cofw >= 2, env.sstatus()
    proc = env.transfer_wait("s1")
    assert "transfer completed" in proc.stdout, proc.stdout
    assert_same(dfile, at_mark, "destination vs the Source at the mark")
    assert_differ(dfile, env.img("src"), "writes after the mark were sent")
    assert read_range(dfile, 40 * MiB, 128 * KiB) == \
        read_range(at_mark, 40 * MiB, 128 * KiB) != b"\x11" * (128 * KiB)
    assert read_range(dfile, 8 * MiB + 64 * KiB, 64 * KiB) == \
        b"\xcd" * (64 * KiB)
    st = env.sstatus()
    assert st["marked"] is False and st["frozen_export"] is None, st
    last = st["last_transfer"]
    assert last["result"] == "completed", last
    assert last["bytes_sent"] == 4 * GRANULARITY, last
    assert last["bytes_zeroed"] == 16 * GRANULARITY, last
    d = st["destinations"][0]
    assert d["consistency"] == "consistent" and d["pending_extents"] == 0, d
    assert d["bytes_sent"] == SIZE + 4 * GRANULARITY, d
    # The writes after the mark are tracked for the next transfer:
    # 8256k (1 extent), 40M (2 extents), 20M (1 extent).
    assert st["tracked_extents"] == 4, st
    assert "src@s1" not in nbd_exports(env.server.socket)

    st = env.update()
    assert_same(dfile, env.img("src"), "after the last update")
    assert st["last_transfer"]["bytes_sent"] == 4 * GRANULARITY, st


# ---------------------------------------------------------------- fio

@pytest.mark.parametrize("kind", ["qemu-nbd", "clonectl"])
def test_fio_verify_on_source_during_transfers(session_env, dests,
                                               server_factory, tmp_path,
                                               kind):
    size = 32 * MiB
    env = session_env.setup(size=size)
    if kind == "qemu-nbd":
        dfile = _dest_file(tmp_path, size)
        uri = dests.qemu_nbd(dfile).uri
    else:
        state2 = tmp_path / "state2"
        run_clonectl(state2, "lu", "create", "dst", "--size", str(size))
        srv2 = server_factory(state_dir=state2)
        dfile = state2 / "lus" / "dst.img"
        uri = srv2.uri("dst")
    env.create("s1", uri)
    env.update()
    assert_same(dfile, env.img("src"), "after the first update")

    # fio: 4 KiB random writes over the first 16 MiB, writes limited to
    # 1000 IOPS (about 4 s), then reads everything back and verifies it.
    result = {}

    def run():
        try:
            result["job"] = clonelib_fio(
                env.uri("src"), 16 * MiB, iodepth=8, cwd=str(tmp_path),
                extra=["--rate_iops=,1000"])[1]
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        env.wait_transfer(pred=lambda st: st["tracked_extents"] > 8)
        # A point in time while fio writes, read from the frozen export.
        env.cli("session", "mark", "s1", "--export")
        frozen = env.copy_export("src@s1", tmp_path / "frozen.raw")
        proc = env.transfer_wait("s1")
        assert "transfer completed" in proc.stdout, proc.stdout
        # fio wrote while the session was marked (the overlap happened).
        st = env.sstatus()
        assert st["cofw_count"] > 0, st
        assert_same(dfile, frozen, "destination vs the frozen image")
        # Updates while fio keeps writing.
        updates = 0
        while updates < 1 or (t.is_alive() and updates < 4):
            env.update()
            updates += 1
    finally:
        t.join(120)
    assert "error" not in result, result.get("error")
    # fio's writes are all in (its verify pass read them back); one more
    # update after the writes stopped must leave the destination equal.
    env.update()
    assert_same(dfile, env.img("src"), "after the writes stopped")


# ---------------------------------------------------------------- bytes sent

@pytest.mark.parametrize("granularity", [64 * KiB, 256 * KiB])
def test_bytes_sent_equal_changed_extents(session_env, dests, tmp_path,
                                          granularity):
    env = session_env.setup(size=32 * MiB)
    dfile = _dest_file(tmp_path, 32 * MiB)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri,
               extra=["--granularity", "{}K".format(granularity // KiB)])
    st = env.update()
    assert st["last_transfer"]["bytes_sent"] == 32 * MiB, st

    rng = random.Random(5)
    extents = 32 * MiB // granularity
    chosen = rng.sample(range(extents), 9)
    h = env.connect("src")
    for x in chosen[:7]:
        # One or two 4 KiB writes inside the extent.
        for _ in range(rng.randint(1, 2)):
            off = x * granularity + rng.randrange(0, granularity, 4096)
            h.pwrite(os.urandom(4096), off)
    # Two extents become all zero (write-zeroes of the whole extent).
    for x in chosen[7:]:
        h.zero(granularity, x * granularity)
    h.flush()
    h.shutdown()
    st = env.sstatus()
    assert st["tracked_extents"] == 9, st

    st = env.update()
    last = st["last_transfer"]
    assert last["result"] == "completed", last
    assert last["bytes_sent"] == 7 * granularity, last
    assert last["bytes_zeroed"] == 2 * granularity, last
    assert st["destinations"][0]["bytes_sent"] == 32 * MiB + 7 * granularity
    assert_same(dfile, env.img("src"))

    # Nothing changed: an update sends nothing.
    st = env.update()
    assert st["last_transfer"]["bytes_sent"] == 0, st
    assert st["last_transfer"]["bytes_zeroed"] == 0, st


# ---------------------------------------------------------------- frozen export

def test_frozen_export_is_the_point_in_time_and_read_only(session_env, dests,
                                                          nbd_connect,
                                                          tmp_path):
    env = session_env.setup(size=32 * MiB)
    dfile = _dest_file(tmp_path, 32 * MiB)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)
    env.update()
    qemu_io(env.uri("src"), "write -P 0x77 3M 512k")
    assert "src@s1" not in nbd_exports(env.server.socket)

    at_mark = env.copy_source_file(tmp_path / "at-mark.raw")
    proc = env.cli("session", "mark", "s1", "--export")
    assert "src@s1" in proc.stdout, proc.stdout
    assert "src@s1" in nbd_exports(env.server.socket)

    # Hosts write all over the Source afterwards (fio, no verify needed:
    # it is checked against the Source below).
    clonelib_fio(env.uri("src"), 8 * MiB, offset=0, rw="write", bs="256k",
                 verify=False, cwd=str(tmp_path))
    qemu_io(env.uri("src"), "write -P 0x99 3M 64k", "write -z 16M 2M")
    assert_differ(env.img("src"), at_mark, "the host writes changed nothing")

    # The frozen export still reads the point in time.
    uri = env.uri("src@s1")
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                          uri, str(at_mark)], capture_output=True, text=True,
                         timeout=60)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    # It is read-only: the handshake says so and a write fails.
    h = nbd_connect(uri, strict=False)
    assert h.is_read_only()
    with pytest.raises(Exception):
        h.pwrite(b"x" * 4096, 0)   # sent: strict mode would not send it
    proc = qemu_io(uri, "write -P 0x01 0 4k", check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr) \
        .lower(), proc.stdout + proc.stderr
    assert read_range(env.img("src"), 0, 4096) != b"\x01" * 4096

    # Unmark is refused while a client is connected to the export ...
    proc = env.cli("session", "unmark", "s1", check=False)
    assert proc.returncode == 1 and "connection" in proc.stderr, proc.stderr
    h.shutdown()
    # ... and allowed once it left (the server notices the close shortly).
    deadline = time.monotonic() + 10
    while True:
        proc = env.cli("session", "unmark", "s1", check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr
    assert "src@s1" not in nbd_exports(env.server.socket)
    st = env.sstatus()
    assert st["marked"] is False and st["frozen_export"] is None, st
    # Nothing was lost by the unmark: the next update sends it all.
    env.update()
    assert_same(dfile, env.img("src"), "after unmark and update")


# ---------------------------------------------------------------- full unmarked

def test_full_copy_while_unmarked_is_inconsistent_until_update(session_env,
                                                               dests,
                                                               tmp_path):
    env = session_env.setup(size=32 * MiB)
    dfile = _dest_file(tmp_path, 32 * MiB)
    dest = dests.qemu_nbd(dfile)
    env.create("s1", dest.uri)

    proc = env.transfer_wait("s1", "--full", "--unmarked")
    assert "transfer completed" in proc.stdout, proc.stdout
    st = env.sstatus()
    d = st["destinations"][0]
    assert d["consistency"] == "inconsistent" and \
        d["state"] == "inconsistent", d
    assert not d["needs_full"] and d["pending_extents"] == 0, d
    assert d["last_success"] is None, d
    assert st["marked"] is False, st
    assert st["last_transfer"]["full_unmarked"] is True, st
    assert st["last_transfer"]["bytes_sent"] == 32 * MiB, st
    assert_same(dfile, env.img("src"), "no writes during the full copy")

    qemu_io(env.uri("src"), "write -P 0x31 5M 64k")
    st = env.update()
    d = st["destinations"][0]
    assert d["consistency"] == "consistent" and d["last_success"], d
    # The full copy counted: the update sends only the changed extent.
    assert st["last_transfer"]["bytes_sent"] == GRANULARITY, st
    assert_same(dfile, env.img("src"))

    # A marked full copy (transfer --full on an unmarked session marks
    # every extent) sends everything and leaves it consistent.
    qemu_io(env.uri("src"), "write -P 0x32 7M 64k")
    proc = env.transfer_wait("s1", "--full")
    assert "transfer completed" in proc.stdout, proc.stdout
    st = env.sstatus()
    assert st["last_transfer"]["bytes_sent"] == 32 * MiB, st
    assert st["last_transfer"]["full_unmarked"] is False, st
    assert st["destinations"][0]["consistency"] == "consistent", st
    assert st["marked"] is False and st["tracked_extents"] == 0, st
    assert_same(dfile, env.img("src"))
