"""Protected restore end to end, with real clients against a real
`clonectl serve`: fio --verify on the Source while the restore runs, a host
reading the whole Source during the restore, kill -9 of nbdkit and of the
manager mid-restore, writes to the restoring clone's own export, refusals.

Everything goes through the public surface (the CLI with --json, NBD
clients, the backing files in STATE/lus).  What every test holds to:

- the clone's bytes never change by the restore;
- the Source ends equal to the clone's point-in-time content overlaid by
  every host write (and no flushed host write is lost across a kill -9);
- when the restore completes the clone is fractured again and its Delta
  Map holds the extents written during the restore.

The helpers (`clone_env`) come from tests/support/clonelib.py.
"""

import fcntl
import json
import os
import shutil
import subprocess
import threading
import time

import pytest


from tests.support.clonelib import fio as clonelib_fio
from tests.support.clonelib import (differing_extents, extents_of, fingerprint,
                                    GRANULARITY, KiB, MiB, qemu_img_compare,
                                    read_range)
from tests.support.tools import qemu_io
from tests.support.cli import CLONECTL, status_json
from tests.support.processes import wait_pid_gone

pytest.importorskip("nbd")


# ---------------------------------------------------------------- helpers

def run_fio(cwd, uri, size, offset=0, rw="randwrite", bs="4k", iodepth=16,
            timeout=180):
    """clonelib's verifying fio run, in cwd; returns the job's JSON."""
    return clonelib_fio(uri, size, rw=rw, bs=bs, iodepth=iodepth,
                        offset=offset, timeout=timeout, cwd=str(cwd))[1]


def fracture_with_new_clone_data(env, offset=0, length=None, name="c1"):
    """Synchronize clone name, fracture it, then write random data through
    its export over [offset, offset+length): the Source and the clone now
    differ there.  Returns the clone's whole content."""
    length = env.size - offset if length is None else length
    env.sync_wait(name)
    env.cli("clone", "fracture", name)
    data = os.urandom(length)
    env.write_export(name, offset, data)
    content = read_range(env.img(name), 0, env.size)
    assert content[offset:offset + length] == data
    st = env.status(name)
    assert st["state"] == "fractured", st
    assert st["extents_dirty"] == len(extents_of(offset, length)), st
    return content


def keep_copy(env, name, tmp_path):
    """A copy of the backing file of name, taken now."""
    copy = tmp_path / "{}-before-restore.raw".format(name)
    shutil.copyfile(env.img(name), copy)
    return copy


def start_restore(env, name="c1", *extra):
    proc = env.cli("clone", "restore", name, *extra)
    assert "protected restore started" in proc.stdout, proc.stdout
    st = env.status(name)
    assert st["state"] == "restoring", st
    assert st["restore"]["pending_extents"] > 0, st
    return st


def wait_restored(env, name="c1", timeout=60):
    """Poll until the restore of name has completed: fractured again, no
    "restore" object, no operation running."""
    deadline = time.monotonic() + timeout
    while True:
        st = env.status(name)
        op = st.get("operation") or {}
        if st["state"] == "fractured" and "restore" not in st and \
                not op.get("running"):
            return st
        if st["state"] not in ("restoring", "fractured"):
            pytest.fail("clone {} ended {}: {}".format(name, st["state"], st))
        if time.monotonic() > deadline:
            pytest.fail("restore of {} not done within {} s: {}\n{}".format(
                name, timeout, st, env.server.log()))
        time.sleep(0.1)


def wait_pending_below(env, fraction, name="c1", timeout=30):
    """Poll until the restore has at most fraction of its extents pending."""
    deadline = time.monotonic() + timeout
    while True:
        st = env.status(name)
        restore = st.get("restore")
        assert restore is not None, st
        if restore["pending_extents"] <= fraction * st["extents_total"]:
            return st
        if time.monotonic() > deadline:
            pytest.fail("restore of {} made no progress: {}".format(name, st))
        time.sleep(0.05)


def overlay(base, writes):
    """base with writes [(offset, bytes)] applied in order."""
    out = bytearray(base)
    for off, data in writes:
        out[off:off + len(data)] = data
    return bytes(out)


# ---------------------------------------------------------------- data path

def test_fio_verify_on_source_during_restore(clone_env, tmp_path):
    env = clone_env.setup(size=64 * MiB)
    clone_data = fracture_with_new_clone_data(env)
    clone_copy = keep_copy(env, "c1", tmp_path)
    start_restore(env, "c1", "--rate", "8M")

    # fio writes 4 KiB blocks at QD16 over the middle quarter of the Source
    # (copies on demand: no extent of it is restored yet) and verifies them.
    region, length = 16 * MiB, 16 * MiB
    run_fio(tmp_path, env.uri("src"), length, offset=region)
    during = env.status("c1")
    assert during["state"] == "restoring" and \
        during["restore"]["pending_extents"] > 0, \
        "the restore finished before fio did: no overlap was tested"
    assert during["operation"]["running"], during
    assert during["restore"]["cod_requests"] > 0, during
    # Every extent of fio's region was written, so protected.
    assert during["restore"]["protected_extents"] == length // GRANULARITY
    after_fio = env.read_export("src", region, length)

    st = wait_restored(env)
    # The clone was never modified.
    assert read_range(env.img("c1"), 0, env.size) == clone_data
    same, out = qemu_img_compare(env.img("c1"), clone_copy)
    assert same, out
    # Outside fio's region the Source is the clone's content ...
    assert read_range(env.img("src"), 0, region) == clone_data[:region]
    assert read_range(env.img("src"), region + length, env.size) == \
        clone_data[region + length:]
    # ... inside it fio's data, which the engine never copied over.
    src_region = read_range(env.img("src"), region, length)
    assert src_region == after_fio
    assert all(src_region[o:o + 4096] != clone_data[region + o:
                                                    region + o + 4096]
               for o in range(0, length, 4096))
    assert differing_extents(env.img("src"), clone_copy, env.size) == \
        extents_of(region, length)
    # The Protected Restore Map became the clone's Delta Map.
    assert st["extents_dirty"] == length // GRANULARITY, st


@pytest.mark.parametrize("reader", ["nbdcopy", "qemu-img-compare"])
def test_host_reading_whole_source_gets_clone_bytes(clone_env, tmp_path,
                                                    reader):
    # A sparse Source: a client trusting block status would skip its holes
    # (and copy zeroes) where the Source already shows the clone's data.
    env = clone_env.setup(size=32 * MiB, fill=False)
    clone_data = fracture_with_new_clone_data(env, 4 * MiB, 24 * MiB)
    clone_copy = keep_copy(env, "c1", tmp_path)
    source_before = read_range(env.img("src"), 0, env.size)
    assert source_before != clone_data
    st = start_restore(env, "c1", "--rate", "1M")
    restored = 24 * MiB // GRANULARITY  # the extents the clone's export wrote
    # (the engine may have copied its first 1 MiB run already)
    assert restored - 16 <= st["restore"]["pending_extents"] <= restored, st

    uri = env.uri("src")
    if reader == "nbdcopy":
        copy = tmp_path / "source-read.raw"
        proc = subprocess.run(["nbdcopy", uri, str(copy)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        same, out = qemu_img_compare(copy, clone_copy)
    else:
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F",
                               "raw", uri, str(clone_copy)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        same, out = proc.returncode == 0, proc.stdout + proc.stderr
    assert same, "the Source read during the restore is not the clone: " + out

    st = wait_restored(env)
    # The read copied (on demand) what the engine had not reached yet: the
    # engine, at 1M/s, copied only a small part itself.
    assert st["operation"]["bytes_copied"] < restored * GRANULARITY // 2, st
    assert st["extents_dirty"] == 0, st  # no host wrote
    env.assert_identical("src", "c1")
    same, out = qemu_img_compare(env.img("c1"), clone_copy)
    assert same, out


# ---------------------------------------------------------------- crashes

@pytest.mark.parametrize("kill", ["nbdkit", "manager"])
def test_kill_during_restore_resumes_and_keeps_flushed_writes(
        clone_env, nbd_connect, tmp_path, kill):
    env = clone_env.setup(size=64 * MiB)
    clone_data = fracture_with_new_clone_data(env)
    # `--wait` follows the restore across the restart.
    waiter = subprocess.Popen(
        [CLONECTL, "--state-dir", str(env.state_dir), "clone", "restore",
         "c1", "--rate", "8M", "--wait"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        _crash_during_restore(env, nbd_connect, clone_data, kill)
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, out + err
    assert out.splitlines()[-1].startswith("c1: fractured"), out


def _crash_during_restore(env, nbd_connect, clone_data, kill):
    deadline = time.monotonic() + 30
    while env.status("c1")["state"] != "restoring":
        assert time.monotonic() < deadline, env.status("c1")
        time.sleep(0.05)
    wait_pending_below(env, 0.8)  # the engine is past the first 12 MiB

    h = nbd_connect(env.server.socket, "src")
    writes = [
        # an extent the engine restored already (and whose bit a recovery
        # from the shared activity map sets again)
        (1 * MiB + 512, os.urandom(4 * KiB)),
        # extents not restored yet: copies on demand first
        (40 * MiB - 2 * KiB, os.urandom(8 * KiB)),  # two extents, unaligned
        (48 * MiB, os.urandom(GRANULARITY)),
        (env.size - 4 * KiB, os.urandom(4 * KiB)),  # the last extent
    ]
    for off, data in writes:
        h.pwrite(data, off)
    zeroed = (56 * MiB + 4 * KiB, 128 * KiB)
    h.zero(zeroed[1], zeroed[0])
    writes.append((zeroed[0], bytes(zeroed[1])))
    h.flush()
    for off, data in writes:
        assert h.pread(len(data), off) == data
    written = set()
    for off, data in writes:
        written |= extents_of(off, len(data))
    st = env.status("c1")
    assert st["state"] == "restoring", "the restore ended before the crash"
    assert st["restore"]["protected_extents"] == len(written), st
    # One more write, never flushed, in the activity region of the first
    # one: whatever commit ran at the flush, the crash finds that region
    # in the activity map, so recovery sets the Delta Map bits of its
    # already restored extents again, and only the PRM keeps
    # the flushed write from being copied over.
    unflushed = (2 * MiB + 4 * KiB, os.urandom(4 * KiB))
    h.pwrite(unflushed[1], unflushed[0])

    if kill == "nbdkit":
        env.kill_nbdkit()
        assert "restarting" in env.server.log()
    else:
        env.kill_manager()
        # Offline, the clone is still recorded as restoring.
        assert env.status("c1")["state"] == "restoring"
        env.start_server()
    # The restarted server answers requests only once it has resumed the
    # restore: a status (a `--wait` following the restore) in between
    # would show a restore not running, and a request in between could
    # start a second engine on the group.
    st = env.status("c1")
    assert st["state"] == "fractured" or st["operation"]["running"], st
    started = [line for line in env.server.log().splitlines()
               if "resuming restoring of clone c1" in line or
               "accepting requests" in line][-2:]
    assert "resuming" in started[0] and "accepting" in started[1], started

    st = wait_restored(env)
    assert st["error"] is None, st
    # Every flushed write is there; the rest of the Source is the clone's
    # (the unflushed write may have been lost to the clone's data).
    off, data = unflushed
    kept = read_range(env.img("src"), off, len(data))
    assert kept in (data, clone_data[off:off + len(data)])
    assert read_range(env.img("src"), 0, env.size) == \
        overlay(clone_data, writes + [(off, kept)])
    # The clone is unchanged.
    assert read_range(env.img("c1"), 0, env.size) == clone_data
    # Its Delta Map covers the extents written during the restore (a
    # bounded superset at most), and so every extent that differs.
    differ = differing_extents(env.img("src"), env.img("c1"), env.size)
    assert written <= differ <= written | extents_of(off, len(data))
    assert len(differ) <= st["extents_dirty"] <= st["extents_total"] // 4, st


# ---------------------------------------------------------------- clone writes

def test_writes_to_restoring_clone_and_its_sibling(clone_env, nbd_connect,
                                                   tmp_path):
    """A write to the restoring clone's export first restores the
    extent to the Source, which so still gets the clone's point-in-time
    data; a fractured sibling keeps tracking its own writes and the
    Source's changes."""
    env = clone_env.setup(size=32 * MiB, clones=("c1", "c2"))
    env.sync_wait("c2")
    env.cli("clone", "fracture", "c2")
    clone_data = fracture_with_new_clone_data(env)
    start_restore(env, "c1", "--rate", "1M")

    # Near the end of the LU: the engine (start to end, 1M/s) is far away.
    clone_writes = [(24 * MiB + 4 * KiB, 8 * KiB), (28 * MiB, 128 * KiB)]
    qemu_io(env.uri("c1"), *["write -P 0x5a {} {}".format(o, n)
                             for o, n in clone_writes])
    source_writes = [(20 * MiB + 512, 4 * KiB)]
    qemu_io(env.uri("src"), *["write -P 0xa5 {} {}".format(o, n)
                              for o, n in source_writes])
    sibling_writes = [(2 * MiB, 64 * KiB)]
    qemu_io(env.uri("c2"), *["write -P 0x3c {} {}".format(o, n)
                             for o, n in sibling_writes])

    st = env.status("c1")
    assert st["state"] == "restoring" and st["restore"]["pending_extents"], \
        "the restore finished before the writes: nothing was tested"
    written = set()
    for o, n in clone_writes + source_writes:
        written |= extents_of(o, n)
    assert st["restore"]["protected_extents"] == len(written), st
    # The clone's export shows its own writes; the Source shows the clone's
    # point-in-time data there.
    h = nbd_connect(env.server.socket, "src")
    for o, n in clone_writes:
        assert h.pread(n, o) == clone_data[o:o + n]
    c = nbd_connect(env.server.socket, "c1")
    for o, n in clone_writes:
        assert c.pread(n, o) == b"\x5a" * n
    c.shutdown()
    # Reading the whole Source copies the rest on demand: the restore ends.
    expected = overlay(clone_data, [(o, b"\xa5" * n)
                                    for o, n in source_writes])
    assert h.pread(env.size, 0) == expected
    h.shutdown()

    st = wait_restored(env)
    assert read_range(env.img("src"), 0, env.size) == expected
    # The clone changed only where its own export was written.
    assert read_range(env.img("c1"), 0, env.size) == \
        overlay(clone_data, [(o, b"\x5a" * n) for o, n in clone_writes])
    # Its new Delta Map: the extents written on either side during the
    # restore, exactly -- an incremental sync copies those and no more.
    assert st["extents_dirty"] == len(written), (st, sorted(written))

    # The sibling's Delta Map covers the restore's changes and its own
    # writes: an incremental sync makes it equal to the Source.
    env.sync_wait("c2")
    env.assert_identical("src", "c2")
    env.sync_wait("c1")
    assert env.status("c1")["operation"]["bytes_copied"] == \
        len(written) * GRANULARITY
    env.assert_identical("src", "c1")


# ---------------------------------------------------------------- refusals

def test_refused_restores_change_nothing(clone_env, tmp_path):
    env = clone_env.setup(size=16 * MiB, clones=("c1", "c2", "c3"))
    src_img = read_range(env.img("src"), 0, env.size)

    # Not fractured: out-of-sync, then synchronized.
    before = fingerprint(env)
    env.refused("clone", "restore", "c1", match=["restore", "out-of-sync",
                                                 "fractured"])
    env.refused("clone", "restore", "c1", "--full",
                match=["restore", "out-of-sync"])
    assert fingerprint(env) == before
    env.sync_wait("c2")
    before = fingerprint(env)
    env.refused("clone", "restore", "c2", match=["restore", "synchronized",
                                                 "fractured"])
    assert fingerprint(env) == before

    # Another clone of the source is synchronized: the restore would change
    # the Source under it.
    env.cli("clone", "fracture", "c2")
    env.write_export("c2", 0, os.urandom(env.size))
    c2_data = read_range(env.img("c2"), 0, env.size)
    env.sync_wait("c3")
    before = fingerprint(env)
    env.refused("clone", "restore", "c2", match=["c3", "synchronized"])
    assert fingerprint(env) == before
    assert read_range(env.img("src"), 0, env.size) == src_img

    # One restore per group: a second one, the same one again, removing the
    # restoring clone, another operation.
    env.cli("clone", "fracture", "c3")
    start_restore(env, "c2", "--rate", "256K")
    c3 = env.status("c3")
    state_json = (env.state_dir / "state.json").read_bytes()
    env.refused("clone", "restore", "c3", match=["c2", "restoring"])
    env.refused("clone", "restore", "c2", match=["c2", "already running"])
    env.refused("clone", "remove", "c2", match=["remove", "restoring"])
    env.refused("clone", "sync", "c3", match=["c2", "restoring"])
    env.refused("clone", "sync", "c2", match=["sync", "restoring"])
    env.refused("clone", "fracture", "c2", match=["fracture", "restoring"])
    assert (env.state_dir / "state.json").read_bytes() == state_json
    st = env.status("c3")
    st.pop("operation")
    c3.pop("operation")
    assert st == c3
    assert env.img("c2").exists()
    st = env.status("c2")
    assert st["state"] == "restoring" and st["operation"]["running"], st

    # Reading the whole Source copies the rest on demand: the restore ends.
    assert env.read_export("src", 0, env.size) == c2_data
    wait_restored(env, "c2")
    assert read_range(env.img("c2"), 0, env.size) == c2_data
    env.assert_identical("src", "c2")


def test_restore_refused_for_clone_of_other_size(clone_env, tmp_path):
    env = clone_env.setup(size=8 * MiB, clones=())
    bigger = tmp_path / "bigger.raw"
    with open(bigger, "wb") as f:
        f.truncate(12 * MiB)
    env.cli("clone", "add", "src", "big", "--file", str(bigger))
    env.sync_wait("big")
    env.cli("clone", "fracture", "big")
    env.write_export("big", 0, os.urandom(1 * MiB))
    before = fingerprint(env)
    src_img = read_range(env.img("src"), 0, env.size)
    env.refused("clone", "restore", "big", match=["big", "size"])
    assert fingerprint(env) == before
    assert read_range(env.img("src"), 0, env.size) == src_img


def test_refused_full_restore_changes_nothing(clone_env):
    """--full sets every bit of the clone's Delta Map: not before every check
    has passed (a synchronized sibling refuses the restore)."""
    env = clone_env.setup(size=16 * MiB, clones=("c1", "c2"))
    fracture_with_new_clone_data(env, 1 * MiB, 128 * KiB)
    env.sync_wait("c2")
    before = fingerprint(env)
    env.refused("clone", "restore", "c1", "--full",
                match=["c2", "synchronized"])
    after = fingerprint(env)
    assert after["status:c1"]["extents_dirty"] == \
        before["status:c1"]["extents_dirty"], after["status:c1"]
    assert after == before


def test_flushed_write_at_restore_completion_survives_crash(clone_env,
                                                            nbd_connect):
    """The window between the in-memory end of a restore and the new state
    in state.json, held open by holding the state-file lock that persist()
    takes (as a concurrent clonectl command or a slow disk would)."""
    env = clone_env.setup(size=16 * MiB)
    clone_data = fracture_with_new_clone_data(env)
    start_restore(env, "c1", "--rate", "2M")
    lock = os.open(env.state_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Reading the whole Source copies every extent on demand: the engine
        # finds nothing left, completes, and blocks persisting "fractured".
        assert env.read_export("src", 0, env.size) == clone_data
        deadline = time.monotonic() + 30
        while (env.status("c1").get("restore") or {}).get(
                "pending_extents", 0) != 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # the engine reaches the hand-over and blocks
        doc = json.loads((env.state_dir / "state.json").read_text())
        assert doc["lus"]["src"]["clones"]["c1"]["state"] == "restoring"

        data = os.urandom(4 * KiB)
        offset = 5 * MiB + 512
        h = nbd_connect(env.server.socket, "src")
        acked = threading.Event()

        def write_and_flush():
            try:
                h.pwrite(data, offset)
                h.flush()
                acked.set()
            except Exception:
                pass  # the connection died with nbdkit: not acknowledged

        writer = threading.Thread(target=write_and_flush, daemon=True)
        writer.start()
        # The fix holds host writes until the new state is durable; the
        # bug acknowledged them here, then lost them.
        acked.wait(2)
        old = env.server.refresh()["nbdkit_pid"]
        os.kill(old, 9)
        assert wait_pid_gone(old, 10)
    finally:
        os.close(lock)
    writer.join(10)
    # The manager restarts nbdkit; state.json says restoring: it resumes.
    deadline = time.monotonic() + 30
    while True:
        info = status_json(env.state_dir)["server"]
        if info and info["nbdkit_pid"] != old:
            break
        assert time.monotonic() < deadline, env.server.log()
        time.sleep(0.1)
    env.server.refresh()
    wait_restored(env)
    assert read_range(env.img("c1"), 0, env.size) == clone_data
    seen = read_range(env.img("src"), offset, len(data))
    if not acked.is_set():
        return  # never acknowledged: either content is allowed
    assert seen == data, "the flushed write was overwritten by {}".format(
        "the clone's data: the resumed restore copied it" if
        seen == clone_data[offset:offset + len(data)] else "something")
