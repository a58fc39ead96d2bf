"""Engine-level tests of replicated storage groups (target.replication).

Two in-process `Target` objects in tmp dirs (A primary, B secondary)
connected over 127.0.0.1 TCP, no nbdkit.  Host I/O goes through
`Target.lus[name].write/zero/trim/flush` (the path the plugin uses).

The checker (used by the state machine and by the "protection off" twins):
a byte-level model is the ordered list of every change made on the primary,
each with the sequence number the primary gave it.  The secondary must be
- when sampled while it says it is consistent (under its apply lock, no
  waiting, possibly behind): exactly the model's state after some prefix of
  the changes whose last sequence number is >= its applied_seq;
- at a check point (link replicating, lag 0, secondary consistent and
  applied_seq == the primary's last seq): exactly the model's state after
  changes 1..applied_seq, and the primary exactly the full model.

Crashes:
- secondary: its Target is closed and a new one started on the same state
  dir and replication port (a restart; the primary's link reconnects);
- primary (a kill -9 at a quiet moment): every link thread is stopped with
  Link.stop() (which persists nothing), the SRL/DCM/LU fds are closed
  without PrimaryGroup.close()/Target.close() (both would persist the group
  record), the old Target is abandoned and a new Target is made on the same
  state dir.  Everything pwritten is in the page cache, as after a kill -9;
  the group record is whatever was last persisted by the engine itself.
  Not simulated: a kill in the middle of a host write or of a persist.

Timing knobs of the engine (RETRY_INTERVAL, PERSIST_INTERVAL) are shortened
by the tests (module attributes, restored afterwards) so that reconnects do
not cost a second each.

RSG_MODEL_EXAMPLES (default 40; 10 in a run of the fast tier alone, see
tests/support/tiers.py) and RSG_MODEL_STEPS (default 15) size the state
machine.
"""

import contextlib
import errno
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from tests.support import rsgmodel, rsgnodes
from tests.support.models import tolerate_timing_in_generation
from tests.support.sockets import free_port
from tests.support.rsgmodel import fast_timing, Op, restore_timing, wait_for
from tests.support.rsgnodes import hold_engines, read_image, resynced, TOKEN
from tests.support.targets import fractured
from tests.support.tiers import examples
from target import backends
from target import replication as R
from target import errors
from target import gateway as gateway_route
from target.replication.wire import DATA, send_frame
from target.target import Target

GRAN = 4096
VOLS = ["v1", "v2"]
SIZES = [1 << 20, 512 << 10]
SRL = "1M"


# ---------------------------------------------------------------- helpers







def blank():
    return rsgmodel.blank(SIZES)


def first_diff(a, b):
    return rsgmodel.first_diff(a, b, VOLS)


def check_sample(ops, applied, imgs):
    return rsgmodel.check_sample(ops, applied, imgs, SIZES)


def check_exact(ops, imgs, applied, what="secondary"):
    rsgmodel.check_exact(ops, imgs, applied, SIZES, what, VOLS)


@pytest.fixture(autouse=True)
def _fast():
    saved = fast_timing()
    yield
    restore_timing(saved)


class Cluster(rsgnodes.Pair):
    """A primary A and a secondary B in dirs under root, with the volumes
    VOLS, the group g and (link=True) its link; the model's changes."""

    def __init__(self, root, mode="async", srl=SRL, link=True):
        super().__init__(root, dict(zip(VOLS, SIZES)))
        self.create_group(srl, "4K")
        self.ops = []
        self.lock = threading.Lock()      # one writer at a time
        self.seq_reused = False
        if link:
            self.link_up(mode)

    def crash_primary(self):
        """kill -9 at a quiet moment (module notes)."""
        self.kill_primary()
        last = self.ops[-1].seq if self.ops else 0
        if self.g.next_seq <= last:
            self.seq_reused = True

    # Host I/O (recorded in the model before it is issued: a secondary
    # can never hold an update the model lacks).

    def change(self, vol, kind, off, length, data=None, t=None):
        t = t or self.ta
        lu = t.lus[VOLS[vol]]
        with self.lock:
            g = t.rsgs["g"]
            seq = g.next_seq
            op = Op(seq, vol, kind, off, length,
                    bytes(data) if data is not None else None)
            self.ops.append(op)
            if kind == R.WRITE:
                lu.write(op.data, off)
            elif kind == R.ZERO:
                lu.zero(off, length)
            else:
                lu.trim(off, length)
            assert g.next_seq == seq + 1, "a change got no single seq"
        return op

    def write(self, vol, off, data):
        return self.change(vol, R.WRITE, off, len(data), data)

    def flush(self):
        for name in VOLS:
            self.ta.lus[name].flush()

    # Checks.

    def sample(self):
        """(applied_seq, images) of the secondary under its apply lock, or
        None when it is not consistent."""
        sg = self.sg
        if sg is None:
            return None
        with sg.lock:
            if not sg.consistent:
                return None
            applied = sg.applied_seq
            imgs = [read_image(self.tb, n) for n in VOLS]
        return applied, imgs

    def check_sample(self):
        s = self.sample()
        if s is None:
            return None
        with self.lock:
            ops = list(self.ops)
        return check_sample(ops, s[0], s[1])

    def check_final(self):
        """Converge, then: secondary == updates 1..applied exactly,
        primary == the whole model, secondary == primary."""
        self.wait_converged()
        s = self.sample()
        assert s is not None
        applied, imgs = s
        check_exact(self.ops, imgs, applied)
        prim = [read_image(self.ta, n) for n in VOLS]
        check_exact(self.ops, prim, self.ops[-1].seq if self.ops else 0,
                    what="primary")
        assert prim == imgs, first_diff(prim, imgs)


@pytest.fixture
def cluster_factory():
    with rsgnodes.made(Cluster, "rsg-engine-") as make:
        yield make


def rnd_data(rng, n):
    return rng.randbytes(n)


def random_ops(c, rng, n, max_len=64 << 10):
    for _ in range(n):
        vol = rng.randrange(2)
        off = rng.randrange(SIZES[vol])
        length = rng.randint(1, min(max_len, SIZES[vol] - off))
        kind = rng.choice([R.WRITE, R.WRITE, R.WRITE, R.ZERO, R.TRIM])
        c.change(vol, kind, off, length,
                 rnd_data(rng, length) if kind == R.WRITE else None)


# ---------------------------------------------------------------- model

class RsgMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.saved = fast_timing()
        self.root = tempfile.mkdtemp(prefix="rsg-model-")
        self.c = None
        self.attached = True
        self.samples = 0

    @initialize(mode=st.sampled_from(["async", "async", "sync"]))
    def setup(self, mode):
        self.c = Cluster(self.root, mode=mode)
        self.c.g.sync_timeout = 1.0
        self.mode = mode
        event("mode " + mode)

    def teardown(self):
        try:
            if self.c is not None:
                if self.c.tb is None:
                    self.c.start_secondary()
                if not self.attached:
                    self.c.ta.rsg_attach("g", self.c.addr)
                self.c.check_final()
                event("updates at the end: %s" % (
                    "<50" if len(self.c.ops) < 50 else ">=50"))
                if self.c.seq_reused:
                    event("sequence numbers reused after a primary crash")
        finally:
            if self.c is not None:
                self.c.close()
            shutil.rmtree(self.root, ignore_errors=True)
            restore_timing(self.saved)

    @rule(vol=st.integers(0, 1),
          kind=st.sampled_from([R.WRITE, R.WRITE, R.WRITE, R.ZERO, R.TRIM]),
          off=st.integers(0, SIZES[0] - 1),
          length=st.integers(1, 200 << 10),
          align=st.booleans(), seed=st.integers(0, 2 ** 32))
    def host_change(self, vol, kind, off, length, align, seed):
        size = SIZES[vol]
        off %= size
        if align:
            off -= off % GRAN
            length = max(GRAN, length - length % GRAN)
        length = max(1, min(length, size - off))
        data = random.Random(seed).randbytes(length) \
            if kind == R.WRITE else None
        link = self.c.link
        sync_ok = self.mode == "sync" and link.state == R.REPLICATING
        op = self.c.change(vol, kind, off, length, data)
        if sync_ok and link.state == R.REPLICATING and \
                link.mode == "sync":
            # Still replicating after the write returned: it was acked.
            assert link.acknowledged >= op.seq, (op, self.c.status())

    @rule(n=st.integers(1, 30), seed=st.integers(0, 2 ** 32))
    def burst_with_samples(self, n, seed):
        """A writer thread; the secondary is sampled meanwhile (each sample
        must be a prefix)."""
        rng = random.Random(seed)
        err = []

        def writer():
            try:
                random_ops(self.c, rng, n, max_len=32 << 10)
            except BaseException as e:      # pragma: no cover
                err.append(e)
        th = threading.Thread(target=writer)
        th.start()
        while th.is_alive():
            if self.c.check_sample() is not None:
                self.samples += 1
            time.sleep(0.005)
        th.join()
        assert not err, err
        if self.c.check_sample() is not None:
            self.samples += 1

    @rule()
    def flush(self):
        self.c.flush()

    @precondition(lambda self: self.c.tb is not None)
    @rule()
    def restart_secondary(self):
        self.c.restart_secondary()

    @precondition(lambda self: self.c.tb is not None)
    @rule()
    def stop_secondary(self):
        self.c.stop_secondary()

    @precondition(lambda self: self.c.tb is None)
    @rule()
    def start_secondary(self):
        self.c.start_secondary()

    @precondition(lambda self: self.attached)
    @rule()
    def detach(self):
        self.c.ta.rsg_detach("g", self.c.addr)
        self.attached = False

    @precondition(lambda self: not self.attached)
    @rule()
    def attach(self):
        self.c.ta.rsg_attach("g", self.c.addr)
        self.attached = True

    @rule(seed=st.integers(0, 2 ** 32), cut=st.booleans())
    def overflow(self, seed, cut):
        """More than the SRL holds, in 256K writes (and a cut link first,
        sometimes, so it surely overflows)."""
        rng = random.Random(seed)
        if cut and self.c.tb is not None:
            self.c.stop_secondary()
        before = self.c.link.replays, self.c.link.logging
        for _ in range(5):
            off = rng.randrange(0, SIZES[0] - (256 << 10))
            self.c.write(0, off, rng.randbytes(256 << 10))
        if self.c.link.logging and not before[1]:
            event("SRL overflow -> DCM logging")

    @rule()
    def crash_primary(self):
        self.c.crash_primary()
        self.c.g.sync_timeout = 1.0
        event("primary crash")

    @rule()
    def checkpoint(self):
        """Wait for convergence, compare exactly."""
        if self.c.tb is None:
            self.c.start_secondary()
        if not self.attached:
            self.c.ta.rsg_attach("g", self.c.addr)
            self.attached = True
        self.c.check_final()
        event("checkpoint")

    @invariant()
    def secondary_is_a_prefix(self):
        if self.c is not None and self.c.check_sample() is not None:
            self.samples += 1


RsgMachine.TestCase.settings = settings(
    max_examples=examples("RSG_MODEL_EXAMPLES", 40, 10),
    stateful_step_count=int(os.environ.get("RSG_MODEL_STEPS", "15")),
    deadline=None, database=None,   # timing-dependent: no stale replays
    suppress_health_check=list(HealthCheck))
TestRsgModel = tolerate_timing_in_generation(RsgMachine.TestCase)


# ---------------------------------------------------------------- deterministic

def staged_seq(sg):
    seqs = [sg.applied_seq]
    for i in (0, 1):
        s = sg._read_slot(i)
        if s:
            seqs.append(s["last"])
    return max(seqs)


def test_sync_write_is_on_secondary_when_it_returns(cluster_factory):
    c = cluster_factory(mode="sync")
    c.wait_converged()
    rng = random.Random(5)
    for i in range(40):
        vol = rng.randrange(2)
        off = rng.randrange(SIZES[vol] - 8192)
        op = c.write(vol, off, rng.randbytes(rng.randint(1, 8192)))
        assert c.link.state == R.REPLICATING, c.status()
        # Applied there when it returns; durable there after a flush.
        assert c.link.acknowledged >= op.seq
        assert c.sg.applied_seq >= op.seq, (op, c.status())
        if i % 8 == 7:
            c.ta.lus[VOLS[vol]].flush()
            assert c.link.acked_seq >= op.seq
            assert staged_seq(c.sg) >= op.seq, (op, c.status())
    c.check_final()


def test_sync_link_to_hung_secondary_times_out_into_dcm(cluster_factory):
    c = cluster_factory(mode="sync")
    c.wait_converged()
    c.g.sync_timeout = 0.5
    gate = threading.Event()
    sg = c.sg
    orig = sg._apply_entries

    def hung_apply(*a):
        gate.wait(30)          # a secondary that stops answering
        return orig(*a)
    sg._apply_entries = hung_apply
    try:
        t0 = time.monotonic()
        op = c.write(0, 5 * GRAN + 100, b"\xab" * 3000)
        took = time.monotonic() - t0
        assert 0.4 <= took < 2.0, took
        link = c.link
        assert link.dcm_active and link.state in (R.DCM_LOGGING, R.DCM_REPLAY)
        a, b = link.dcm.range_of(0, op.off, op.length)
        assert all(link.dcm.bits[a:b]), "the timed-out write is not in the DCM"
        assert "did not acknowledge" in (link.error or "") or \
            link.state == R.DCM_REPLAY
        t0 = time.monotonic()
        c.write(1, 0, b"\xcd" * 512)
        assert time.monotonic() - t0 < 0.4, "a second write waited again"
    finally:
        gate.set()
    c.check_final()


def srl_entries(g, pos):
    out = []
    while pos < g.srl.head_pos:
        e = g.srl.read(pos)
        if e is None:
            break
        out.append((pos, e))
        pos = e[7]
    return out


def _set_faults(path, rules):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rules, f)
    os.rename(tmp, path)       # re-read by the hook when the file changes


@pytest.mark.parametrize("op,code", [("write", "ENOSPC"), ("flush", "EIO"),
                                     ("read", "EIO")])
def test_failing_srl_switches_links_to_dcm_and_loses_nothing(
        cluster_factory, tmp_path, monkeypatch, op, code):
    """A failing SRL device (CLONECTL_FAULTS, target/backends.py): host
    writes and flushes go on (the volumes are fine), the link logs to its
    DCM with the error in status, and once the SRL works again the replay
    makes the secondary equal the primary.  A failing read (the sender
    reading entries back) is no lost connection to retry for ever."""
    # The SRL is tried again a second after it failed (not five): still
    # long after the wait below saw the failure.
    monkeypatch.setattr(R.link, "SRL_RETRY", 1.0)
    faults = tmp_path / "faults.json"
    _set_faults(faults, [])
    monkeypatch.setenv("CLONECTL_FAULTS", str(faults))
    c = cluster_factory()
    c.wait_converged()
    rng = random.Random(11)
    random_ops(c, rng, 20)
    c.wait_converged()
    srl = os.path.join(c.A, "rsg", "g.srl")
    _set_faults(faults, [{"path": srl, "op": op, "errno": code}])
    random_ops(c, rng, 30)          # no exception: the writes are made
    c.flush()
    wait_for(lambda: c.link.logging and code in (c.link.error or ""),
             what="DCM logging with the SRL's error", info=c.status)
    assert "SRL failed" in c.link.status()["error"], c.status()
    _set_faults(faults, [])
    random_ops(c, rng, 20)
    c.flush()
    c.check_final()
    assert c.link.replays >= 1


def test_secondary_closing_under_a_session_sends_no_fail(cluster_factory):
    """A secondary that closes while it serves a primary (its LUs going
    away under a replay: "no LU named 'v1'", found by the model test under
    load) must not answer with FAIL, which stops the primary's link for
    good; it drops the connection and the primary comes back.  A bad frame
    stands in for the error the closing target causes."""
    c = cluster_factory()
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)    # the real primary stays away
    primary_end, secondary_end = socket.socketpair()
    try:
        sg = c.sg
        server = threading.Thread(target=sg.serve,
                                  args=(secondary_end, {}, "127.0.0.1"))
        server.start()
        time.sleep(0.2)             # serving: waiting for a frame
        sg.closed = True            # the target began to close
        R.send_frame(primary_end, b"XXXX")
        server.join(10)
        assert not server.is_alive()
        primary_end.settimeout(0.5)
        try:
            answer = primary_end.recv(64)
        except socket.timeout:
            answer = b""
        assert b"FAIL" not in answer, answer
    finally:
        primary_end.close()
        secondary_end.close()


def test_volume_write_failing_after_it_was_logged_is_not_replicated(
        cluster_factory, tmp_path, monkeypatch):
    """A volume write that fails (EIO from the device, CLONECTL_FAULTS)
    after its change was appended to the SRL must not reach the secondary
    as if it had been made: the host gets the error, the links replay the
    region, and the secondary ends up equal to the primary."""
    faults = tmp_path / "faults.json"
    _set_faults(faults, [])
    monkeypatch.setenv("CLONECTL_FAULTS", str(faults))
    c = cluster_factory()
    c.wait_converged()
    lu_file = os.path.join(c.A, "lus", VOLS[0] + ".img")
    _set_faults(faults, [{"path": lu_file, "op": "write", "offset": 0,
                          "length": 65536, "errno": "EIO"}])
    g = c.g
    with pytest.raises(OSError) as e:
        c.ta.lus[VOLS[0]].write(b"\xee" * 4096, 8192)
    assert e.value.errno == 5
    error_then = c.link.error or ""
    _set_faults(faults, [])
    c.ops.clear()           # the model's ops are not used below
    c.ta.lus[VOLS[0]].write(b"\x11" * 4096, 1 << 16)
    c.wait_converged()
    prim = [read_image(c.ta, n) for n in VOLS]
    sec = [read_image(c.tb, n) for n in VOLS]
    assert prim[0][8192:12288] != b"\xee" * 4096
    assert prim == sec, first_diff(prim, sec)
    assert g.next_seq - 1 == c.sg.applied_seq
    assert "failed after it was logged" in error_then, error_then


def test_corrupt_srl_entry_stops_link_nothing_applied(cluster_factory,
                                                      monkeypatch):
    # The link reads every entry back from the file (the newest are
    # otherwise sent from memory, where the file's damage is not).
    monkeypatch.setattr(R.srl, "RECENT_BYTES", 0)
    c = cluster_factory()
    c.wait_converged()
    c.write(0, 0, b"\x01" * 4096)
    c.wait_converged()
    before = c.sg.applied_seq
    c.stop_secondary()
    ops = [c.write(0, (i + 2) * 8192, bytes([i + 2]) * 8192) for i in range(5)]
    c.flush()
    entries = [(p, e) for p, e in srl_entries(c.g, c.link.acked_pos)
               if e[0] >= ops[0].seq]
    pos, e = next((p, e) for p, e in entries if e[0] == ops[2].seq)
    phys = R.SRL_DATA_START + pos % c.g.srl.capacity + R.SRL_ENTRY.size + 10
    fd = os.open(c.g.files.srl, os.O_RDWR)
    try:
        b = os.pread(fd, 1, phys)
        os.pwrite(fd, bytes([b[0] ^ 0xff]), phys)
    finally:
        os.close(fd)
    c.start_secondary()
    wait_for(lambda: c.link.stopped_error, 10, "the link to stop", c.status)
    assert "fails its checksum" in c.link.stopped_error
    assert "fails its checksum" in c.link.status()["error"]
    time.sleep(0.5)
    assert c.link.state == R.FAILED
    sg = c.sg
    assert sg.applied_seq < ops[2].seq and sg.applied_seq >= before
    s = c.sample()
    check_exact(c.ops, s[1], s[0])
    assert s[1][0][6 * 8192:7 * 8192] != bytes([4]) * 8192


def test_volume_change_replays_exactly_its_regions(cluster_factory):
    """A volume change's regions are replayed, and nothing else: host
    writes meanwhile are streamed (the link never logs), and the replay
    reads nothing until the operation has changed the volume."""
    c = cluster_factory()
    c.write(0, 0, b"\x07" * 100)
    c.wait_converged()
    g, link = c.g, c.link
    sent0 = link.sent_bytes
    region_gran = 8192
    bits = bytearray(SIZES[0] // region_gran)
    for i in (3, 10, 11):
        bits[i] = 1
    begun = g.begin_volume_change(0, bits, region_gran, "a test restore")
    assert link.phase == (R.DCM_REPLAY, R.link.SRL_DCM)
    # The operation changes those regions below the group (no SRL).
    inner = c.ta.lus[VOLS[0]].stack.below("replication")
    rng = random.Random(9)
    for i in (3, 10, 11):
        inner.write(rng.randbytes(region_gran), i * region_gran)
    # A host write meanwhile (one 4K extent of v2) is streamed.
    op = c.write(1, 4 * GRAN, b"\x09" * GRAN)
    wait_for(lambda: link.acked_seq >= op.seq, 10, "the write", c.status)
    assert link.state == R.DCM_REPLAY and link.replay_done == 0
    want = set()
    base = link.dcm.bases
    for i in (3, 10, 11):
        want |= {base[0] + i * 2, base[0] + i * 2 + 1}
    assert {i for i, v in enumerate(link.dcm.bits) if v} == want
    g.end_volume_change(begun)
    wait_for(lambda: link.state == R.REPLICATING, 10, "the replay",
             c.status)
    assert link.replay_total == len(want) == 6
    assert link.sent_bytes - sent0 < len(want) * GRAN + 64 << 10
    wait_for(lambda: c.sg.applied_seq == g.next_seq - 1 and c.sg.consistent)
    prim = [read_image(c.ta, n) for n in VOLS]
    sec = [read_image(c.tb, n) for n in VOLS]
    assert prim == sec, first_diff(prim, sec)


def test_replay_cut_before_the_secondary_began_it_is_replayed_again(
        cluster_factory, monkeypatch):
    """A replay cut after the link joined the SRL stream but before the
    secondary began it: at the next handshake the secondary is consistent
    and has every update the link counts as acknowledged, yet the DCM's
    regions (here a restore's, which has no sequence numbers) never
    reached it.  The link replays them again; it must not stream on with
    its DCM set."""
    c = cluster_factory()
    c.write(0, 0, b"\x07" * 100)
    c.wait_converged()
    g, link = c.g, c.link
    cut = []
    orig = R.link.send_json

    def cut_before_rbeg(sock, kind, obj):
        if kind == b"RBEG" and not cut:
            cut.append(link.phase)
            raise ConnectionError("cut before the replay began")
        return orig(sock, kind, obj)
    monkeypatch.setattr(R.link, "send_json", cut_before_rbeg)
    region_gran = 8192
    bits = bytearray(SIZES[0] // region_gran)
    bits[3] = 1
    begun = g.begin_volume_change(0, bits, region_gran, "a test restore")
    inner = c.ta.lus[VOLS[0]].stack.below("replication")
    inner.write(b"\x5a" * region_gran, 3 * region_gran)
    g.end_volume_change(begun)
    wait_for(lambda: cut, 10, "the cut", c.status)
    assert cut[0] == (R.DCM_REPLAY, R.link.SRL_DCM)
    c.wait_converged()
    wait_for(lambda: link.dcm.count() == 0 and link.state == R.REPLICATING,
             10, "the DCM replayed", c.status)
    prim = [read_image(c.ta, n) for n in VOLS]
    sec = [read_image(c.tb, n) for n in VOLS]
    assert prim == sec, first_diff(prim, sec)


def test_history_diverges():
    hd = R.history_diverges
    g1, g2, g9 = [["g1", 1]], [["g1", 1], ["g2", 101]], [["g9", 1]]
    # Same line, equal or secondary behind.
    assert hd(g1, 50, g1, 50) == (False, 50)
    assert hd(g1, 50, g1, 20) == (False, 20)
    # Same line, the secondary ahead: it holds updates never had here.
    assert hd(g1, 20, g1, 50) == (True, 20)
    # Promoted node (g2 from 101) vs the demoted old primary.
    assert hd(g2, 130, g1, 150) == (True, 100)   # wrote after the branch
    assert hd(g2, 130, g1, 100) == (False, 100)  # did not
    assert hd(g2, 130, g1, 80) == (False, 80)    # was behind
    # The old primary looking at the promoted node, which wrote since.
    assert hd(g1, 150, g2, 130)[0] is True
    # Unrelated histories.
    assert hd(g1, 10, g9, 10) == (True, 0)
    assert hd(g1, 10, [], 0) == (True, 0)


def test_a_primary_gone_back_behind_its_secondary_is_a_split_brain(
        cluster_factory):
    """The primary's state directory and volumes are put back from an
    older copy while its secondary kept the updates since: one generation,
    the secondary past the primary's last update.  That is a split brain
    (the secondary holds what the primary never had), reported by the
    default policy; streaming on would have the secondary skip the
    primary's next updates as ones it holds, consistent and wrong."""
    c = cluster_factory()
    write_extents(c.ta, [(0, 1)], 1)
    c.wait_converged()
    c.a.close()
    backup = c.A + ".backup"
    shutil.copytree(c.A, backup)
    c.a.start()
    write_extents(c.ta, [(0, i) for i in range(2, 40)], 2)
    c.wait_converged()
    c.a.close()
    shutil.rmtree(c.A)
    shutil.copytree(backup, c.A)
    c.a.start()
    write_extents(c.ta, [(0, 50)], 3)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    assert c.link.split_brain is not None
    # The admin makes the primary win: the secondary gets its data back
    # wherever the updates it alone held went.
    c.ta.rsg_attach("g", c.addr, discard_secondary_changes=True)
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == images(c.tb)


# ---------------------------------------------------------- a peer's values

def test_an_update_of_an_unknown_kind_is_refused(cluster_factory):
    """An update of a kind the secondary does not know (a newer primary,
    or a bug) is refused with its batch, not applied as some other kind
    (it was applied as a trim)."""
    c = cluster_factory()
    c.write(0, 0, b"\x11" * GRAN)
    c.wait_converged()
    c.g.change(0, 3, 0, GRAN, None, lambda: None)
    wait_for(lambda: c.sg.error and "fails its checks" in c.sg.error, 10,
             "the refusal", c.status)
    assert read_image(c.tb, VOLS[0])[:GRAN] == b"\x11" * GRAN


@pytest.mark.parametrize("reply", [{"history": [[]]},
                                   {"history": "g1"},
                                   {"last_seq": [1]}])
def test_a_malformed_answer_of_the_secondary_does_not_end_the_link(
        cluster_factory, monkeypatch, reply):
    """The secondary's handshake reply holds a value of the wrong shape:
    the link says so and retries; once the answers are right again it
    replicates (its thread ended before, replication off until an
    attach or a restart)."""
    c = cluster_factory()
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None)
    real = R.SecondaryGroup.handshake
    bad = []

    def malformed(self, hello):
        answer = real(self, hello)
        if not bad:
            bad.append(True)
            answer.update(reply)
        return answer
    monkeypatch.setattr(R.SecondaryGroup, "handshake", malformed)
    c.ta.rsg_attach("g", c.addr)
    c.write(0, 0, b"\x12" * GRAN)
    c.wait_converged()
    assert bad and read_image(c.tb, VOLS[0])[:GRAN] == b"\x12" * GRAN


def test_a_peers_run_past_its_volume_marks_that_volume_only(
        cluster_factory):
    """Runs a secondary reports (its diverged regions) are cut to their
    volume: a run past the end (a huge length, by a bug or a node posing
    as the secondary) neither grows the map (a byte per extent: memory
    under the group's lock) nor marks another volume's extents."""
    c = cluster_factory()
    link = c.link
    bits = bytearray(link.dcm.extents)
    c.g._set_runs(link, bits, [[0, 4096, 1 << 40], [1, -8192, 12288],
                               [2, 0, 4096]])
    first = link.dcm.range_of(0, 4096, 1)[0]
    vol1 = link.dcm.range_of(1, 0, 1)[0]
    assert len(bits) == link.dcm.extents
    assert bits == bytes(first) + b"\x01" * (vol1 - first) + \
        b"\x01" + bytes(link.dcm.extents - vol1 - 1)


def attach_then_frame(c, monkeypatch, frame, payload):
    """c's primary detaches, then attaches again and, right after the
    handshake, sends one frame of its own (frame, payload) before what
    the link sends."""
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None)
    real = R.PrimaryGroup.accept_secondary
    sent = []

    def then_frame(self, link, reply):
        go_on = real(self, link, reply)
        if not sent:
            sent.append(frame)
            send_frame(link.sock, frame, payload)
        return go_on
    monkeypatch.setattr(R.PrimaryGroup, "accept_secondary", then_frame)
    c.ta.rsg_attach("g", c.addr)


@pytest.mark.parametrize("frame", ["RDAT", "REND"])
def test_replay_frames_outside_a_replay_are_refused(cluster_factory,
                                                    monkeypatch, frame):
    """A replay's data or end sent to a secondary outside a replay (a
    bug, or a node posing as the primary) is refused: an RDAT would write
    a volume that keeps no image and stages nothing, an REND would call
    the node consistent at any update and release its kept image."""
    c = cluster_factory()
    c.write(0, 0, b"\x11" * GRAN)
    c.wait_converged()
    if frame == "RDAT":
        data = b"\x55" * GRAN
        payload = DATA.pack(0, R.WRITE, 0, GRAN, zlib.crc32(data)) + data
    else:
        payload = R.wire.SEQ.pack(10 ** 6)
    attach_then_frame(c, monkeypatch, frame.encode(), payload)
    wait_for(lambda: c.sg.error and "outside a replay" in c.sg.error, 10,
             "the refusal", c.status)
    assert read_image(c.tb, VOLS[0])[:GRAN] == b"\x11" * GRAN
    assert c.sg.applied_seq < 10 ** 6


def test_a_sync_write_waits_for_its_own_update_whatever_is_answered(
        cluster_factory, monkeypatch):
    """A secondary acknowledging as applied an update it was never sent
    (a bug, or a node posing as the secondary) does not let a later sync
    write return before the secondary applied that write."""
    c = cluster_factory(link=False)
    c.link_up("sync")
    c.write(0, 0, b"\x01" * GRAN)
    c.wait_converged()
    real = R.secondary.send_frame
    lied = []

    def ahead(sock, kind, payload=b""):
        if kind == b"APLD" and not lied:
            lied.append(True)
            payload = R.wire.SEQ.pack(10 ** 6)
        return real(sock, kind, payload)
    monkeypatch.setattr(R.secondary, "send_frame", ahead)
    c.write(0, GRAN, b"\x02" * GRAN)
    wait_for(lambda: lied, 10, "the secondary's answer")
    for i in range(2, 20):
        op = c.write(0, i * GRAN, bytes([i]) * GRAN)
        assert c.sg.applied_seq >= op.seq, (c.sg.applied_seq, op.seq)


@pytest.mark.parametrize("history", [[[]], "g1", [["g1", "one"]],
                                     [["g1", 5], ["g2", 2]]])
def test_a_primarys_malformed_history_is_refused(cluster_factory,
                                                 monkeypatch, history):
    """A primary's hello with a history of the wrong shape is refused; the
    secondary saves nothing of it (it was saved at the next batch, and
    then every later handshake and `rsg status` of the node failed)."""
    c = cluster_factory()
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None)
    real = R.PrimaryGroup.hello

    def malformed(self):
        return dict(real(self), history=history)
    monkeypatch.setattr(R.PrimaryGroup, "hello", malformed)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.error and "history" in c.link.error, 10,
             "the refusal", c.status)
    c.write(0, 0, b"\x13" * GRAN)
    time.sleep(0.3)
    c.sg.status()
    assert c.tb.rsg_ops.target.state_dir.group_files("g").load()[
        "history"] == c.g.history
    monkeypatch.setattr(R.PrimaryGroup, "hello", real)
    c.wait_converged()


@pytest.mark.parametrize("frame, payload", [
    (b"ENTR", b"short"), (b"CMIT", b"x"), (b"PULL", b'{"runs": "x"}'),
    (b"PULL", b'{"regions": []}'), (b"VREQ", b"not json")],
    ids=["ENTR-short", "CMIT-short", "PULL-runs", "PULL-no-runs",
         "VREQ-not-json"])
def test_a_primarys_frame_that_cannot_be_read_is_refused(
        cluster_factory, monkeypatch, frame, payload):
    """A frame of the primary's too short for its kind, or of JSON of
    another shape, is refused with a message the primary shows (the
    secondary's session ended with a traceback, no message on either
    side, and the primary tried again for ever)."""
    c = cluster_factory()
    c.wait_converged()
    attach_then_frame(c, monkeypatch, frame, payload)
    wait_for(lambda: c.sg.error and frame.decode() in c.sg.error, 10,
             "the refusal", c.status)
    wait_for(lambda: c.link.stopped_error and frame.decode() in
             c.link.stopped_error, 10, "the primary told", c.status)


# ---------------------------------------------------- staging and restarts

def stage_entries(specs):
    out = []
    for seq, vol, off, data in specs:
        crc = R.entry_crc(seq, vol, R.WRITE, off, len(data), data)
        out.append((seq, vol, R.WRITE, off, len(data), crc, data))
    return out


def _secondary_only(c):
    """Converge, then stop both nodes but reopen the secondary alone."""
    c.write(0, 0, b"\x11" * 4096)
    c.wait_converged()
    c.ta.close()
    c.ta = None
    c.stop_secondary()
    tb = Target(c.B)
    c.tb = tb
    return tb.rsgs["g"]


def test_staged_unapplied_slot_is_applied_as_one_unit(cluster_factory):
    c = cluster_factory()
    sg = _secondary_only(c)
    a = sg.applied_seq
    ents = stage_entries([(a + 1, 0, 8192, b"\x21" * 5000),
                          (a + 2, 1, 100, b"\x22" * 3000),
                          (a + 3, 0, 9000, b"\x23" * 100)])   # overlaps #1
    sg._stage(ents, a + 1, a + 3)
    c.tb.close()
    c.tb = Target(c.B)
    sg = c.tb.rsgs["g"]
    assert sg.applied_seq == a + 3 and sg.consistent
    v1, v2 = read_image(c.tb, "v1"), read_image(c.tb, "v2")
    exp = bytearray(b"\x21" * 5000)
    exp[9000 - 8192:9100 - 8192] = b"\x23" * 100
    assert v1[8192:13192] == bytes(exp)
    assert v2[100:3100] == b"\x22" * 3000


def test_torn_stage_slot_is_ignored(cluster_factory):
    c = cluster_factory()
    sg = _secondary_only(c)
    a = sg.applied_seq
    v1 = read_image(c.tb, "v1")
    path = sg._stage(stage_entries([(a + 1, 0, 8192, b"\x31" * 5000)]),
                     a + 1, a + 1)
    os.truncate(path, os.path.getsize(path) - 10)
    c.tb.close()
    c.tb = Target(c.B)
    sg = c.tb.rsgs["g"]
    assert sg.applied_seq == a
    assert read_image(c.tb, "v1") == v1


def test_secondary_restart_twice_after_unapplied_batch(cluster_factory,
                                                      monkeypatch):
    """A batch re-applied by recovery must not be applied again by the
    next recovery, over newer batches."""
    c = cluster_factory()
    c.wait_converged()
    hit, gate = threading.Event(), threading.Event()

    def dies(self, entries):
        # The secondary dies after staging and acking, before applying.
        hit.set()
        gate.wait(10)
        raise OSError("killed")
    monkeypatch.setattr(R.SecondaryGroup, "_apply_entries", dies)
    c.write(0, 2062, random.Random(1).randbytes(2758))
    assert hit.wait(5)
    monkeypatch.undo()
    gate.set()              # it dies now (a closing target waits for it)
    c.stop_secondary()
    c.start_secondary()
    c.write(0, 2758, random.Random(2).randbytes(1830))
    c.wait_converged()
    c.check_final()
    c.restart_secondary()
    s = c.sample()
    assert s is not None
    check_exact(c.ops, s[1], s[0])


def test_lag_zero_after_lost_ack(cluster_factory):
    """An ack lost with the link leaves no lag behind: once the restarted
    secondary has caught up, the primary reports lag 0 without waiting for
    a further write."""
    c = cluster_factory()
    c.wait_converged()
    c.write(0, 0, b"\x01" * 2048)
    c.wait_converged()
    orig = R.secondary.send_frame
    dropped = []

    def lossy(sock, kind, payload=b""):
        if kind == b"ACKS" and not dropped:
            dropped.append(payload)     # the ack is lost with the link
            return
        return orig(sock, kind, payload)
    R.secondary.send_frame = lossy
    try:
        c.write(0, 4096, b"\x02" * 2048)
        wait_for(lambda: dropped and c.sg.applied_seq == c.g.next_seq - 1)
    finally:
        R.secondary.send_frame = orig
    c.restart_secondary()
    c.wait_converged()
    wait_for(lambda: c.link.status()["lag_updates"] == 0, 3,
             "lag 0", c.status)
    assert c.link.status()["lag_bytes"] == 0



def test_no_sequence_number_reused_after_crash_while_unlogged(
        cluster_factory):
    """Changes made while no link holds the SRL get numbers that are not
    in the SRL; a crash must not hand them out again (they could name a
    state a secondary or a demoted node reports)."""
    c = cluster_factory()
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    for i in range(3):
        c.write(0, i * 8192, bytes([i + 1]) * 4096)
    used = c.ops[-1].seq
    c.crash_primary()
    assert c.g.next_seq > used, (c.g.next_seq, used)
    c.ta.rsg_attach("g", c.addr)
    c.write(1, 0, b"\x07" * 4096)
    c.check_final()


def test_lag_zero_after_crash_while_logged(cluster_factory):
    """A crash while the link streams: the numbers come back from the SRL,
    no jump, so an idle group shows no lag after the restart."""
    c = cluster_factory()
    c.wait_converged()
    for i in range(5):
        c.write(0, i * 4096, bytes([i + 9]) * 4096)
    c.wait_converged()
    c.crash_primary()
    c.wait_converged()
    wait_for(lambda: c.link.status()["lag_updates"] == 0, 5, "lag 0",
             c.status)
    c.check_final()



def test_one_session_at_a_time_on_a_secondary(cluster_factory, monkeypatch):
    """A primary that reconnects while the secondary still applies a batch
    of the old connection waits for that session to end: the handshake
    then reports the batch applied, and no replay is needed.  (Before,
    the new session's handshake saw the batch not yet applied, below what
    the primary had as acknowledged, and a full replay followed while the
    old session still ran.)"""
    c = cluster_factory()
    c.wait_converged()
    replays = c.link.replays
    orig_apply = R.SecondaryGroup._apply_entries
    applying = threading.Event()

    def slow_apply(self, entries):
        if not applying.is_set():
            applying.set()
            time.sleep(2)       # longer than the primary takes to reconnect
        return orig_apply(self, entries)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_entries", slow_apply)
    c.write(0, 0, b"\x11" * 4096)
    assert applying.wait(5)
    wait_for(lambda: c.link.acked_seq == c.g.next_seq - 1, 5, "the ack")
    # The primary's connection breaks; it reconnects at once.
    c.link.sock.shutdown(socket.SHUT_RDWR)
    c.write(0, 4096, b"\x12" * 4096)
    c.wait_converged()
    assert c.link.replays == replays, c.status()
    c.check_final()

# ---------------------------------------------------------------- twins

def _replay_with_concurrent_writes(c, monkeypatch, drop_replay_entries):
    c.write(1, 0, b"\x05" * 4096)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    rng = random.Random(3)
    for i in range(4):      # 4 separate runs in the DCM (v1)
        c.write(0, i * (256 << 10), rng.randbytes(64 << 10))
    orig = R.Link._send_entries
    injected = []

    def patched(self, sock, send_pos, until_pos, epoch, *rest):
        if self.state == R.DCM_REPLAY:
            if len(injected) < 4:
                # A host write while the replay runs, outside its runs.
                injected.append(c.write(1, (len(injected) + 2) * 8192,
                                        rng.randbytes(5000)))
            if drop_replay_entries:
                return until_pos          # protection off
        return orig(self, sock, send_pos, until_pos, epoch, *rest)
    monkeypatch.setattr(R.Link, "_send_entries", patched)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: len(injected) >= 4 and c.link.replays >= 2, 10,
             "the replay", c.status)
    c.write(0, 1000, b"\x06" * 10)      # later stream traffic
    c.check_final()


def test_replay_streams_concurrent_writes(cluster_factory, monkeypatch):
    _replay_with_concurrent_writes(cluster_factory(), monkeypatch, False)


def test_twin_replay_without_entries_is_detected(cluster_factory,
                                                 monkeypatch):
    with pytest.raises(AssertionError, match="not the model's state"):
        _replay_with_concurrent_writes(cluster_factory(), monkeypatch, True)


def _pending_then_detach(c, monkeypatch, skip_mark_pending):
    c.wait_converged()
    c.stop_secondary()
    rng = random.Random(4)
    for i in range(6):      # in the SRL, never acknowledged
        c.write(i % 2, rng.randrange(0, 400 << 10), rng.randbytes(6000))
    if skip_mark_pending:
        monkeypatch.setattr(R.PrimaryGroup, "_mark_pending",
                            lambda self, link, *a: None)
    c.ta.rsg_detach("g", c.addr)
    c.start_secondary()
    c.ta.rsg_attach("g", c.addr)
    c.check_final()


def test_detach_marks_pending_entries(cluster_factory, monkeypatch):
    _pending_then_detach(cluster_factory(), monkeypatch, False)


def test_twin_detach_without_mark_pending_is_detected(cluster_factory,
                                                      monkeypatch):
    with pytest.raises(AssertionError, match="not the model's state"):
        _pending_then_detach(cluster_factory(), monkeypatch, True)


def _batch_order(c, monkeypatch, reverse):
    c.wait_converged()
    c.stop_secondary()
    for i in range(4):      # one batch of overlapping writes on reconnect
        c.write(0, 4096 + i * 100, bytes([0x40 + i]) * 3000)
    if reverse:
        orig = R.SecondaryGroup._apply_entries
        monkeypatch.setattr(R.SecondaryGroup, "_apply_entries",
                            lambda self, ents: orig(self, ents[::-1]))
    c.start_secondary()
    c.check_final()


def test_batch_applied_in_order(cluster_factory, monkeypatch):
    _batch_order(cluster_factory(), monkeypatch, False)


def test_twin_batch_applied_reversed_is_detected(cluster_factory,
                                                 monkeypatch):
    with pytest.raises(AssertionError, match="not the model's state"):
        _batch_order(cluster_factory(), monkeypatch, True)


# ---------------------------------------------------------------- seams
# Replication meeting clones on the same LU: every path into the volume's
# bytes must pass the same layers (target/iostack.py).

def clone_state(t, name):
    return t.clone_status(name)["state"]


def synced_clone(t, source, name):
    t.clone_add(source, name)
    t.clone_sync(name)
    wait_for(lambda: clone_state(t, name) == "synchronized",
             what="clone {} synchronized".format(name),
             info=lambda: t.clone_status(name))


def primary_came_and_went(c, offset, data):
    """The primary comes back, writes data at offset of v1, and is
    detached again once the secondary has it."""
    c.ta.rsg_attach("g", c.addr)
    c.write(0, offset, data)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")


def detached_secondary_with_snapshot(cluster_factory, rewritten=SIZES[0]):
    """A cluster whose secondary has a fractured clone "snap" of v1 taken
    while detached, v1's first `rewritten` bytes rewritten by the primary
    since, and the link detached again (the secondary may change its
    volume on its own)."""
    c = cluster_factory()
    c.write(0, 0, b"\x01" * SIZES[0])
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")
    synced_clone(c.tb, VOLS[0], "snap")
    c.tb.clone_fracture("snap")
    primary_came_and_went(c, 0, b"\x02" * rewritten)
    return c


def clone_image(t, name):
    group, clone = t.clone_ops.find(name)
    buf = bytearray(group.size)
    clone.backend.readinto(buf, 0)
    return bytes(buf)


def fractured_snap(c, rng, moved):
    """v1 written from rng, a clone "snap" of it synchronized and
    fractured, then v1's first `moved` bytes rewritten; converged."""
    c.write(0, 0, rng.randbytes(SIZES[0]))
    synced_clone(c.ta, VOLS[0], "snap")
    c.ta.clone_fracture("snap")
    c.write(0, 0, rng.randbytes(moved))
    c.wait_converged()


def start_held(c, monkeypatch, start):
    """start() (a restore or reverse sync of "snap" onto v1) with the
    clone engines held, recorded in the model as a SET of the clone's
    data (hosts see it at once).  Returns the engines' release."""
    release = hold_engines(monkeypatch)
    with c.lock:
        c.ops.append(Op(c.g.next_seq - 0.5, 0, rsgmodel.SET, 0, SIZES[0],
                        clone_image(c.ta, "snap")))
        start()
    return release


def release_until(c, release, state, what):
    """Lets v1's held clone engine go; waits for "snap" to be in state."""
    release(c.ta.groups[VOLS[0]])
    wait_for(lambda: clone_state(c.ta, "snap") == state, 30, what,
             lambda: c.ta.clone_status("snap"))


@contextlib.contextmanager
def sampled(c, crashing=False):
    """c.check_sample() in a thread while the block runs; its first
    failure fails the test after the block.  crashing: the primary
    restarts meanwhile, other errors of a sample are passed over."""
    failures, done = [], threading.Event()

    def sample():
        while not done.is_set():
            try:
                c.check_sample()
            except AssertionError as e:
                failures.append(e)
                return
            except Exception:
                if not crashing:
                    raise
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
    assert not failures, failures[0]


def host_write(c, rng, i):
    """A write of 1 to 8192 random bytes to the primary's volume i % 2,
    in the model.  Returns its Op."""
    vol = i % 2
    off = rng.randrange(SIZES[vol] - 8192)
    data = rng.randbytes(rng.randint(1, 8192))
    with c.lock:
        # A write of a restoring Source copies on demand first: its
        # number is the last one given out.
        c.ta.lus[VOLS[vol]].write(data, off)
        op = Op(c.g.next_seq - 1, vol, R.WRITE, off, len(data), data)
        c.ops.append(op)
    return op


def test_clone_of_secondary_volume_sees_replicated_writes(cluster_factory):
    """A synchronized clone of a secondary's volume is a copy of it: the
    replicated apply enters the volume's I/O stack below the read guard,
    so the clone mirrors every batch (before, the apply wrote the backing
    file under the clone group: 'synchronized, 0 dirty' yet stale)."""
    c = cluster_factory(mode="sync", link=False)
    synced_clone(c.tb, VOLS[0], "snap")
    c.ta.rsg_link("g", c.addr, "sync", c.tok)
    c.wait_converged()
    rng = random.Random(11)
    for i in range(16):
        c.write(0, i * 65536, rng.randbytes(65536))
    c.flush()
    c.wait_converged()
    volume = read_image(c.tb, VOLS[0])
    assert clone_state(c.tb, "snap") == "synchronized"
    assert clone_image(c.tb, "snap") == volume
    c.tb.clone_fracture("snap")
    assert clone_image(c.tb, "snap") == volume
    c.check_final()


def test_clone_sync_on_secondary_keeps_its_read_guard(cluster_factory):
    """An inconsistent secondary refuses reads; starting a clone sync (or
    any clone operation) must not swap that guard out of the read path."""
    c = cluster_factory()
    c.write(0, 0, b"\x05" * 8192)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")
    sg = c.sg
    sg.consistent = False           # a replay broken off by a cut
    sg.reason = "a replay was interrupted"
    lu = c.tb.lus[VOLS[0]]
    with pytest.raises(R.ReplicaUnavailable):
        lu.read(bytearray(4096), 0)
    synced_clone(c.tb, VOLS[0], "snap")
    with pytest.raises(R.ReplicaUnavailable):
        lu.read(bytearray(4096), 0)


def test_a_host_connecting_as_a_demotion_begins_refuses_it(
        cluster_factory, monkeypatch):
    """A demotion reports the regions this node wrote that no secondary
    acknowledged, then puts the secondary's guard in place: a host write
    between the two is in no map.  Hosts are counted again once every
    volume is withdrawn (no new connection opens): one that connected
    between the first look and the withdrawal refuses it too."""
    c = cluster_factory()
    c.write(0, 0, b"\x01" * 4096)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    withdraw = c.ta.gateway.withdraw
    hosts = []

    def connect_first(name, obj):
        if not hosts:
            hosts.append(c.ta.connect(VOLS[0], False))
        withdraw(name, obj)
    monkeypatch.setattr(c.ta.gateway, "withdraw", connect_first)
    with pytest.raises(R.RsgBusy):
        c.ta.rsg_demote("g")
    assert hosts
    assert c.ta.rsgs["g"].role == R.PRIMARY
    # Given back: the host writes, a new host connects.
    hosts[0].export.write(b"\x02" * 4096, 0)
    c.ta.disconnect(c.ta.connect(VOLS[0], False))
    c.ta.disconnect(hosts[0])
    c.ta.rsg_demote("g")
    assert c.ta.rsgs["g"].role == R.SECONDARY


def _detached_with_v2_mounted(cluster_factory):
    """A primary A whose link is detached, the iSCSI gateway mounting
    its v2: (Target A, v2)."""
    c = cluster_factory()
    c.write(0, 0, b"\x01" * 4096)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    v2 = c.ta.lus[VOLS[1]]
    with c.ta.lock:
        c.ta.gateway.opened(v2)
    return c.ta, v2


def test_a_timed_out_demotion_gives_back_only_its_own(cluster_factory,
                                                      monkeypatch):
    """A demotion whose wait for the gateway times out gives back only
    the volumes it withdrew: withdrawals nest, and another demotion
    still waiting holds v2."""
    t, v2 = _detached_with_v2_mounted(cluster_factory)
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 1.0)
    errs = {}

    def demote(key):
        try:
            t.rsg_demote("g")
        except Exception as e:      # noqa: reported below
            errs[key] = e
    first = threading.Thread(target=demote, args=("first",))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=demote, args=("second",))
    second.start()
    first.join(5)                   # timed out waiting for the gateway
    assert isinstance(errs.get("first"), gateway_route.GatewayHolds), errs
    # The second demotion still waits for the gateway to let go of v2,
    # so v2 must not be exported.
    assert second.is_alive()
    exported = VOLS[1] in t.export_modes()
    with t.lock:
        t.gateway.closed(v2)        # the gateway lets go
    second.join(5)
    assert not exported, (
        "v2 exported again while the second demotion holds it: {}".format(
            dict(t.gateway.withdrawn)))


def test_a_refused_delete_leaves_a_demotions_withdrawal(cluster_factory,
                                                        monkeypatch):
    """A refused `lu delete` gives back nothing it did not withdraw: v1
    stays withdrawn while the demotion waits for the gateway."""
    t, v2 = _detached_with_v2_mounted(cluster_factory)
    monkeypatch.setattr(gateway_route, "GATEWAY_LET_GO_TIMEOUT", 20)
    demotion = threading.Thread(target=lambda: t.rsg_demote("g"))
    demotion.start()
    deadline = time.monotonic() + 5
    while VOLS[1] not in t.gateway.withdrawn:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(errors.LUBusy):
        t.lu_delete(VOLS[0])
    exported = VOLS[0] in t.export_modes()
    with t.lock:
        t.gateway.closed(v2)
    demotion.join(10)
    assert not exported, "v1 exported again mid-demotion"


def test_a_verify_during_a_restore_compares_what_hosts_read(cluster_factory,
                                                           monkeypatch):
    """While a protected restore runs, a verify compares what hosts read
    (the clone's data, copied yet or not), as the replay and the stream
    send it.  Read from the volume below the restore, every extent not
    copied yet was found "differing", marked and replayed."""
    c = cluster_factory()
    fractured_snap(c, random.Random(5), SIZES[0])
    release = hold_engines(monkeypatch)
    c.ta.clone_restore("snap")
    try:
        c.wait_converged()
        replays = c.link.replays
        with c.g.cond:
            job = c.link.start_verify()
        wait_for(lambda: not job.running, 30, "the verify", c.status)
    finally:
        release(c.ta.groups[VOLS[0]])
    v = job.to_dict()
    assert v["extents_differing"] == 0, v
    assert v["extents_compared"] == sum(s // GRAN for s in SIZES), v
    assert c.link.replays == replays


def test_demote_during_restore_keeps_serving_restored_data(cluster_factory,
                                                          monkeypatch):
    """A protected restore shows the clone's data for every extent at
    once; demoting the primary must not take copy on demand out of the
    read path (before, unrestored extents read as pre-restore data)."""
    c = cluster_factory()
    c.write(0, 0, b"\x0a" * SIZES[0])
    synced_clone(c.ta, VOLS[0], "snap")
    c.ta.clone_fracture("snap")
    c.write(0, 0, b"\x0b" * SIZES[0])       # the Source moves on
    c.wait_converged()
    release = hold_engines(monkeypatch)
    c.ta.clone_restore("snap")
    assert clone_state(c.ta, "snap") == "restoring"
    c.ta.rsg_detach("g", c.addr)
    c.ta.rsg_demote("g")
    assert clone_state(c.ta, "snap") == "restoring"
    lu = c.ta.lus[VOLS[0]]
    buf = bytearray(SIZES[0])
    lu.read(buf, 0)
    release(c.ta.groups[VOLS[0]])
    assert bytes(buf) == b"\x0a" * SIZES[0]


def test_primary_refused_while_secondary_restores(cluster_factory,
                                                  monkeypatch):
    """A restore on a detached secondary changes its volume on its own; a
    primary that connects meanwhile is refused (it retries) until the
    restore ends, then replays what the restore changed."""
    c = detached_secondary_with_snapshot(cluster_factory)
    release = hold_engines(monkeypatch)
    c.tb.clone_restore("snap")
    assert clone_state(c.tb, "snap") == "restoring"
    applied = c.sg.applied_seq
    c.ta.rsg_attach("g", c.addr)
    c.write(0, 65536, b"\x03" * 65536)
    time.sleep(1.0)
    assert clone_state(c.tb, "snap") == "restoring"
    assert c.sg.connected_since is None, c.status()
    assert c.sg.applied_seq == applied
    assert "the protected restore of {} from clone snap is running on " \
        "this secondary".format(VOLS[0]) in (c.link.error or ""), c.status()
    release(c.tb.groups[VOLS[0]])
    wait_for(lambda: clone_state(c.tb, "snap") == "fractured", 30,
             "the restore", lambda: c.tb.clone_status("snap"))
    c.check_final()


def test_secondary_volume_refuses_writes_from_above(cluster_factory):
    """A connection opened before the LU became a secondary's volume (the
    iSCSI gateway's mount, until its next poll) must not write it: the
    guard refuses every write that enters above it; replication, which
    enters below, goes on."""
    c = cluster_factory()
    c.wait_converged()
    lu = c.tb.lus[VOLS[0]]
    before = read_image(c.tb, VOLS[0])
    for write in (lambda: lu.write(b"\xff" * 4096, 0),
                  lambda: lu.zero(0, 4096),
                  lambda: lu.trim(0, 4096)):
        with pytest.raises(errors.ReadOnly):
            write()
    assert read_image(c.tb, VOLS[0]) == before
    c.write(0, 0, b"\x42" * 4096)


def test_attach_not_saved_stays_detached(cluster_factory, monkeypatch):
    """The attached record cannot be saved (a full state directory): the
    link stays detached, as the record says, and attaches later."""
    c = cluster_factory()
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    files = c.g.files
    real = files.save

    def full(record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save", full)
    with pytest.raises(OSError):
        c.ta.rsg_attach("g", c.addr)
    assert not c.link.attached and c.link.state == R.DETACHED
    assert c.ta.rsg_status("g")["links"][0]["state"] == R.DETACHED
    monkeypatch.setattr(files, "save", real)
    c.ta.rsg_attach("g", c.addr)
    c.check_final()


def _save_fails_for(monkeypatch, files, role):
    """Saves of files' records for role fail as on a full state directory."""
    real = files.save

    def save(record):
        if record["role"] == role:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(record)

    monkeypatch.setattr(files, "save", save)
    return lambda: monkeypatch.setattr(files, "save", real)


def test_role_change_not_saved_changes_nothing(cluster_factory, monkeypatch):
    """Promote and demote whose new record cannot be saved leave the group
    in its role, with its files, as the saved record says; with space
    again both succeed."""
    c = cluster_factory()
    c.write(0, 0, b"a" * 4096)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    sg = c.sg
    # A staged batch the secondary acknowledged must survive.
    with open(sg.files.stage[0], "wb") as f:
        f.write(b"staged")
    restore = _save_fails_for(monkeypatch, sg.files, R.PRIMARY)
    with pytest.raises(OSError):
        c.tb.rsg_promote("g")
    assert c.tb.rsgs["g"].role == R.SECONDARY
    assert sg.files.load()["role"] == R.SECONDARY
    with open(sg.files.stage[0], "rb") as f:
        assert f.read() == b"staged"
    os.unlink(sg.files.stage[0])
    restore()

    g = c.g
    srl = g.files.srl
    restore = _save_fails_for(monkeypatch, g.files, R.SECONDARY)
    with pytest.raises(OSError):
        c.ta.rsg_demote("g")
    assert c.ta.rsgs["g"].role == R.PRIMARY
    assert g.files.load()["role"] == R.PRIMARY and os.path.exists(srl)
    restore()
    # The primary still works: it replicates once attached again.
    c.ta.rsg_attach("g", c.addr)
    c.write(1, 4096, b"b" * 4096)
    c.check_final()
    assert c.ta.rsg_demote("g")["role"] == R.SECONDARY
    assert c.tb.rsg_promote("g")["role"] == R.PRIMARY


def test_detach_not_saved_stays_attached(cluster_factory, monkeypatch):
    """The detached record cannot be saved: the link stays attached, as
    the record says, and the secondary converges."""
    c = cluster_factory()
    c.write(0, 0, b"a" * 4096)
    c.wait_converged()
    restore = _save_fails_for(monkeypatch, c.g.files, R.PRIMARY)
    with pytest.raises(OSError):
        c.ta.rsg_detach("g", c.addr)
    restore()
    assert c.link.attached and c.link.state != R.DETACHED
    assert c.g.files.load()["links"][0]["attached"]
    c.write(1, 8192, b"b" * 4096)
    c.check_final()


def test_secondary_rollback_refused_while_a_primary_replicates(
        cluster_factory):
    """A rollback changes a secondary's volume on its own, as a restore
    does: refused while a primary is connected (its batches would land in
    between, and a replay would end 'consistent' over rolled-back
    extents)."""
    c = cluster_factory()
    c.write(0, 0, b"\x01" * 8192)
    c.wait_converged()
    c.tb.image_protect(VOLS[0])
    c.write(0, 0, b"\x02" * 8192)
    c.wait_converged()
    with pytest.raises(R.RsgBusy):
        c.tb.image_rollback(VOLS[0])
    assert read_image(c.tb, VOLS[0])[:8192] == b"\x02" * 8192
    c.tb.image_release(VOLS[0])
    c.check_final()


@pytest.mark.parametrize("operation", ["restore", "reverse-sync"])
def test_secondary_records_what_a_primary_changed_before_a_restore_began(
        cluster_factory, monkeypatch, operation):
    """A primary came, wrote an extent the restore had not counted yet
    (its clone's delta bit set by that batch), and went again, after the
    restore read its regions but before it kept primaries away: the
    regions the secondary records as its own changes must include that
    extent, which the restore also changes, or the primary never copies
    it back and the two nodes differ there for good."""
    half = SIZES[0] // 2
    c = detached_secondary_with_snapshot(cluster_factory, rewritten=half)
    volume_change = c.tb.rsg_ops.volume_change

    def after_a_batch(*args, **kwargs):
        primary_came_and_went(c, half, b"\x04" * GRAN)
        return volume_change(*args, **kwargs)
    monkeypatch.setattr(c.tb.rsg_ops, "volume_change", after_a_batch)
    if operation == "restore":
        c.tb.clone_restore("snap")
    else:
        c.tb.clone_reverse_sync("snap")
    monkeypatch.setattr(c.tb.rsg_ops, "volume_change", volume_change)
    wait_for(lambda: not c.tb.clone_status("snap")["operation"]["running"],
             30, "the " + operation, lambda: c.tb.clone_status("snap"))
    # The secondary's volume shows the clone's data everywhere ...
    assert read_image(c.tb, VOLS[0]) == clone_image(c.tb, "snap")
    # ... and the primary copies back every region that changed.
    c.ta.rsg_attach("g", c.addr)
    c.check_final()


def test_secondary_records_a_restore_before_it_changes_anything(
        cluster_factory, monkeypatch):
    """The regions a restore on a detached secondary changes are saved in
    its record before the restore starts: a crash right after the start
    must not lose them (the primary copies exactly them back)."""
    c = detached_secondary_with_snapshot(cluster_factory)
    sg = c.sg
    seen = []
    persist = sg.persist

    def watch(**kwargs):
        seen.append((clone_state(c.tb, "snap"), sg.diverged))
        persist(**kwargs)
    monkeypatch.setattr(sg, "persist", watch)
    release = hold_engines(monkeypatch)
    c.tb.clone_restore("snap")
    assert seen and seen[0][0] == "fractured" and seen[0][1]["runs"], seen
    release(c.tb.groups[VOLS[0]])
    wait_for(lambda: clone_state(c.tb, "snap") == "fractured", 30,
             "the restore", lambda: c.tb.clone_status("snap"))
    c.ta.rsg_attach("g", c.addr)
    c.check_final()


def test_no_point_in_time_is_taken_of_an_inconsistent_secondary(
        cluster_factory):
    """While a secondary is inconsistent (a replay running or broken off)
    its volume is no point in time of the primary: a fracture or a session
    mark there would freeze (and export) that mix; both are refused."""
    c = cluster_factory()
    c.wait_converged()
    synced_clone(c.tb, VOLS[0], "snap")
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, what="primary gone")
    c.sg.consistent = False             # a replay broken off by a cut
    c.sg.reason = "a replay was interrupted"
    with pytest.raises(R.ReplicaUnavailable):
        c.tb.clone_fracture("snap")
    assert clone_state(c.tb, "snap") == "synchronized"
    c.tb.image_protect(VOLS[1])         # the target's own: allowed
    c.tb.image_release(VOLS[1])


def test_local_failure_on_the_secondary_does_not_stop_the_link(
        cluster_factory, monkeypatch):
    """An apply that fails because of the secondary's own disk (a clone's
    state that cannot be saved, a disk gone in a power cut) is not a
    refusal of the primary's updates: the secondary drops the connection
    without FAIL (which stops the primary's link for good, a resync that
    never finishes) and the primary comes back and catches up."""
    c = cluster_factory()
    c.wait_converged()
    sg = c.sg
    apply_one = sg._apply_one
    fail = [1]

    def failing(*args):
        if fail[0]:
            fail[0] -= 1
            raise errors.StateNotSaved(errno.ENOSPC, path="state.json",
                                       reason="No space left on device")
        return apply_one(*args)
    monkeypatch.setattr(sg, "_apply_one", failing)
    c.write(0, 0, b"\x07" * 8192)
    c.flush()
    wait_for(lambda: not fail[0], what="the failing apply")
    c.write(0, 8192, b"\x08" * 8192)
    c.check_final()
    assert not c.link.stopped_error, c.status()


def test_replay_sends_holes_as_zeroes_without_reading_them(cluster_factory,
                                                           monkeypatch):
    """A volume change that punches holes is replayed as zeroes: the
    primary's holes are not read, and the secondary gets holes too."""
    c = cluster_factory()
    c.write(0, 0, os.urandom(256 << 10))
    c.wait_converged()
    g, link = c.g, c.link
    sec_file = c.tb.lus[VOLS[0]].file
    allocated_before = os.stat(sec_file).st_blocks * 512
    region_gran = 8192
    bits = bytearray(SIZES[0] // region_gran)
    bits[:8] = b"\x01" * 8          # the first 64K
    begun = g.begin_volume_change(0, bits, region_gran, "a test restore")
    inner = c.ta.lus[VOLS[0]].stack.below("replication")
    inner.zero(0, 8 * region_gran, may_trim=True)
    reads = []
    base = c.ta.lus[VOLS[0]].backend
    read = base.readinto

    def spy(buf, offset):
        reads.append((offset, memoryview(buf).nbytes))
        read(buf, offset)
    monkeypatch.setattr(base, "readinto", spy)
    g.end_volume_change(begun)
    wait_for(lambda: link.replays >= 1 and link.state == R.REPLICATING, 10,
             "the replay", c.status)
    wait_for(lambda: c.sg.applied_seq == g.next_seq - 1 and c.sg.consistent)
    monkeypatch.undo()
    assert not [r for r in reads if r[0] < 64 << 10], reads
    prim = [read_image(c.ta, n) for n in VOLS]
    sec = [read_image(c.tb, n) for n in VOLS]
    assert prim == sec, first_diff(prim, sec)
    assert prim[0][:64 << 10] == bytes(64 << 10)
    assert os.stat(sec_file).st_blocks * 512 <= \
        allocated_before - (64 << 10), (allocated_before, sec_file)


def _volume_change_under_sync_writes(c, monkeypatch, start, running, during,
                                     end_state):
    """A restore or reverse sync (start(), its engine held: the clone
    stays `running`; during() checks the link then) of v1 of a
    sync link's primary while a host writes: every write is on the
    secondary when it returns; a sampler finds the secondary, whenever it
    says it is consistent, holding a state the primary's hosts saw (the
    operation is a SET: the clone's data shown at once); the link never
    logs; at the end both are the same.  Returns the released group."""
    rng = random.Random(23)
    fractured_snap(c, rng, SIZES[0] // 2)       # half the extents move
    events = []
    transition = R.Link.transition

    def spy(link, event):
        events.append((link.phase, event))
        return transition(link, event)
    monkeypatch.setattr(R.Link, "transition", spy)
    release = start_held(c, monkeypatch, start)
    with sampled(c):
        for i in range(24):
            op = host_write(c, rng, i)
            assert c.link.acknowledged >= op.seq, (op, c.status())
            # Staged (streaming: applied after the acknowledgement), or
            # applied (a replay's entries are acknowledged once flushed).
            with c.sg.lock:
                buf = bytearray(op.length)
                c.tb.lus[VOLS[op.vol]].backend.readinto(buf, op.off)
            assert staged_seq(c.sg) >= op.seq or bytes(buf) == op.data, \
                (op, "not on the secondary", c.status())
        assert clone_state(c.ta, "snap") == running
        during()
        group = c.ta.groups[VOLS[0]]
        release_until(c, release, end_state, "the operation's end")
        c.check_final()
    logged = [e for e in events if e[1] == "log"]
    assert not logged, ("the link left the SRL stream", logged)
    assert c.link.replays >= 2 and c.link.dcm.count() == 0, c.status()
    return group


def test_sync_writes_reach_the_secondary_during_a_restore(cluster_factory,
                                                          monkeypatch):
    """A protected restore of a replicated volume keeps its sync link in
    the SRL stream: the link replays the restore's regions reading what
    hosts read (the clone's data before the engine copies it), while host
    writes are streamed and waited for.  (Before, every link logged to its
    DCM until the restore ended: sync writes returned unreplicated.)"""
    c = cluster_factory(mode="sync")

    def replayed():
        # The copy on demand layer, not the engine, shows the clone's
        # data: the replay completes and the secondary is consistent
        # while the restore still runs.
        wait_for(lambda: c.link.state == R.REPLICATING and c.sg.consistent,
                 10, "the restore's replay", c.status)
    _volume_change_under_sync_writes(
        c, monkeypatch, lambda: c.ta.clone_restore("snap"), "restoring",
        replayed, "fractured")


def test_sync_writes_reach_the_secondary_during_a_reverse_sync(
        cluster_factory, monkeypatch):
    """As for a restore; the reverse sync's engine may copy a run again
    after a host write collided with it (writing data hosts never read
    meanwhile), so the replay ends only once the reverse sync has: the
    secondary keeps its protected image until then."""
    c = cluster_factory(mode="sync")

    def held():
        wait_for(lambda: c.link.replay_done >= c.link.replay_total, 10,
                 "the reverse sync's replay pass", c.status)
        time.sleep(0.2)
        assert c.link.state == R.DCM_REPLAY and not c.sg.consistent, \
            c.status()
        assert c.sg.protected, c.status()
    _volume_change_under_sync_writes(
        c, monkeypatch, lambda: c.ta.clone_reverse_sync("snap"),
        "reverse-syncing", held, "synchronized")


def replayed_then_restored(c, release, replayed, timeout, what):
    """Once replayed(), the restore of "snap" (its engine held) still
    runs and the secondary, consistent, holds what hosts read (the
    clone's data); then the restore ends and both sides are equal."""
    wait_for(replayed, timeout, what, c.status)
    assert clone_state(c.ta, "snap") == "restoring"
    assert c.check_sample()
    release_until(c, release, "fractured", "the restore's end")
    c.check_final()


def test_a_restores_replay_resumes_after_a_primary_crash(cluster_factory,
                                                        monkeypatch):
    """A kill -9 of the primary while its link replays a restore's
    regions: the record saved before the restore began says the link
    replays them; after the restart the restore resumes and so does the
    replay, reading what hosts read, and the secondary ends equal."""
    c = cluster_factory()
    rng = random.Random(31)
    fractured_snap(c, rng, SIZES[0])
    c.ta.rsg_attach("g", c.addr, rate="128K")     # 1 MiB of regions: 8 s
    c.wait_converged()
    release = start_held(c, monkeypatch, lambda: c.ta.clone_restore("snap"))
    wait_for(lambda: c.link.replay_done > 0, 10, "the replay", c.status)
    assert c.link.state == R.DCM_REPLAY and not c.sg.consistent
    c.crash_primary()
    assert clone_state(c.ta, "snap") == "restoring"
    assert c.link.dcm.count() > 0, c.status()
    c.ta.rsg_attach("g", c.addr, rate="0")
    replayed_then_restored(
        c, release, lambda: c.link.state == R.REPLICATING and c.sg.consistent,
        20, "the resumed replay")


def test_a_detached_link_keeps_a_restores_regions_and_replays_them(
        cluster_factory, monkeypatch):
    """A link detached while a restore starts logs its regions to its DCM
    and replays them when attached, reading what hosts read meanwhile."""
    c = cluster_factory()
    rng = random.Random(41)
    fractured_snap(c, rng, SIZES[0] // 4)
    c.ta.rsg_detach("g", c.addr)
    release = start_held(c, monkeypatch, lambda: c.ta.clone_restore("snap"))
    link = c.link
    assert link.phase == (R.DETACHED, R.link.DCM), c.status()
    assert link.dcm.count() == SIZES[0] // 4 // GRAN, c.status()
    assert "a protected restore of v1" in \
        c.ta.rsg_status("g")["links"][0]["replay_reason"]
    c.write(1, 0, b"\x11" * GRAN)
    c.ta.rsg_attach("g", c.addr)
    replayed_then_restored(
        c, release, lambda: link.state == R.REPLICATING and c.sg.consistent
        and c.sg.applied_seq == c.g.next_seq - 1, 10, "the replay")


def test_a_write_in_flight_when_a_restore_starts_lands_before_it(
        cluster_factory, monkeypatch):
    """A host write that entered the Source before a restore started and
    is logged after it: the restore's switch to the clone's data waits
    for it, so the write is part of the state the restore replaces
    (hosts never read it) and the secondary, consistent after the replay,
    never shows it either.  (Before, it was logged after the replay had
    read the region: the secondary held it while the primary showed the
    clone's data.)  A write that arrives meanwhile waits for the switch
    and lands on the clone's data (copied on demand first)."""
    c = cluster_factory()
    rng = random.Random(37)
    fractured_snap(c, rng, SIZES[0] // 2)
    release = hold_engines(monkeypatch)
    lu = c.ta.lus[VOLS[0]]
    layer = c.g.layers[0]
    entered, gate = threading.Event(), threading.Event()
    write = layer.write
    off = 3 * GRAN

    def held(buf, offset):
        if offset == off:
            entered.set()
            gate.wait(10)
        write(buf, offset)
    monkeypatch.setattr(layer, "write", held)
    lu.stack.refresh()
    writer = threading.Thread(target=lu.write, args=(b"\xee" * GRAN, off))
    writer.start()
    assert entered.wait(10)
    restorer = threading.Thread(target=c.ta.clone_restore, args=("snap",))
    restorer.start()
    time.sleep(0.3)         # the replay would have read the region now
    late = 40 * GRAN + 100
    second = threading.Thread(target=lu.write, args=(b"\xdd" * 1000, late))
    second.start()
    time.sleep(0.2)
    gate.set()
    for t in (writer, restorer, second):
        t.join(10)
    assert clone_state(c.ta, "snap") == "restoring"
    wait_for(lambda: c.link.state == R.REPLICATING and c.sg.consistent and
             c.sg.applied_seq == c.g.next_seq - 1, 10, "the replay",
             c.status)
    # What hosts read, without the copy on demand of a host read (whose
    # copy would reach the secondary too).
    shown = bytearray(GRAN)
    c.ta.groups[VOLS[0]].visible_read(shown, off)
    assert bytes(shown) == clone_image(c.ta, "snap")[off:off + GRAN]
    extent = bytearray(GRAN)
    c.ta.groups[VOLS[0]].visible_read(extent, 40 * GRAN)
    want = bytearray(clone_image(c.ta, "snap")[40 * GRAN:41 * GRAN])
    want[100:1100] = b"\xdd" * 1000
    assert extent == want, "a write that waited for the restore's start " \
        "landed on the Source's old data"
    with c.sg.lock:
        sec = read_image(c.tb, VOLS[0])[off:off + GRAN]
    assert sec == bytes(shown), "the consistent secondary shows a write " \
        "its primary's hosts never read"
    release_until(c, release, "fractured", "the restore's end")
    c.wait_converged()
    assert read_image(c.ta, VOLS[0]) == read_image(c.tb, VOLS[0])


# ---------------------------------------------------------------- resyncs
# After role changes the regions copied are exactly those either side
# changed since the two last agreed: a link's bytes_sent grows by exactly
# those extents (GRAN each; no SRL traffic meanwhile).

TOTAL_EXTENTS = sum(s // GRAN for s in SIZES)


def write_extents(t, extents, tag):
    """Write whole extents [(vol, index)] of t's volumes with data of tag
    (no zero blocks: a replay sends them the same, but data is plainer)."""
    rng = random.Random(tag)
    for vol, i in extents:
        t.lus[VOLS[vol]].write(bytes([tag]) + rng.randbytes(GRAN - 1),
                               i * GRAN)


def images(t):
    return [read_image(t, n) for n in VOLS]


def detach_and_promote_b(c):
    """A detaches its link, B (disconnected) is promoted."""
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, 10, "B disconnected",
             c.status)
    c.tb.rsg_promote("g")


def split_brain_pair(cluster_factory, a_writes, b_writes, policy=None):
    """A converged pair; A detaches and writes a_writes, B is promoted,
    writes b_writes and is demoted.  Returns (cluster, A's bytes_sent
    before it attaches again)."""
    c = cluster_factory(link=policy is None)
    if policy is not None:
        # Before the link: a secondary learns it at the handshake.
        c.ta.rsg_set("g", after_split_brain=policy)
        c.ta.rsg_link("g", c.addr, "async", c.tok)
    write_extents(c.ta, [(0, i) for i in range(0, 256, 3)], 1)
    c.wait_converged()
    detach_and_promote_b(c)
    write_extents(c.ta, a_writes, 2)
    write_extents(c.tb, b_writes, 3)
    c.tb.rsg_demote("g")
    return c, c.link.sent_bytes


A_ONLY = [(0, 1), (0, 2), (0, 3)]
B_ONLY = [(0, 3), (0, 4), (1, 0)]          # overlaps A's extent (0, 3)


def test_diverged_resync_of_a_never_promoted_primary_copies_only_the_changes(
        cluster_factory):
    """A primary that was never promoted has no since-promotion map; its
    link's DCM is what it changed since the secondary last agreed.  The
    secondary was promoted, wrote 16 extents and was demoted: the resync
    after --discard-secondary-changes copies those 16 extents, not the
    whole group."""
    b_writes = [(0, i) for i in range(100, 112)] + \
        [(1, i) for i in range(20, 24)]
    c, sent0 = split_brain_pair(cluster_factory, [], b_writes)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    c.ta.rsg_attach("g", c.addr, discard_secondary_changes=True)
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == images(c.tb), first_diff(images(c.ta),
                                                    images(c.tb))
    assert c.link.sent_bytes - sent0 == len(b_writes) * GRAN, \
        (c.link.sent_bytes - sent0, len(b_writes) * GRAN,
         TOTAL_EXTENTS * GRAN)


def test_diverged_resync_copies_the_union_of_both_sides_changes(
        cluster_factory):
    c, sent0 = split_brain_pair(cluster_factory, A_ONLY, B_ONLY)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    want = images(c.ta)
    c.ta.rsg_attach("g", c.addr, discard_secondary_changes=True)
    resynced(c.ta, c.link, c.tb)
    assert images(c.tb) == want, first_diff(images(c.tb), want)
    assert c.link.sent_bytes - sent0 == len(set(A_ONLY) | set(B_ONLY)) * GRAN


def test_a_replays_start_is_one_step_for_whoever_holds_the_lock(
        cluster_factory):
    """A secondary whose changes are discarded becomes inconsistent, not
    diverged, on the primary's line, in one step under its apply lock:
    a reader holding the lock (a status, a hello's reply, a model's
    check of the image kept) never sees it inconsistent while still
    diverged on its own line."""
    c, _ = split_brain_pair(cluster_factory, A_ONLY, B_ONLY)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    sg = c.sg
    assert sg.consistent and sg.diverged is not None
    seen = []
    depth = threading.local()
    acquire, release = sg.lock.acquire, sg.lock.release

    def counted_acquire():
        got = acquire()
        depth.n = getattr(depth, "n", 0) + 1
        return got

    def watched_release():
        depth.n -= 1
        if depth.n == 0:    # what the next holder sees
            seen.append((sg.consistent, sg.diverged is not None,
                         sg.history[-1][0]))
        release()
    sg.lock.acquire, sg.lock.release = counted_acquire, watched_release
    theirs = c.g.history[-1][0]
    c.ta.rsg_attach("g", c.addr, discard_secondary_changes=True)
    resynced(c.ta, c.link, c.tb)
    inconsistent = [s for s in seen if not s[0]]
    assert inconsistent, seen
    assert all(not diverged and line == theirs
               for _, diverged, line in inconsistent), inconsistent


def test_promotion_without_writes_is_no_split_brain_and_resyncs_exactly(
        cluster_factory):
    """detach, promote the secondary, no writes there, demote, attach: no
    split brain, and only what the primary wrote meanwhile is copied."""
    c, sent0 = split_brain_pair(cluster_factory, A_ONLY, [])
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert c.link.error is None and c.link.status().get("split_brain") is None
    assert images(c.ta) == images(c.tb)
    assert c.link.sent_bytes - sent0 == len(A_ONLY) * GRAN


def test_promotion_without_any_writes_copies_nothing(cluster_factory):
    c, sent0 = split_brain_pair(cluster_factory, [], [])
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert c.link.error is None and c.link.status().get("split_brain") is None
    assert images(c.ta) == images(c.tb)
    assert c.link.sent_bytes == sent0


def test_failover_and_failback_resync_exactly(cluster_factory):
    """A role change in each direction: the old primary, demoted, gets the
    union of both sides' changes; then the same back again, where the
    new primary's map is its link's DCM (it was never promoted since the
    secondary last agreed with it)."""
    c = cluster_factory()
    write_extents(c.ta, [(0, i) for i in range(0, 256, 5)], 1)
    c.wait_converged()
    # Failover: B becomes the primary; A wrote 3 extents B never got.
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None)
    write_extents(c.ta, A_ONLY, 2)
    c.tb.rsg_promote("g")
    write_extents(c.tb, B_ONLY, 3)
    c.ta.rsg_demote("g")
    port_a = free_port()
    c.ta.start_replication("127.0.0.1", port_a, c.tok)
    addr_a = "127.0.0.1:%d" % port_a
    c.tb.rsg_link("g", addr_a, "async", c.tok)
    lb = c.tb.rsgs["g"].links[0]
    wait_for(lambda: lb.state == R.DIVERGED, 10, "split brain", lb.status)
    sb = lb.status()["split_brain"]
    assert (sb["primary"]["extents"], sb["secondary"]["extents"]) == (3, 3)
    c.tb.rsg_attach("g", addr_a, discard_secondary_changes=True)
    resynced(c.tb, lb, c.ta)
    assert images(c.ta) == images(c.tb)
    assert lb.sent_bytes == len(set(A_ONLY) | set(B_ONLY)) * GRAN
    # Failback: B detaches and writes, A is promoted, writes, is demoted.
    c.tb.rsg_detach("g", addr_a)
    wait_for(lambda: c.ta.rsgs["g"].connected_since is None)
    sent0 = lb.sent_bytes
    b2 = [(1, 7), (1, 8)]
    a2 = [(0, 200), (1, 8)]
    write_extents(c.tb, b2, 4)
    c.ta.rsg_promote("g")
    write_extents(c.ta, a2, 5)
    c.ta.rsg_demote("g")
    c.tb.rsg_attach("g", addr_a)
    wait_for(lambda: lb.state == R.DIVERGED, 10, "split brain", lb.status)
    c.tb.rsg_attach("g", addr_a, discard_secondary_changes=True)
    resynced(c.tb, lb, c.ta)
    assert images(c.ta) == images(c.tb)
    assert lb.sent_bytes - sent0 == len(set(a2) | set(b2)) * GRAN


# ---------------------------------------------------------------- policies

def test_split_brain_is_reported_with_what_each_side_wrote(cluster_factory):
    """The default policy (disconnect) discards nothing: the link waits,
    and says how much each side wrote."""
    c, sent0 = split_brain_pair(cluster_factory, A_ONLY, B_ONLY)
    assert c.g.status()["after_split_brain"] == "disconnect"
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    time.sleep(0.3)
    assert c.link.state == R.DIVERGED and c.link.sent_bytes == sent0
    sb = c.ta.rsg_status("g")["links"][0]["split_brain"]
    assert sb["primary"] == {"extents": 3, "bytes": 3 * GRAN}, sb
    assert sb["secondary"] == {"extents": 3, "bytes": 3 * GRAN}, sb
    assert "this node changed 3 extent(s) (12288 bytes)" in c.link.error
    assert "changed 3 extent(s) (12288 bytes) on its own" in c.link.error


def test_policy_discard_secondary_resolves_automatically(cluster_factory):
    c, sent0 = split_brain_pair(cluster_factory, A_ONLY, B_ONLY,
                                policy="discard-secondary")
    want = images(c.ta)
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert images(c.tb) == want
    assert c.link.sent_bytes - sent0 == len(set(A_ONLY) | set(B_ONLY)) * GRAN


def test_policy_discard_zero_changes_disconnects_when_both_wrote(
        cluster_factory):
    c, sent0 = split_brain_pair(cluster_factory, A_ONLY, B_ONLY,
                                policy="discard-zero-changes")
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
             c.status)
    time.sleep(0.3)
    assert c.link.state == R.DIVERGED and c.link.sent_bytes == sent0


def test_policy_discard_zero_changes_takes_the_secondarys_changes(
        cluster_factory):
    """Only the demoted node wrote since the two last agreed: the primary
    takes its changes (they become updates of the primary, replicated
    everywhere) and nothing is lost."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    want = images(c.tb)
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == want, first_diff(images(c.ta), want)
    assert images(c.tb) == want
    assert c.link.error is None
    assert c.link.sent_bytes - sent0 == len(B_ONLY) * GRAN


def test_split_brain_policy_is_saved_and_checked(cluster_factory):
    c = cluster_factory(link=False)
    with pytest.raises(errors.InvalidArgument):
        c.ta.rsg_set("g", after_split_brain="violently")
    assert c.ta.rsg_status("g")["after_split_brain"] == "disconnect"
    c.ta.rsg_set("g", after_split_brain="discard-zero-changes")
    assert c.g.files.load()["after_split_brain"] == "discard-zero-changes"
    c.ta.close()
    c.ta = Target(c.A)
    assert c.ta.rsg_status("g")["after_split_brain"] == \
        "discard-zero-changes"
    # A record written before the policy existed loads with the default.
    rec = c.g.files.load()
    del rec["after_split_brain"]
    c.ta.close()
    files = R.GroupFiles(os.path.join(c.A, "rsg"), "g")
    files.save(rec)
    c.ta = Target(c.A)
    assert c.ta.rsg_status("g")["after_split_brain"] == "disconnect"


# ---------------------------------------------------------------- resync model

def step(*what):
    """A step of a model, shown with a failing example."""
    note(" ".join(map(str, what)))


class ResyncMachine(RuleBasedStateMachine):
    """Random role changes, writes on either node, detaches, attaches,
    restarts and kills (of the replicating primary) of two nodes A and B,
    under a random split-brain policy.  The model
    is, per node, the set of extents it changed since the two last agreed
    (both are converged when a link is detached).  At every attach: a
    split brain exactly when the node being linked to changed something,
    reported with both sets' sizes; the resync sends exactly the union of
    both sets (bytes_sent grows by GRAN per extent); both nodes end with
    the winner's data."""

    def __init__(self):
        super().__init__()
        self.saved = fast_timing()
        self.root = tempfile.mkdtemp(prefix="rsg-resync-")
        self.c = None

    @initialize(policy=st.sampled_from(R.SPLIT_BRAIN_POLICIES))
    def setup(self, policy):
        # Set before the link: a secondary learns it at the handshake.
        c = self.c = Cluster(self.root, link=False)
        c.ta.rsg_set("g", after_split_brain=policy)
        c.ta.rsg_link("g", c.addr, "async", c.tok)
        self.policy = policy
        c.a.listen()
        self.t = {"A": c.ta, "B": c.tb}
        self.addr = {"A": c.a.addr, "B": c.addr}
        self.changed = {"A": set(), "B": set()}
        self.prim = "A"
        self.attached = True
        c.wait_converged()
        event("policy " + policy)
        step("setup", policy)

    def teardown(self):
        try:
            if self.c is not None:
                self.c.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            restore_timing(self.saved)

    @staticmethod
    def other(n):
        return "B" if n == "A" else "A"

    def role(self, n):
        return self.t[n].rsgs["g"].role

    def link(self, n):
        for l in self.t[n].rsgs["g"].links:
            if l.secondary == self.addr[self.other(n)]:
                return l
        return None

    def one_primary(self):
        return self.role(self.other(self.prim)) == R.SECONDARY

    @rule(node=st.sampled_from("AB"), first=st.integers(0, 383),
          n=st.integers(1, 3), seed=st.integers(0, 255))
    def write(self, node, first, n, seed):
        if self.role(node) != R.PRIMARY:
            return
        extents = [(e // 256, e % 256) if e < 256 else (1, e - 256)
                   for e in range(first, min(first + n, TOTAL_EXTENTS))]
        write_extents(self.t[node], extents, seed)
        step("write", node, self.attached, extents)
        if not self.attached:
            self.changed[node] |= set(extents)

    def node(self, n):
        return self.c.a if n == "A" else self.c.b

    @precondition(lambda self: self.attached)
    @rule()
    def kill_primary(self):
        """kill -9 of the replicating primary at a quiet moment: its
        activity log replays to the attached link, and the next detach
        waits for that, so the model is unchanged."""
        self.node(self.prim).kill()
        self.restart(self.prim, closed=True)

    @rule(node=st.sampled_from("AB"))
    def restart(self, node, closed=False):
        """A clean stop and start: the maps, their bases and the policy
        are what the files say."""
        if not closed:
            self.node(node).close()
        t = self.t[node] = self.node(node).start()
        assert t.rsgs["g"].status()["after_split_brain"] == self.policy
        step("killed" if closed else "restart", node)

    @precondition(lambda self: self.attached)
    @rule()
    def detach(self):
        p, s = self.prim, self.other(self.prim)
        link, g = self.link(p), self.t[p].rsgs["g"]
        resynced(self.t[p], link, self.t[s])
        # Acknowledged too: entries not acknowledged are marked at the
        # detach (the secondary may lack them), and copied again.
        wait_for(lambda: link.acked_seq == g.next_seq - 1, 10, "the ack")
        self.t[p].rsg_detach("g", self.addr[s])
        step("detach", p)
        sg = self.t[s].rsgs["g"]
        wait_for(lambda: sg.connected_since is None, 10, "disconnected")
        self.attached = False

    @precondition(lambda self: not self.attached and self.one_primary())
    @rule()
    def promote(self):
        self.t[self.other(self.prim)].rsg_promote("g")
        step("promote", self.other(self.prim))

    @precondition(lambda self: not self.attached and not self.one_primary())
    @rule(keep_old=st.booleans())
    def demote(self, keep_old):
        new = self.other(self.prim)
        gone = new if keep_old else self.prim
        self.t[gone].rsg_demote("g")
        step("demote", gone)
        self.prim = self.other(gone)
        event("demoted the " + ("new" if keep_old else "old") + " primary")

    @precondition(lambda self: not self.attached and self.one_primary())
    @rule()
    def attach(self):
        p, s = self.prim, self.other(self.prim)
        tp, ts = self.t[p], self.t[s]
        link = self.link(p)
        sent0 = link.sent_bytes if link is not None else 0
        split = bool(self.changed[s])
        mine, theirs = len(self.changed[p]), len(self.changed[s])
        take = split and self.policy == R.DISCARD_ZERO_CHANGES and not mine
        waits = split and (self.policy == R.DISCONNECT or (
            self.policy == R.DISCARD_ZERO_CHANGES and mine))
        want = images(ts if take else tp)
        step("attach", p, "->", s, self.changed, self.policy)
        if link is None:
            tp.rsg_link("g", self.addr[s], "async", self.c.tok)
            link = self.link(p)
        else:
            tp.rsg_attach("g", self.addr[s])
        if waits:
            wait_for(lambda: link.state == R.DIVERGED, 10, "split brain",
                     link.status)
            sb = link.status()["split_brain"]
            assert (sb["primary"]["extents"], sb["secondary"]["extents"]) \
                == (mine, theirs), (sb, self.changed)
            tp.rsg_attach("g", self.addr[s], discard_secondary_changes=True)
        resynced(tp, link, ts)
        assert link.status()["split_brain"] is None
        assert images(tp) == want, first_diff(images(tp), want)
        assert images(ts) == want, first_diff(images(ts), want)
        union = self.changed["A"] | self.changed["B"]
        assert link.sent_bytes - sent0 == len(union) * GRAN, \
            (link.sent_bytes - sent0, len(union), self.changed)
        event("split brain" if split else "no split brain")
        self.changed = {"A": set(), "B": set()}
        self.attached = True


ResyncMachine.TestCase.settings = settings(
    max_examples=examples("RSG_RESYNC_EXAMPLES", 20, 5),
    stateful_step_count=int(os.environ.get("RSG_RESYNC_STEPS", "20")),
    deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
TestResyncModel = tolerate_timing_in_generation(ResyncMachine.TestCase)


def test_a_node_promoted_again_keeps_its_old_writes_diverged(
        cluster_factory):
    """(Found by the resync model.)  The old primary wrote after the
    detach, was demoted, promoted again without writing and demoted again:
    its writes past the branch point are still a split brain, and copied
    back.  (Before, only writes in its own newest generation counted.)"""
    hd = R.history_diverges
    g1, g2, g3 = ["g1", 1], ["g2", 11], ["g3", 13]
    assert hd([g1, g2], 10, [g1, g3], 12) == (True, 10)
    assert hd([g1, g2], 10, [g1, ["g3", 11]], 10) == (False, 10)
    c = cluster_factory()
    write_extents(c.ta, [(0, 0)], 1)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None)
    write_extents(c.ta, A_ONLY, 2)
    c.tb.rsg_promote("g")
    c.ta.rsg_demote("g")
    c.ta.rsg_promote("g")
    c.ta.rsg_demote("g")
    port_a = free_port()
    c.ta.start_replication("127.0.0.1", port_a, c.tok)
    addr_a = "127.0.0.1:%d" % port_a
    want = images(c.tb)
    c.tb.rsg_link("g", addr_a, "async", c.tok)
    lb = c.tb.rsgs["g"].links[0]
    wait_for(lambda: lb.state == R.DIVERGED, 10, "split brain", lb.status)
    assert lb.status()["split_brain"]["secondary"]["extents"] == 3
    c.tb.rsg_attach("g", addr_a, discard_secondary_changes=True)
    resynced(c.tb, lb, c.ta)
    assert images(c.ta) == want and lb.sent_bytes == 3 * GRAN


def test_take_of_the_secondarys_changes_cut_off_is_taken_again(
        cluster_factory, monkeypatch):
    """discard-zero-changes: a connection lost while the primary takes the
    secondary's changes (some written here already) takes them again at
    the next one, instead of seeing both sides changed (a split brain
    of its own making)."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    want = images(c.tb)
    real = R.PrimaryGroup.take_changes
    taken = []

    def cut_after_one(self, vol, offset, data):
        if len(taken) == 1:
            taken.append("cut")
            raise ConnectionError("cut while taking")
        taken.append(offset)
        return real(self, vol, offset, data)
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", cut_after_one)
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert "cut" in taken and len(taken) > 2, taken
    assert c.link.state == R.REPLICATING and c.link.split_brain is None
    assert images(c.ta) == want and images(c.tb) == want
    assert c.link.sent_bytes - sent0 == len(B_ONLY) * GRAN


def test_a_host_write_during_a_take_is_not_overwritten(cluster_factory,
                                                       monkeypatch):
    """discard-zero-changes: the primary serves its hosts while it takes
    the secondary's changes.  A host write into a region not taken yet
    is newer than the secondary's data there: it must stay, and reach the
    secondary."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    real = R.PrimaryGroup.take_changes
    vol, index = B_ONLY[-1]
    host = b"\x77" * GRAN

    def host_writes_meanwhile(self, v, offset, data):
        if not host_writes_meanwhile.done:
            host_writes_meanwhile.done = True
            w = threading.Thread(target=c.ta.lus[VOLS[vol]].write,
                                 args=(host, index * GRAN))
            w.start()
            w.join()
        return real(self, v, offset, data)
    host_writes_meanwhile.done = False
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", host_writes_meanwhile)
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert host_writes_meanwhile.done
    for t in (c.ta, c.tb):
        got = read_image(t, VOLS[vol])[index * GRAN:(index + 1) * GRAN]
        assert got == host, "{}: the host's write is gone".format(
            "primary" if t is c.ta else "secondary")
    assert images(c.ta) == images(c.tb)


@pytest.mark.parametrize("where", ["taken", "not taken"])
@pytest.mark.parametrize("when", ["cut", "before a kill", "after a kill"])
def test_a_take_cut_off_leaves_what_hosts_wrote_over_its_regions(
        cluster_factory, monkeypatch, when, where):
    """discard-zero-changes: a take is cut off after its first region (the
    connection lost, or the primary killed); a host writes into that
    region, or into one not taken yet.  No region is taken over that
    write: the take puts it on top of the secondary's data, except for a
    write into a region not taken yet made before the kill: its bytes are
    gone with the process, only its extent is on record, so that region
    was changed on both sides and the link waits for the admin (the
    report of policy disconnect)."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    # Each region recorded as taken once written.
    monkeypatch.setattr(R.link, "TAKE_RECORD_INTERVAL", 0)
    want = images(c.tb)
    vol, index = B_ONLY[0] if where == "taken" else B_ONLY[-1]
    host = b"\x66" * GRAN
    real = R.PrimaryGroup.take_changes
    first, cut = threading.Event(), threading.Event()

    def cut_after_one(self, v, offset, data):
        if first.is_set():
            # The first region is taken and counted as taken.
            if when != "after a kill" and not cut.is_set():
                # A host's write, from a thread of its own.
                w = threading.Thread(target=self.volumes[vol].write,
                                     args=(host, index * GRAN))
                w.start()
                w.join()
            cut.set()
            raise ConnectionError("cut while taking")
        real(self, v, offset, data)
        first.set()
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", cut_after_one)
    c.ta.rsg_attach("g", c.addr)
    assert cut.wait(10)
    if when != "cut":
        # Killed once the cut's record says the first region is taken.
        taken = B_ONLY[0][0], B_ONLY[0][1] * GRAN
        wait_for(lambda: taken not in [
            tuple(r[:2]) for r in
            c.g.files.load()["links"][0]["pull_left"]], 10,
            "the first region recorded as taken")
        c.crash_primary()
    if when == "after a kill":
        c.ta.lus[VOLS[vol]].write(host, index * GRAN)
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", real)
    at = slice(index * GRAN, (index + 1) * GRAN)
    if (when, where) == ("before a kill", "not taken"):
        wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
                 c.status)
        assert read_image(c.ta, VOLS[vol])[at] == host
        return
    resynced(c.ta, c.link, c.tb)
    want[vol] = want[vol][:at.start] + host + want[vol][at.stop:]
    assert images(c.ta) == want and images(c.tb) == want
    assert not os.path.exists(c.g.files.take_map(0))


def test_a_region_is_recorded_as_taken_only_once_its_data_is_durable(
        cluster_factory, monkeypatch):
    """discard-zero-changes: a record that says a region is taken is saved
    only after the region's volume was flushed (a power cut after the
    record but before the data reached the disk would resume past a
    region that holds the primary's old bytes: the secondary's changes
    there lost on both nodes, once the replay copies them back)."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    monkeypatch.setattr(R.link, "TAKE_RECORD_INTERVAL", 0)
    paths = {c.ta.lus[name].backend.path: v for v, name in enumerate(VOLS)}
    written = {}            # volume -> offsets written since its flush
    unflushed_at_save = []
    real_write, real_flush = backends.FileBackend.write, \
        backends.FileBackend.flush

    def write(self, buf, offset):
        if self.path in paths:
            written.setdefault(paths[self.path], set()).add(offset)
        return real_write(self, buf, offset)

    def flush(self):
        written.pop(paths.get(self.path), None)
        return real_flush(self)
    monkeypatch.setattr(backends.FileBackend, "write", write)
    monkeypatch.setattr(backends.FileBackend, "flush", flush)
    save = c.g.files.save

    def checked(record):
        left = record["links"][0].get("pull_left")
        if left is not None:
            for vol, index in B_ONLY:
                region = [vol, index * GRAN]
                taken = not any(r[0] == vol and r[1] <= region[1] <
                                r[1] + r[2] for r in left)
                if taken and region[1] in written.get(vol, ()):
                    unflushed_at_save.append(region)
        save(record)
    monkeypatch.setattr(c.g.files, "save", checked)
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert unflushed_at_save == []


def take_cut_at_once(c, monkeypatch):
    """c's primary attaches and begins a take of the secondary's changes,
    which is cut off before it writes anything; then it is detached."""
    real = R.PrimaryGroup.take_changes
    cut = threading.Event()

    def cut_at_once(self, v, offset, data):
        cut.set()
        raise ConnectionError("cut while taking")
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", cut_at_once)
    c.ta.rsg_attach("g", c.addr)
    assert cut.wait(10)
    c.ta.rsg_detach("g", c.addr)
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", real)


def test_a_lost_take_map_stays_a_split_brain(cluster_factory,
                                             monkeypatch):
    """discard-zero-changes: a take cut off by a kill, and its take map
    lost: where hosts wrote is not known, so the take does not go on, at
    this start nor at the next (a lost map made anew empty resumed the
    take at the second start)."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    take_cut_at_once(c, monkeypatch)
    path = c.g.files.take_map(0)
    for start in range(2):
        c.a.kill()
        if start == 0:
            os.unlink(path)
        c.a.start()
        c.ta.rsg_attach("g", c.addr)
        wait_for(lambda: c.link.state == R.DIVERGED, 10, "split brain",
                 c.status)


def test_a_take_given_up_is_not_resumed_at_a_later_split_brain(
        cluster_factory, monkeypatch):
    """discard-zero-changes: a take is cut off and the admin resolves the
    split brain the other way (this node wins).  At a later split brain
    where again only the secondary wrote, its new changes are taken, not
    what the first take had left."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    take_cut_at_once(c, monkeypatch)
    c.ta.rsg_attach("g", c.addr, discard_secondary_changes=True)
    resynced(c.ta, c.link, c.tb)
    detach_and_promote_b(c)
    write_extents(c.tb, [(0, 100), (0, 101)], 9)
    want = images(c.tb)
    c.tb.rsg_demote("g")
    c.ta.rsg_attach("g", c.addr)
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == want and images(c.tb) == want


def test_a_take_killed_after_its_last_region_ends_at_the_next_start(
        cluster_factory, monkeypatch):
    """discard-zero-changes: the primary is killed once every region is
    taken, before the take's end is recorded.  The next connection takes
    nothing again and ends the take, so a later split brain is not
    treated as this take's leftover."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    want = images(c.tb)
    real = R.PrimaryGroup.persist
    last = threading.Event()

    def cut_at_the_end(self, *args, **kwargs):
        link = self.links[0]
        if link.take_map is not None and not link.pulling:
            # The save of the take's end, and none after: killed there.
            last.set()
        if last.is_set():
            raise OSError(errno.EIO, "killed before the take's end is saved")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(R.PrimaryGroup, "persist", cut_at_the_end)
    c.ta.rsg_attach("g", c.addr)
    assert last.wait(10)
    c.crash_primary()
    monkeypatch.setattr(R.PrimaryGroup, "persist", real)
    rec = c.g.files.load()["links"][0]
    assert rec["pulling"] and rec["pull_left"] == [], rec
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == want and images(c.tb) == want
    assert not c.link.pulling and c.link.pull_left is None
    assert not c.g.files.load()["links"][0]["pulling"]


def test_a_restore_and_a_take_do_not_run_together(cluster_factory,
                                                   monkeypatch):
    """A restore writes into the Source below the take's guard: while the
    primary takes a secondary's changes, a restore of one of its volumes
    is refused (and a take waits for a running restore)."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    fractured(c.ta, VOLS[0], "c1")
    real = R.PrimaryGroup.take_changes
    taking, go_on = threading.Event(), threading.Event()

    def held(self, v, offset, data):
        taking.set()
        go_on.wait(10)
        real(self, v, offset, data)
    monkeypatch.setattr(R.PrimaryGroup, "take_changes", held)
    c.ta.rsg_attach("g", c.addr)
    try:
        assert taking.wait(10)
        with pytest.raises(R.ReplicationError) as info:
            c.ta.clone_restore("c1")
        assert "taking a secondary's changes" in str(info.value)
    finally:
        go_on.set()
    resynced(c.ta, c.link, c.tb)
    assert images(c.ta) == images(c.tb)


def test_a_take_writes_only_what_it_asked_for(cluster_factory, monkeypatch):
    """discard-zero-changes: a secondary that answers the take with data
    of a region it was not asked for (a bug, or a node posing as the
    secondary) is refused; the primary's data there stays."""
    c, sent0 = split_brain_pair(cluster_factory, [], B_ONLY,
                                policy="discard-zero-changes")
    before = images(c.ta)
    real = R.SecondaryGroup._send_pull
    sent = []

    def also_elsewhere(self, sock, runs):
        off = 200 * GRAN             # written by nobody since they agreed
        data = b"\x55" * GRAN
        sent.append(off)
        send_frame(sock, b"RDAT", DATA.pack(0, R.WRITE, off, GRAN,
                                            zlib.crc32(data)) + data)
        real(self, sock, runs)
    monkeypatch.setattr(R.SecondaryGroup, "_send_pull", also_elsewhere)
    c.ta.rsg_attach("g", c.addr)
    wait_for(lambda: sent and c.link.error and "not asked for" in
             c.link.error, 10, "the take refused", c.status)
    assert images(c.ta)[0][200 * GRAN:201 * GRAN] == \
        before[0][200 * GRAN:201 * GRAN]


def _secondary_fails_second_extent(cluster_factory, tmp_path, monkeypatch):
    """A converged cluster whose secondary's volume 0 fails (EIO) a write
    of the extent after y = 512 KiB; (cluster, the faults file, y)."""
    faults = tmp_path / "faults.json"
    _set_faults(faults, [])
    monkeypatch.setenv("CLONECTL_FAULTS", str(faults))
    c = cluster_factory()
    c.wait_converged()
    y = 512 << 10
    path = c.tb.lus[VOLS[0]].backend.path
    _set_faults(faults, [{"path": path, "op": "write", "offset": y + GRAN,
                          "length": GRAN, "errno": "EIO"}])
    return c, faults, y


def test_a_batch_the_volume_fails_to_apply_is_not_called_consistent(
        cluster_factory, tmp_path, monkeypatch):
    """The secondary's volume fails (EIO) on the second write of a batch it
    staged and acknowledged: the volume holds half the batch.  The node
    must not say it is consistent (reads refused, promote needs --force),
    its status names the error, and once the volume works again the staged
    copy is applied and replication goes on.  (Before, the OSError ended
    the session as a closed connection: the node stayed "consistent" at
    the batch before, showed half the batch to readers, and no status said
    why.)"""
    c, faults, y = _secondary_fails_second_extent(cluster_factory,
                                                  tmp_path, monkeypatch)
    c.stop_secondary()              # one batch of two writes
    c.write(0, y, b"\x21" * GRAN)
    c.write(0, y + GRAN, b"\x22" * GRAN)
    c.start_secondary()
    last = c.g.next_seq - 1
    wait_for(lambda: c.link.acked_seq == last, 10, "the batch acknowledged",
             c.status)
    wait_for(lambda: c.sg.status()["error"] is not None, 10,
             "the failure in the status", c.status)
    st = c.sg.status()
    assert not st["consistent"], st
    assert "EIO" in st["error"] or "Input/output" in st["error"], st
    with pytest.raises(errors.Error):
        c.tb.lus[VOLS[0]].read(bytearray(GRAN), y)
    with pytest.raises(R.RsgBusy):
        c.tb.rsg_promote("g")
    _set_faults(faults, [])         # the disk is back
    c.restart_secondary()
    c.write(1, 0, b"\x33" * GRAN)
    c.wait_converged()
    c.check_final()


def test_a_staged_batch_the_volume_failed_is_applied_again(
        cluster_factory, tmp_path, monkeypatch):
    """As above with the link streaming (no replay): the batch is staged
    and acknowledged, its apply fails half way.  The node is not
    consistent and says why; once the volume works, the next connection
    applies the staged copy first, and the secondary ends identical."""
    c, faults, y = _secondary_fails_second_extent(cluster_factory,
                                                  tmp_path, monkeypatch)
    c.write(0, y, b"\x21" * 2 * GRAN)
    wait_for(lambda: c.sg.status()["error"] is not None, 10,
             "the failure in the status", c.status)
    st = c.sg.status()
    assert not st["consistent"] and "updates" in st["error"], st
    with pytest.raises(errors.Error):
        c.tb.lus[VOLS[0]].read(bytearray(GRAN), y)
    _set_faults(faults, [])
    c.write(1, 0, b"\x33" * GRAN)
    c.wait_converged()
    c.check_final()
    assert c.sg.status()["error"] is None


# A secondary's acknowledgements and its stage slots, driven by a primary
# speaking the wire protocol directly.

Y = 512 << 10


def test_a_stream_of_zero_batches_is_acknowledged_while_it_lasts(
        cluster_factory):
    """A primary with a backlog of zero/trim batches (an fstrim, a mkfs
    catching up) keeps the socket readable: the secondary must still
    acknowledge batches while the stream lasts, or the primary's SRL is
    not freed and a sync writer waits the whole stream (a group commit
    that counted only data bytes did that).  A primary speaking the wire
    protocol directly stands in for a link with such a backlog."""
    import socket
    from target.replication.wire import (ENTRY, FRAME, SEQ, recv_frame,
                                         send_json)
    c = cluster_factory()
    c.write(0, 0, b"\x01" * GRAN)
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, 10, "disconnected",
             c.status)
    hello = c.g.hello()
    sock = socket.create_connection(("127.0.0.1", c.port), 5)
    R.link.authenticate(sock, TOKEN, c.addr)
    send_json(sock, b"HELO", hello)
    kind, payload = recv_frame(sock)
    assert kind == b"HRPL", payload
    first = c.sg.applied_seq + 1
    n = 3000
    bufs = []
    for seq in range(first, first + n):
        head = ENTRY.pack(seq, 0, R.ZERO, 0, GRAN,
                          R.entry_crc(seq, 0, R.ZERO, 0, GRAN, None))
        bufs += [FRAME.pack(b"ENTR", len(head)), head,
                 FRAME.pack(b"CMIT", SEQ.size), SEQ.pack(seq)]
    stream = b"".join(bufs)
    acks = []

    def reader():
        try:
            while True:
                k, p = recv_frame(sock)
                if k == b"ACKS":
                    acks.append((time.monotonic(), SEQ.unpack(p)[0]))
                    if acks[-1][1] == first + n - 1:
                        return
        except OSError:
            return
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    t0 = time.monotonic()
    sock.sendall(stream)
    th.join(60)
    sock.close()
    assert acks, "no acknowledgement at all"
    t_first, seq_first = acks[0]
    assert seq_first < first + n - 1, (
        "the first ACKS came {:.2f} s after the stream began and covers all "
        "{} batches ({} acknowledgements in all)".format(
            t_first - t0, n, len(acks)))


def _fake_primary(c, hello):
    """A primary speaking the wire protocol to the secondary of c (its real
    link detached); returns the socket after the handshake."""
    import socket
    from target.replication.wire import recv_frame, send_json
    sock = socket.create_connection(("127.0.0.1", c.port), 5)
    R.link.authenticate(sock, TOKEN, c.addr)
    send_json(sock, b"HELO", hello)
    kind, payload = recv_frame(sock)
    assert kind == b"HRPL", payload
    return sock


def _batch(sock, specs, cmit):
    from target.replication.wire import ENTRY, SEQ, send_frame
    for seq, off, data in specs:
        head = ENTRY.pack(seq, 0, R.WRITE, off, len(data),
                          R.entry_crc(seq, 0, R.WRITE, off, len(data), data))
        send_frame(sock, b"ENTR", head + data)
    send_frame(sock, b"CMIT", SEQ.pack(cmit))


def test_a_staged_batch_never_acknowledged_is_not_applied_over_a_newer_line(
        cluster_factory, monkeypatch):
    """The connection is cut while the secondary sends ACKS: the batch
    (seqs 2-3 of generation g1) was staged but is neither applied nor
    acknowledged.  A primary of a new generation branching after seq 1
    (another secondary promoted) then sends its own seq 2.  After a
    restart the secondary must hold the new line's 2 and not the old
    line's 2-3 (a recovery that applied every staged slot in the order of
    their last numbers did that, and claimed consistency at 3 on the new
    line with bytes its primary never wrote)."""
    from target.replication import secondary as S
    c = cluster_factory()
    c.write(0, 0, b"\x01" * GRAN)               # seq 1
    c.wait_converged()
    c.ta.rsg_detach("g", c.addr)
    wait_for(lambda: c.sg.connected_since is None, 10, "disconnected",
             c.status)
    hello = c.g.hello()
    orig_send = S.send_frame
    cut = []

    def send_frame(sock, kind, payload=b""):
        if kind == b"ACKS" and not cut:
            cut.append(payload)
            raise ConnectionResetError("cut while acknowledging")
        return orig_send(sock, kind, payload)
    monkeypatch.setattr(S, "send_frame", send_frame)
    # Old line (g1): seqs 2-3, the ACK is lost with the connection.
    sock = _fake_primary(c, hello)
    _batch(sock, [(2, Y, b"\xaa" * GRAN), (3, Y + GRAN, b"\xab" * GRAN)], 3)
    wait_for(lambda: cut and c.sg.connected_since is None, 10, "the cut",
             c.status)
    sock.close()
    assert c.sg.applied_seq == 1
    # New line (g2, branching after seq 1): its own seq 2.
    new_hello = dict(hello, generation="g2", history=hello["history"] +
                     [["g2", 2]], last_seq=2)
    sock = _fake_primary(c, new_hello)
    _batch(sock, [(2, Y, b"\xbb" * GRAN)], 2)
    from target.replication.wire import recv_frame
    kind, payload = recv_frame(sock)
    assert kind == b"ACKS"
    wait_for(lambda: c.sg.applied_seq == 2, 10, "applied", c.status)
    sock.close()
    wait_for(lambda: c.sg.connected_since is None, 10, "closed", c.status)
    assert read_image(c.tb, VOLS[0])[Y:Y + GRAN] == b"\xbb" * GRAN
    c.restart_secondary()
    sg = c.sg
    got = read_image(c.tb, VOLS[0])[Y:Y + 2 * GRAN]
    assert (sg.applied_seq, got[:2], got[GRAN:GRAN + 2]) == \
        (2, b"\xbb\xbb", b"\0\0"), (
            "after restart: consistent={} applied_seq={} history={}".format(
                sg.consistent, sg.applied_seq, sg.history))


def test_a_point_in_time_of_a_secondary_volume_holds_a_prefix(
        cluster_factory, monkeypatch):
    """A clone fracture (likewise a session mark) of a secondary's volume
    taken while a batch is being applied holds a prefix of its updates in
    their order, a state the primary had (it is taken between two updates,
    not after the whole batch: a reader waits for a slice of it at most),
    never a later update without an earlier one."""
    c = cluster_factory()
    c.wait_converged()
    synced_clone(c.tb, VOLS[0], "snap")
    holding, release = threading.Event(), threading.Event()
    orig = R.SecondaryGroup._apply_one

    def held(self, vol, kind, off, length, data):
        orig(self, vol, kind, off, length, data)
        if off == Y and not holding.is_set():
            holding.set()               # the first of two entries is in
            release.wait(10)
    monkeypatch.setattr(R.SecondaryGroup, "_apply_one", held)
    c.stop_secondary()                  # one batch of two writes
    c.write(0, Y, b"\x21" * GRAN)
    c.write(0, Y + GRAN, b"\x22" * GRAN)
    c.start_secondary()
    assert holding.wait(10), c.status()
    done = {}

    def fracture():
        try:
            c.tb.clone_fracture("snap")
            done["ok"] = True
        except Exception as e:          # pragma: no cover
            done["error"] = e
    th = threading.Thread(target=fracture, daemon=True)
    th.start()
    th.join(3)
    fractured_during_apply = not th.is_alive()
    release.set()
    th.join(10)
    assert done.get("ok"), done
    c.wait_converged()
    img = clone_image(c.tb, "snap")[Y:Y + 2 * GRAN]
    assert img in (b"\0" * 2 * GRAN, b"\x21" * GRAN + b"\0" * GRAN,
                   b"\x21" * GRAN + b"\x22" * GRAN), (
        "clone fractured {} the apply holds no prefix of the batch: {!r}"
        .format("while" if fractured_during_apply else "after",
                (img[GRAN - 2:GRAN + 2])))


@pytest.mark.parametrize("case", ["not fractured", "already running",
                                  "reverse sync while restoring"])
def test_a_refused_restore_leaves_the_links_streaming(cluster_factory,
                                                      monkeypatch, case):
    """A restore or reverse sync refused by the clone group's checks (a
    clone that is not fractured; a restore that runs already) changes
    nothing on the secondary: its links are not made to replay regions
    (all of them for --full), nor the consistent secondary made
    inconsistent meanwhile."""
    c = cluster_factory()
    rng = random.Random(43)
    c.write(0, 0, rng.randbytes(SIZES[0]))
    synced_clone(c.ta, VOLS[0], "snap")
    if case != "not fractured":
        c.ta.clone_fracture("snap")
        c.write(0, 0, rng.randbytes(SIZES[0] // 4))
        hold_engines(monkeypatch)
        c.ta.clone_restore("snap")
        wait_for(lambda: c.link.state == R.REPLICATING and c.sg.consistent
                 and c.link.dcm.count() == 0, 10, "the restore's replay",
                 c.status)
    c.wait_converged()
    replays = c.link.replays
    with pytest.raises(errors.Error):
        if case == "reverse sync while restoring":
            c.ta.clone_reverse_sync("snap")
        else:
            c.ta.clone_restore("snap", full=True)
    assert c.link.phase == (R.REPLICATING, R.link.SRL) and \
        c.link.dcm.count() == 0 and c.link.replays == replays, c.status()


def _sync_writes_go_at_once(c, fill, limit):
    """Four sync writes to v2, each acknowledged within limit seconds."""
    for i in range(4):
        started = time.monotonic()
        op = c.write(1, i * GRAN, fill * GRAN)
        took = time.monotonic() - started
        assert c.link.acknowledged >= op.seq and took < limit, \
            "a sync write took {:.2f} s".format(took)


def test_sync_writes_do_not_wait_for_a_held_replays_poll(cluster_factory,
                                                         monkeypatch):
    """While a replay may not read (a volume change starting, here a
    rollback of a primary's volume, whose every write is a sync write)
    or end (a reverse sync), its link still streams: a sync write wakes
    it, instead of waiting for its next look (REPLAY_IDLE, made long
    here), once per write."""
    monkeypatch.setattr(R.link, "REPLAY_IDLE", 1.0)
    c = cluster_factory(mode="sync")
    rng = random.Random(47)
    c.write(0, 0, rng.randbytes(SIZES[0]))
    c.wait_converged()
    c.ta.image_protect(VOLS[0])
    protected = read_image(c.ta, VOLS[0])
    c.write(0, 0, rng.randbytes(SIZES[0] // 2))
    c.wait_converged()
    started = time.monotonic()
    restored = c.ta.image_rollback(VOLS[0])["extents_restored"]
    took = time.monotonic() - started
    assert restored >= 4 and took < restored * 0.5, \
        "a rollback of {} extents took {:.1f} s".format(restored, took)
    c.wait_converged()
    assert read_image(c.tb, VOLS[0]) == protected
    synced_clone(c.ta, VOLS[0], "snap")
    c.ta.clone_fracture("snap")
    c.write(0, 0, rng.randbytes(SIZES[0] // 2))
    c.wait_converged()
    release = hold_engines(monkeypatch)
    c.ta.clone_reverse_sync("snap")
    wait_for(lambda: c.link.replay_done >= c.link.replay_total and
             c.link.state == R.DCM_REPLAY, 10, "the held replay", c.status)
    _sync_writes_go_at_once(c, b"\x5b", 0.5)
    release_until(c, release, "synchronized", "the reverse sync's end")
    c.wait_converged()
    assert read_image(c.ta, VOLS[0]) == read_image(c.tb, VOLS[0])


def test_sync_writes_wake_a_replay_held_back_by_its_rate(cluster_factory,
                                                        monkeypatch):
    """A replay limited by the link's rate (here a reverse sync's regions,
    4 KiB a second) waits between its chunks; its link still streams: a
    sync write wakes it at once, instead of waiting for its next look
    (REPLAY_IDLE, made long here)."""
    monkeypatch.setattr(R.link, "REPLAY_IDLE", 1.0)
    c = cluster_factory(mode="sync")
    rng = random.Random(53)
    c.write(0, 0, rng.randbytes(SIZES[0]))
    synced_clone(c.ta, VOLS[0], "snap")
    c.ta.clone_fracture("snap")
    for i in range(4):
        c.write(0, i * 16 * GRAN, rng.randbytes(GRAN))
    c.wait_converged()
    c.link.replay_rate = GRAN       # kept by the link that streams
    release = hold_engines(monkeypatch)
    c.ta.clone_reverse_sync("snap")
    wait_for(lambda: c.link.state == R.DCM_REPLAY and
             0 < c.link.replay_done < c.link.replay_total, 10,
             "the throttled replay", c.status)
    _sync_writes_go_at_once(c, b"\x5c", 0.3)
    # The rest at full speed: the link starts again without a limit.
    c.ta.rsg_attach("g", c.addr, rate="0")
    release_until(c, release, "synchronized", "the reverse sync's end")
    c.wait_converged()
    assert read_image(c.ta, VOLS[0]) == read_image(c.tb, VOLS[0])


@pytest.mark.parametrize("operation", ["restore", "reverse sync"])
def test_a_primary_killed_during_a_volume_change_ends_equal(
        cluster_factory, monkeypatch, operation):
    """A kill -9 of the primary while a restore or a reverse sync runs
    (its engine held, host writes copied on demand or mirrored, flushed):
    after the restart the link replays again, reading what hosts read;
    the secondary, sampled throughout, never says it is consistent with a
    state the primary's hosts did not see (a reverse sync's replay ends
    only with it), and both end equal."""
    c = cluster_factory(mode="sync")
    rng = random.Random(53)
    fractured_snap(c, rng, SIZES[0] // 2)
    start = c.ta.clone_restore if operation == "restore" else \
        c.ta.clone_reverse_sync
    release = start_held(c, monkeypatch, lambda: start("snap"))

    def writes():
        for i in range(8):
            host_write(c, rng, i)
        # Unflushed writes may be lost to the kill (a resumed restore
        # copies the clone over them): the model knows flushed ones only.
        c.flush()
    with sampled(c, crashing=True):
        writes()
        time.sleep(0.2)
        with c.lock:
            c.crash_primary()
        writes()
        time.sleep(0.5)
        if operation == "reverse sync":
            assert c.link.state == R.DCM_REPLAY and not c.sg.consistent, \
                c.status()
        release_until(c, release, "fractured" if operation == "restore"
                      else "synchronized", "the operation's end")
        c.check_final()


@pytest.mark.parametrize("written", ["clone", "source"])
def test_a_write_before_the_restores_switch_is_kept(
        cluster_factory, monkeypatch, written):
    """A write to the clone's export (or to the Source) after the
    restore's regions were taken (begin_volume_change) and before its
    switch sets a Delta Map bit the regions lack.  Had the restore put
    that extent back, the secondary, whose links replay the regions only,
    would say it is consistent (the restore's replay ends while the
    engine still runs) without it: the write counts as made after the
    restore began, as a clone write during it does (the Source keeps the
    clone's data of the restore's start there), and the extent stays
    marked as differing once the restore is done; so does a Source write
    (it is kept)."""
    c = cluster_factory()
    rng = random.Random(59)
    fractured_snap(c, rng, SIZES[0] // 4)
    group, clone = c.ta.clone_ops.find("snap")
    cg = group.granularity
    late = SIZES[0] // 2 + 5 * cg
    assert not clone.delta[late // cg]
    begin = R.PrimaryGroup.begin_volume_change

    def then_a_clone_write(g, *args, **kwargs):
        begun = begin(g, *args, **kwargs)
        if written == "clone":
            clone.export.write(b"\x6c" * cg, late)
        else:
            c.ta.lus[VOLS[0]].write(b"\x6c" * cg, late)
        return begun
    monkeypatch.setattr(R.PrimaryGroup, "begin_volume_change",
                        then_a_clone_write)
    release = hold_engines(monkeypatch)
    before = b"\x6c" * cg if written == "source" else \
        read_image(c.ta, VOLS[0])[late:late + cg]
    c.ta.clone_restore("snap")
    wait_for(lambda: c.link.state == R.REPLICATING and c.sg.consistent and
             c.sg.applied_seq == c.g.next_seq - 1, 10, "the replay",
             c.status)
    assert clone_state(c.ta, "snap") == "restoring"
    shown = bytearray(cg)
    group.visible_read(shown, late)
    with c.sg.lock:
        sec = read_image(c.tb, VOLS[0])[late:late + cg]
    assert sec == bytes(shown), "the consistent secondary lacks an " \
        "extent its primary's hosts read from the clone"
    release_until(c, release, "fractured", "the restore's end")
    assert read_image(c.ta, VOLS[0])[late:late + cg] == before
    assert clone.delta[late // cg], "the extent the clone changed is not " \
        "marked as differing"
    c.wait_converged()
    assert read_image(c.ta, VOLS[0]) == read_image(c.tb, VOLS[0])
