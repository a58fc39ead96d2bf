"""A composition model: clone groups, protected images (sessions) and
replication on the same LUs, on a primary and on a secondary.

Two in-process `Target` nodes A and B in tmp dirs, each listening
for primaries on 127.0.0.1 (as in test_rsg_engine.py); the group "g" of
volumes v1 and v2 starts with A primary.  Host I/O enters the LU's stack at
the top (`Target.lus[name].write/zero/trim/flush`, the plugin's path), clone
and image operations go through the Target's control methods.  Each node
has up to two clones of v1 (granularity 64K; the group's is 4K).

The hypothesis state machine mixes: host writes/zeroes/trims and flushes on
the primary; clone add/sync/fracture/restore on either node (a restore may
be held and its engine stepped by the test, so host I/O, role changes and
crashes meet a half-done restore); writes to fractured clones' exports;
protecting and releasing v1's image (a copy-on-first-write session);
detach/attach of the link; a role switch (detach, demote the primary,
promote the secondary, link back; `--discard-secondary-changes` when the
old primary wrote what the new one never got); a kill -9 of either node at
a quiet moment; a failing save (ENOSPC) of state.json or of the group's
record for the next operation; a checkpoint (converge, compare exactly).

After every step:
- the primary's host reads return the model's bytes (every change, also
  unflushed ones: a kill -9 keeps the page cache; only host writes to the
  Source during a protected restore that were not flushed may come back as
  the clone's data after a kill, as NBD allows);
- a secondary that says it is consistent holds the state after a prefix of
  the change sequence of the line of history it reports (model: one list
  of changes per line; a role switch starts a line with the prefix the new
  primary had); a volume restored on a detached secondary holds the clone's
  data until the primary replays it;
- for every clone, an extent whose delta bit is clear (delta or PRM, while
  restoring) is identical on Source and clone; a fractured (or restoring)
  clone holds exactly the model's content: what it had at the fracture,
  overlaid by writes to its own export; a synchronized clone at its
  fracture equals its Source (on a secondary: under the apply lock);
- a protected image reads as the volume did when it was protected, until
  it is released (a replay never takes it); an inconsistent secondary's
  last consistent images (LU@consistent-LU) are of one point: the last
  one it was consistent at;
- clone states are the model's; refused operations change nothing, and a
  failed save leaves memory and disk as they were.

Kills are a kill -9 at a quiet moment (as in test_rsg_engine.py): threads
stop, nothing is persisted, the page cache keeps every write; a new Target
starts on the same state directory.  Not simulated: a kill in the middle of
a request or of a persist, power loss.  Left out: sessions with NBD
destinations (transfers, updates: only the copy-on-first-write images of
`lu protect` are used), more than one secondary, the SRL failing, host
connections (a demote would refuse them).

Switches (environment): COMPOSITION_MODEL_EXAMPLES (default 30; 8 in a run
of the fast tier alone, see tests/support/tiers.py) and
COMPOSITION_MODEL_STEPS (default 30) size the machine;
COMPOSITION_MODEL_SHRINK=1 shrinks a failing case (off by default: a
timing-dependent failure shrinks for minutes, past pytest's timeout, and
hypothesis may then report it as flaky; the unshrunk steps are printed);
COMPOSITION_MODEL_TRACE=FILE writes every rule run to FILE;
COMPOSITION_MODEL_CLONE_SAVES=1 enables checks of a known problem (below,
where it is defined).
"""

import contextlib
import errno
import json
import os
import random
import shutil
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)

from tests.support import rsgnodes
from tests.support.models import tolerate_timing_in_generation
from tests.support.tiers import examples
from tests.support.twonodes import (SIZES, VOLS, Node, break_a_replay,
                                    converge, replay_broken_off,
                                    write_and_detach)
from target import clones, errors, sessions
from target import replication as R

from tests.support.rsgmodel import (check_exact, check_sample, fast_timing,
                                    first_diff, Op, restore_timing, SET,
                                    state_after, wait_for)

CLONE_GRAN = 64 << 10
EXTENTS = SIZES[0] // CLONE_GRAN
NAMES = {"A": ("a1", "a2"), "B": ("b1", "b2")}
IMAGE = "protected-v1"          # Target.image_protect's session of v1


# ---------------------------------------------------------------- nodes

@contextlib.contextmanager
def engines_held():
    """Clone engines started meanwhile do not run: the test steps them."""
    orig = clones.SyncEngine.start
    clones.SyncEngine.start = lambda engine: None
    try:
        yield
    finally:
        clones.SyncEngine.start = orig


class InjectedFull(OSError):
    pass


@contextlib.contextmanager
def failing_save(obj):
    """obj.save (a StateDir or a group's GroupFiles) raises ENOSPC once,
    for the calling thread only (a link thread's own persist is not the
    operation under test)."""
    me = threading.current_thread()
    orig = obj.save
    hits = []

    def save(doc):
        if not hits and threading.current_thread() is me:
            hits.append(True)
            raise InjectedFull(errno.ENOSPC, "No space left on device "
                               "(injected)")
        return orig(doc)
    obj.save = save
    try:
        yield hits
    finally:
        del obj.save


class MClone:
    """The model of one clone: its state, and its content while it is
    exported (fractured or restoring)."""

    def __init__(self, state_):
        self.state = state_
        self.content = None

    def __repr__(self):
        return "MClone({})".format(self.state)


# A clone operation whose state change cannot be saved (ENOSPC) leaves the
# new state in memory (known: clones change state before they persist it;
# being fixed apart).  COMPOSITION_MODEL_CLONE_SAVES=1 puts the clone
# operations back into the disk-full rule.
DISK_FULL_OPS = ["protect_image", "release_image", "detach", "attach"]
if os.environ.get("COMPOSITION_MODEL_CLONE_SAVES") == "1":
    DISK_FULL_OPS += ["clone_add", "clone_sync", "clone_fracture",
                      "clone_restore"]


# ---------------------------------------------------------------- machine

NODE = st.sampled_from(["A", "B"])
SLOT = st.integers(0, 1)


class CompositionMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.saved = fast_timing()
        self.root = tempfile.mkdtemp(prefix="composition-")
        self.tok = rsgnodes.write_token(os.path.join(self.root, "tok"))
        self.nodes = {}
        self.lines = {}         # history (generation ids) -> changes
        self.ops = None         # the current primary's line
        self.img = None         # state after self.ops
        self.clones = {"A": {}, "B": {}}
        self.held = {"A": None, "B": None}
        self.unflushed = {"A": set(), "B": set()}
        self.override = {}      # vol -> bytes restored on the secondary
        self.replay_override = {}   # the same, while a replay undoes it
        self.images = {"A": None, "B": None}    # protected v1 content
        self.attached = True
        self.last_consistent = {}
        self.last_switch = None
        self.discard = False

    # -------------------------------------------------------- plumbing

    @initialize(mode=st.sampled_from(["async", "async", "sync"]))
    def setup(self, mode):
        self.mode = mode
        for n in ("A", "B"):
            self.nodes[n] = Node(n, self.root, self.tok)
            self.nodes[n].start()
        self.prim = "A"
        t = self.P.t
        t.rsg_create("g", VOLS, "1M", granularity="4K")
        t.rsg_link("g", self.S.addr, mode, self.tok)
        self.P.rsg.sync_timeout = 1.0
        self.ops = self.lines.setdefault(self.key(self.P.rsg), [])
        self.img = state_after(self.ops, SIZES)
        event("mode " + mode)

    def teardown(self):
        try:
            if self.nodes and self.ops is not None:
                self.checkpoint()
        finally:
            for node in self.nodes.values():
                if node.t is not None:
                    try:
                        node.close()
                    except Exception:
                        pass
            shutil.rmtree(self.root, ignore_errors=True)
            restore_timing(self.saved)

    @property
    def P(self):
        return self.nodes[self.prim]

    @property
    def S(self):
        return self.nodes["B" if self.prim == "A" else "A"]

    @staticmethod
    def key(g):
        return tuple(h[0] for h in g.history)

    @property
    def link(self):
        return self.P.rsg.link(self.S.addr)

    def between(self, first):
        """A number for a SET before the change numbered first and after
        every change of the model."""
        last = self.ops[-1].seq if self.ops else 0
        assert last < first, (last, first)
        return max(first - 0.5, (last + first) / 2)

    def append(self, op):
        assert not self.ops or op.seq > self.ops[-1].seq, (self.ops[-1], op)
        self.ops.append(op)
        op.apply(self.img)

    def status(self):
        try:
            sg = self.S.rsg
            return {"link": self.link.status(),
                    "secondary": sg.status() if sg else None,
                    "last_seq": self.P.rsg.next_seq - 1}
        except Exception as e:          # pragma: no cover
            return repr(e)

    def restoring(self, n):
        return any(m.state == clones.RESTORING
                   for m in self.clones[n].values())

    def wait_engine(self, n):
        """Wait until no clone engine of node n runs."""
        node = self.nodes[n]
        group = node.group()
        if group is None:
            return

        def idle():
            e = group.engine
            return e is None or not e.running
        wait_for(idle, 30, "the clone engine of " + n,
                 lambda: [group.clone_status(c)
                          for c in group.clones.values()])
        for name, m in self.clones[n].items():
            c = group.clones[name]
            if m.state in (clones.SYNCING, clones.REVERSE_SYNCING) and \
                    c.state == clones.SYNCHRONIZED:
                m.state = c.state
            elif m.state == clones.RESTORING and c.state == clones.FRACTURED:
                m.state = c.state
            assert c.state == m.state, (name, c.state, m.state,
                                        group.clone_status(c))
        if not self.restoring(n):
            self.unflushed[n].clear()

    # -------------------------------------------------------- host I/O

    @rule(vol=st.integers(0, 1),
          kind=st.sampled_from([R.WRITE, R.WRITE, R.WRITE, R.ZERO, R.TRIM]),
          off=st.integers(0, SIZES[0] - 1), length=st.integers(1, 160 << 10),
          align=st.booleans(), seed=st.integers(0, 2 ** 32), fua=st.booleans())
    def host_change(self, vol, kind, off, length, align, seed, fua):
        size = SIZES[vol]
        off %= size
        if align:
            off -= off % 4096
            length = max(4096, length - length % 4096)
        length = max(1, min(length, size - off))
        data = random.Random(seed).randbytes(length) \
            if kind == R.WRITE else None
        lu = self.P.t.lus[VOLS[vol]]
        g = self.P.rsg
        first = g.next_seq
        if kind == R.WRITE:
            lu.write(data, off, fua=fua)
        elif kind == R.ZERO:
            lu.zero(off, length, fua=fua)
        else:
            lu.trim(off, length, fua=fua)
        seq = g.next_seq - 1
        assert seq >= first, "a change got no number"
        self.append(Op(seq, vol, kind, off, length, data))
        if vol == 0 and self.restoring(self.prim):
            if fua:
                self.unflushed[self.prim].clear()
            else:
                self.unflushed[self.prim].update(
                    range(off // CLONE_GRAN,
                          (off + length - 1) // CLONE_GRAN + 1))

    @rule()
    def flush(self):
        for vol in VOLS:
            self.P.t.lus[vol].flush()
        self.unflushed[self.prim].clear()

    # -------------------------------------------------------- clones

    def _clone_call(self, n, name, call, allowed, refusals):
        """Run a clone operation; True if it was accepted.  A refusal must
        be expected by the model and change nothing."""
        before = dict((k, m.state) for k, m in self.clones[n].items())
        try:
            call()
        except refusals as e:
            assert not allowed or allowed is None, "{} refused on {}: {}" \
                .format(name, n, e)
            group = self.nodes[n].group()
            now = dict((k, c.state) for k, c in group.clones.items()) \
                if group else {}
            assert now == before, (e, now, before)
            return False
        assert allowed or allowed is None, "clone {} operation on {} " \
            "accepted against the model: {}".format(name, n, self.clones[n])
        return True

    def group_idle(self, n, name):
        return not any(m.state in clones.RUNNING
                       for k, m in self.clones[n].items() if k != name) \
            and self.held[n] is None

    @rule(n=NODE, slot=SLOT)
    def clone_add(self, n, slot):
        self.do_clone_add(n, slot)

    def do_clone_add(self, n, slot):
        name = NAMES[n][slot]
        if name in self.clones[n]:
            return
        self.nodes[n].t.clone_add(VOLS[0], name, granularity="64K")
        self.clones[n][name] = MClone(clones.OUT_OF_SYNC)

    @rule(n=NODE, slot=SLOT)
    def clone_sync(self, n, slot):
        self.do_clone_sync(n, slot)

    def do_clone_sync(self, n, slot):
        name = NAMES[n][slot]
        m = self.clones[n].get(name)
        if m is None:
            return
        allowed = m.state in (clones.OUT_OF_SYNC, clones.FRACTURED) and \
            self.group_idle(n, name)
        if self._clone_call(n, name, lambda: self.nodes[n].t.clone_sync(name),
                            allowed, (clones.InvalidTransition,
                                      clones.GroupBusy,
                                      clones.AlreadyRunning)):
            m.state, m.content = clones.SYNCING, None
            self.wait_engine(n)
            assert m.state == clones.SYNCHRONIZED

    @rule(n=NODE, slot=SLOT)
    def clone_snapshot(self, n, slot):
        """add (if needed), sync, fracture: a composite, so that restores
        of fractured clones are reached often."""
        self.do_clone_add(n, slot)
        m = self.clones[n][NAMES[n][slot]]
        if m.state in (clones.OUT_OF_SYNC, clones.FRACTURED):
            self.do_clone_sync(n, slot)
        self.do_clone_fracture(n, slot)

    def source_view(self, n):
        """The Source as hosts see it: the model on the primary; on the
        secondary what it holds (the caller holds the apply lock)."""
        if n == self.prim:
            return bytes(self.img[0])
        return self.nodes[n].read_below_guard(0)

    @rule(n=NODE, slot=SLOT)
    def clone_fracture(self, n, slot):
        self.do_clone_fracture(n, slot)

    def do_clone_fracture(self, n, slot):
        name = NAMES[n][slot]
        m = self.clones[n].get(name)
        if m is None:
            return
        node = self.nodes[n]
        lock = node.rsg.lock if n != self.prim and node.rsg is not None \
            else contextlib.nullcontext()
        with lock:
            # A secondary that is inconsistent is no point in time of the
            # primary: no fracture freezes it.
            inconsistent = n != self.prim and node.rsg is not None and \
                not node.rsg.consistent
            if not self._clone_call(
                    n, name, lambda: node.t.clone_fracture(name),
                    m.state == clones.SYNCHRONIZED and not inconsistent,
                    (clones.InvalidTransition, R.ReplicaUnavailable)):
                return
            m.state = clones.FRACTURED
            m.content = node.clone_image(name)
            src = self.source_view(n)
        assert m.content == src, "synchronized clone {} of {} was not a " \
            "copy of its Source at the fracture: {}".format(
                name, n, first_diff([m.content], [src]))

    @rule(n=NODE, slot=SLOT, hold=st.booleans())
    def clone_restore(self, n, slot, hold):
        self.do_clone_restore(n, slot, hold)

    @rule(n=NODE, slot=SLOT, hold=st.booleans())
    def snapshot_and_restore(self, n, slot, hold):
        """A composite: a fractured clone (made if there is none), written
        by hosts meanwhile, restored; so that restores, held ones in
        particular, meet the other rules often."""
        if self.held[n] is not None:
            return
        fractured = [k for k, m in sorted(self.clones[n].items())
                     if m.state == clones.FRACTURED]
        if not fractured:
            self.clone_snapshot(n, slot)
            if n == self.prim:
                self.host_change(0, R.WRITE, slot * 300000, 200000, False,
                                 slot, False)
        fractured = [k for k, m in sorted(self.clones[n].items())
                     if m.state == clones.FRACTURED]
        if fractured:
            self.do_clone_restore(n, NAMES[n].index(fractured[0]), hold)

    def do_clone_restore(self, n, slot, hold):
        name = NAMES[n][slot]
        m = self.clones[n].get(name)
        if m is None:
            return
        node = self.nodes[n]
        primary = n == self.prim
        sg = None if primary else node.rsg
        allowed = m.state == clones.FRACTURED and self.group_idle(n, name) \
            and not any(o.state in clones.MIRRORED
                        for k, o in self.clones[n].items() if k != name)
        if allowed and sg is not None and (
                self.attached or sg.connection is not None or
                sg.connected_since is not None):
            allowed = None      # refused while a primary is connected
        first = node.rsg.next_seq if primary else None
        # A restore of a clone that differs nowhere changes nothing: the
        # secondary does not diverge, and keeps applying its primary's
        # updates.
        changes = any(node.group().clones[name].delta)
        refusals = (clones.InvalidTransition, clones.GroupBusy,
                    clones.AlreadyRunning, clones.SiblingsMirrored,
                    R.RsgBusy)
        with engines_held() if hold else contextlib.nullcontext():
            accepted = self._clone_call(
                n, name, lambda: node.t.clone_restore(name), allowed,
                refusals)
        if not accepted:
            return
        m.state = clones.RESTORING
        if primary:
            self.append(Op(self.between(first), 0, SET, 0, SIZES[0],
                           m.content))
        elif changes:
            self.override[0] = m.content
        if hold:
            self.held[n] = node.group().engine
            event("restore held")
        else:
            self.wait_engine(n)

    @rule(n=NODE, slot=SLOT)
    def clone_reverse_sync(self, n, slot):
        """Source := clone (unprotected: host writes are mirrored to the
        clone meanwhile); the clone ends synchronized."""
        name = NAMES[n][slot]
        m = self.clones[n].get(name)
        if m is None:
            return
        node = self.nodes[n]
        primary = n == self.prim
        sg = None if primary else node.rsg
        allowed = m.state == clones.FRACTURED and self.group_idle(n, name) \
            and not any(o.state in clones.MIRRORED
                        for k, o in self.clones[n].items() if k != name)
        if allowed and sg is not None and (
                self.attached or sg.connection is not None or
                sg.connected_since is not None):
            allowed = None      # refused while a primary is connected
        first = node.rsg.next_seq if primary else None
        accepted = self._clone_call(
            n, name, lambda: node.t.clone_reverse_sync(name), allowed,
            (clones.InvalidTransition, clones.GroupBusy,
             clones.AlreadyRunning, clones.SiblingsMirrored, R.RsgBusy))
        if not accepted:
            return
        if primary:
            self.append(Op(self.between(first), 0, SET, 0, SIZES[0],
                           m.content))
        else:
            self.override[0] = m.content
        m.state, m.content = clones.REVERSE_SYNCING, None
        self.wait_engine(n)
        assert m.state == clones.SYNCHRONIZED
        event("reverse sync")

    # No preconditions on held engines: whether a restore was accepted on
    # a secondary depends on timing (a primary connected or not), and
    # hypothesis needs the same rules enabled when it replays a case.
    @rule(steps=st.integers(1, 6))
    def engine_steps(self, steps):
        if not any(self.held.values()):
            return
        n = "A" if self.held["A"] else "B"
        eng = self.held[n]
        for _ in range(steps):
            if not eng.step():
                if eng.finish():
                    self.held[n] = None
                    self.wait_engine(n)
                    return

    @rule()
    def engine_release(self):
        if not any(self.held.values()):
            return
        n = "A" if self.held["A"] else "B"
        eng, self.held[n] = self.held[n], None
        eng.start()
        self.wait_engine(n)

    @rule(n=NODE, slot=SLOT, off=st.integers(0, SIZES[0] - 1),
          length=st.integers(1, 100 << 10), seed=st.integers(0, 2 ** 32))
    def clone_export_write(self, n, slot, off, length, seed):
        name = NAMES[n][slot]
        m = self.clones[n].get(name)
        if m is None:
            return
        length = min(length, SIZES[0] - off)
        data = random.Random(seed).randbytes(length)
        export = self.nodes[n].group().clones[name].export
        if m.state not in clones.EXPORTED:
            with pytest.raises(errors.ReadOnly):
                export.write(data, off)
            return
        export.write(data, off)
        c = bytearray(m.content)
        c[off:off + length] = data
        m.content = bytes(c)

    # -------------------------------------------------------- images

    @rule()
    def protect_image(self):
        self.do_protect_image()

    def do_protect_image(self):
        n = self.prim
        group = self.P.t.groups.get(VOLS[0])
        restored = group is not None and any(
            c.state in (clones.RESTORING, clones.REVERSE_SYNCING)
            for c in group.clones.values())
        try:
            self.P.t.image_protect(VOLS[0])
        except sessions.SessionBusy:
            # No new point in time of a Source a clone restores (only
            # this thread starts restores; one may end meanwhile).
            assert restored and self.images[n] is None, self.status()
            event("protect refused: a restore runs")
            return
        if self.images[n] is None:
            self.images[n] = bytes(self.img[0])

    @rule(n=NODE)
    def release_image(self, n):
        self.do_release_image(n)

    def do_release_image(self, n):
        if self.images[n] is None or n != self.prim:
            return
        self.nodes[n].t.image_release(VOLS[0])
        self.images[n] = None

    # -------------------------------------------------------- replication

    @precondition(lambda self: self.attached)
    @rule()
    def detach(self):
        self.do_detach()

    def do_detach(self):
        if not self.attached:
            return
        self.P.t.rsg_detach("g", self.S.addr)
        self.attached = False

    @precondition(lambda self: not self.attached)
    @rule()
    def attach(self):
        self.do_attach()

    def do_attach(self):
        if self.attached:
            return
        self.P.t.rsg_attach("g", self.S.addr, **self.attach_options())
        self.attached = True

    def attach_options(self):
        """A plain attach undoes an earlier --discard-secondary-changes:
        the admin says it again until the secondary took this side's
        history."""
        sg = self.S.rsg
        if self.discard and sg is not None and \
                self.key(sg) == self.key(self.P.rsg):
            self.discard = False
        return {"discard_secondary_changes": True} if self.discard else {}

    def release_held(self, n):
        eng, self.held[n] = self.held[n], None
        if eng is not None:
            eng.start()
        self.wait_engine(n)

    @rule(converge=st.booleans())
    def switch_roles(self, converge):
        """Detach, demote the primary, promote the secondary, link back."""
        if converge:
            self.checkpoint()
        old, new = self.P, self.S
        for attempt in range(3):
            # Promote only a consistent secondary (no --force here).
            sg = new.rsg
            if sg is None or self.held[new.name]:
                self.checkpoint()
                sg = new.rsg
            if self.attached:
                old.t.rsg_detach("g", new.addr)
            self.attached = False
            wait_for(lambda: sg.connected_since is None, 20,
                     "the old primary gone", self.status)
            if sg.consistent:
                break
            self.checkpoint()
        old_line = self.ops
        old_key = self.key(old.rsg)
        old_last = old.rsg.next_seq - 1
        old.t.rsg_demote("g")
        with sg.lock:
            applied = sg.applied_seq
            assert sg.consistent
            assert self.lines.get(self.key(sg)) is not None, \
                "the secondary reports an unknown history"
            sec_key = self.key(sg)
            line = self.lines[sec_key]
        new.t.rsg_promote("g")
        g = new.rsg
        g.sync_timeout = 1.0
        ops = [op for op in line if op.seq <= applied]
        # A restore on the secondary is part of what it holds when its
        # generation starts (at applied + 1): the new line's state "at
        # applied" includes it (a replay brings another node there).
        for vol, data in sorted(self.override.items()):
            ops.append(Op(applied, vol, SET, 0, SIZES[vol], data))
        self.override = {}
        self.prim = new.name
        self.ops = self.lines.setdefault(self.key(g), ops)
        assert self.ops is ops, "a generation id came back"
        self.img = state_after(ops, SIZES)
        # The old primary wrote what the new one never got (numbers of two
        # lines are not comparable: look at the changes themselves), or
        # handed out numbers past the branch point (a jump after a kill).
        kept = set(map(id, ops))
        diverged = any(id(op) not in kept for op in old_line) or \
            (old_key == sec_key and old_last > applied)
        self.last_switch = (old_last, applied, diverged)
        new.t.rsg_link("g", old.addr, self.mode, self.tok)
        self.attached = True
        self.discard = diverged
        if diverged:
            event("split brain: attach --discard-secondary-changes")
            new.t.rsg_attach("g", old.addr, discard_secondary_changes=True)

    @rule(n=NODE)
    def kill(self, n):
        node = self.nodes[n]
        primary = n == self.prim
        node.kill()
        self.held[n] = None
        unflushed, self.unflushed[n] = set(self.unflushed[n]), set()
        node.start()
        if primary:
            node.rsg.sync_timeout = 1.0
        self.wait_engine(n)
        if primary and unflushed:
            # Host writes of a restoring Source that were not flushed may
            # have been restored over by the resumed restore.
            fix = []
            now = node.read_top(0)
            for e in sorted(unflushed):
                a, b = e * CLONE_GRAN, (e + 1) * CLONE_GRAN
                if now[a:b] != self.img[0][a:b]:
                    fix.append((a, now[a:b]))
            for a, data in fix:
                self.append(Op(self.between(node.start_seq), 0, SET, a,
                               len(data), data))
            if fix:
                event("unflushed writes of a restoring Source restored over")
        self.unflushed[n].clear()
        event("kill " + ("primary" if primary else "secondary"))

    @rule(n=NODE, what=st.sampled_from(DISK_FULL_OPS), slot=SLOT)
    def disk_full(self, n, what, slot):
        """The next save of node n fails with ENOSPC: the operation fails
        cleanly, memory and disk stay as they were."""
        node = self.nodes[n]
        if what in ("detach", "attach"):
            if n != self.prim:
                return
            target = node.rsg.files
        else:
            target = node.t.state_dir
        call = {
            "clone_add": lambda: self.do_clone_add(n, slot),
            "clone_sync": lambda: self.do_clone_sync(n, slot),
            "clone_fracture": lambda: self.do_clone_fracture(n, slot),
            "clone_restore": lambda: self.do_clone_restore(n, slot, False),
            "protect_image": lambda: self.do_protect_image() if
            n == self.prim else None,
            "release_image": lambda: self.do_release_image(n),
            "detach": self.do_detach,
            "attach": self.do_attach,
        }[what]
        before = self.snapshot(node)
        with failing_save(target) as hits:
            try:
                call()
            except InjectedFull:
                after = self.snapshot(node)
                assert after == before, "{} on {} failed (disk full) but " \
                    "changed memory or disk:\nbefore {}\nafter  {}".format(
                        what, n, before, after)
                event("disk full: {} failed cleanly".format(what))
                return
        if hits:
            now = self.snapshot(node)
            assert now["memory"] == now["disk"], "{} on {} succeeded with " \
                "its save failing; memory and disk differ: {}".format(
                    what, n, now)
            event("disk full: {} went on".format(what))

    def snapshot(self, node):
        """Clone states, image marks and the group's role and link
        attachments, as memory and as disk have them."""
        t = node.t
        with open(t.state_dir.state_file) as f:
            doc = json.load(f)
        rec = doc["lus"][VOLS[0]]
        disk = {"clones": {k: c["state"] for k, c in
                           rec.get("clones", {}).items()},
                "sessions": {k: s["marked"] for k, s in
                             rec.get("sessions", {}).items()}}
        group = node.group()
        mem = {"clones": {k: c.state for k, c in group.clones.items()}
               if group else {},
               "sessions": {k: s.marked for k, s in t.sessions.items()
                            if s.source.name == VOLS[0]}}
        g = node.rsg
        if g is None:       # a secondary before the first contact
            return {"memory": mem, "disk": disk}
        with open(g.files.record) as f:
            grec = json.load(f)
        disk["rsg"] = (grec["role"], [l["attached"]
                                      for l in grec.get("links", [])])
        mem["rsg"] = (g.role, [l.attached for l in getattr(g, "links", [])])
        if g.role == R.SECONDARY:
            # A replay protects and releases images on its own.
            del mem["sessions"], disk["sessions"]
        return {"memory": mem, "disk": disk}

    # -------------------------------------------------------- checkpoint

    def converged(self):
        sg = self.S.rsg
        link = self.link
        return link.state == R.REPLICATING and sg is not None and \
            sg.consistent and sg.applied_seq == self.P.rsg.next_seq - 1

    @rule()
    def checkpoint(self):
        """Release held engines, attach, converge; then the secondary holds
        exactly the primary's state at its applied_seq, and the primary's
        whole line."""
        for n in ("A", "B"):
            self.release_held(n)
        if not self.attached:
            self.P.t.rsg_attach("g", self.S.addr, **self.attach_options())
            self.attached = True
        end = time.monotonic() + 30
        while not self.converged():
            if self.link.state == R.DIVERGED:
                raise AssertionError(
                    "link diverged: {}; primary history {}, discard {}, "
                    "last switch (old last, applied) {}".format(
                        self.status(), self.P.rsg.history,
                        self.link.discard_secondary, self.last_switch))
            if time.monotonic() > end:
                raise AssertionError("no convergence: {}".format(
                    self.status()))
            time.sleep(0.02)
        sg = self.S.rsg
        with sg.lock:
            applied = sg.applied_seq
            sec = [self.S.read_below_guard(v) for v in range(len(VOLS))]
            key = self.key(sg)
        self.override = {}
        assert key == self.key(self.P.rsg), (key, self.key(self.P.rsg))
        check_exact(self.ops, sec, applied, SIZES, names=VOLS)
        prim = [self.P.read_top(v) for v in range(len(VOLS))]
        assert prim == sec, first_diff(prim, sec, VOLS)
        event("checkpoint")

    # -------------------------------------------------------- invariants

    @invariant()
    def primary_reads_the_model(self):
        if self.ops is None:
            return
        for vol in range(len(VOLS)):
            got = self.P.read_top(vol)
            assert got == self.img[vol], "host read of {} on the primary " \
                "{}: {}".format(VOLS[vol], self.prim, first_diff(
                    [self.img[vol]], [got], [VOLS[vol]]))

    @invariant()
    def secondary_is_a_prefix(self):
        if self.ops is None:
            return
        node = self.S
        sg = node.rsg
        if sg is None:
            return
        frozen = None
        with sg.lock:
            consistent = sg.consistent
            applied = sg.applied_seq
            key = self.key(sg)
            diverged = sg.diverged
            imgs = [node.read_below_guard(v) for v in range(len(VOLS))] \
                if consistent else None
            if not consistent and sg.protected:
                frozen = self.frozen_images(node)
        if self.override and diverged is None:
            # A replay began: it undoes the restore (the image it protects
            # still shows it).
            self.replay_override, self.override = self.override, {}
        if not consistent:
            last = self.last_consistent.get(node.name)
            if frozen is not None and last is not None:
                # What `lu rollback` would put back: the last consistent
                # image, of every volume at the same point.
                # A restored volume's image is the restored data, or older
                # (a secondary restored while inconsistent keeps the image
                # protected before): not checked.
                check_sample(self.lines[last[0]], last[1], frozen, SIZES,
                             what="protected image of secondary " +
                             node.name, only=[
                                 v for v in range(len(VOLS))
                                 if v not in self.replay_override])
            return
        self.replay_override = {}
        if not self.override:
            self.last_consistent[node.name] = (key, applied)
        ops = self.lines.get(key)
        assert ops is not None, "secondary {} reports history {} the " \
            "model does not know ({})".format(node.name, key,
                                              list(self.lines))
        for vol, data in self.override.items():
            assert imgs[vol] == data, "restored volume {} of the secondary " \
                "is not its clone's data".format(VOLS[vol])
        only = [v for v in range(len(VOLS)) if v not in self.override]
        check_sample(ops, applied, imgs, SIZES,
                     what="secondary " + node.name, only=only)

    @staticmethod
    def frozen_images(node):
        out = []
        for vol, size in zip(VOLS, SIZES):
            s = node.t.sessions.get("consistent-" + vol)
            if s is None or not s.marked:
                return None
            buf = bytearray(size)
            try:
                s.read_frozen(buf, 0)
            except sessions.FrozenImageGone:
                return None     # the replay ended meanwhile
            out.append(bytes(buf))
        return out

    @invariant()
    def clones_match_model(self):
        if self.ops is None:
            return
        for n, node in self.nodes.items():
            group = node.group()
            model = self.clones[n]
            if group is None:
                assert not model
                continue
            assert set(group.clones) == set(model)
            secondary = n != self.prim and node.rsg is not None
            with node.rsg.lock if secondary else contextlib.nullcontext():
                # A clean bit vouches for extents no write is in flight
                # on: the legs of large writes land first (they need no
                # lock of the secondary's).
                group.legs.wait()
                src = node.read_base(0)
                for name, m in model.items():
                    c = group.clones[name]
                    assert c.state == m.state, (n, name, c.state, m.state)
                    data = node.clone_image(name)
                    if m.state in clones.EXPORTED:
                        assert data == m.content, "clone {} of {} changed " \
                            "other than by its export: {}".format(
                                name, n, first_diff([m.content], [data]))
                    delta = bytes(c.delta)
                    if c is group.restoring:
                        delta = bytes(a | b for a, b in zip(delta, group.prm))
                    for e in range(EXTENTS):
                        a, b = e * CLONE_GRAN, (e + 1) * CLONE_GRAN
                        if not delta[e]:
                            assert src[a:b] == data[a:b], "clone {} of {} " \
                                "({}) extent {} differs from the Source " \
                                "but its bit is clear".format(
                                    name, n, c.state, e)

    @invariant()
    def protected_images_hold(self):
        if self.ops is None:
            return
        for n, node in self.nodes.items():
            want = self.images[n]
            if want is None:
                continue
            s = node.t.sessions.get(IMAGE)
            buf = bytearray(SIZES[0])
            try:
                s.read_frozen(buf, 0)
            except (AttributeError, sessions.FrozenImageGone):
                s = None
            assert s is not None, "protected image of v1 on {} is " \
                "gone".format(n)
            assert bytes(buf) == want, "protected image of v1 on {} " \
                "changed: {}".format(n, first_diff([want], [bytes(buf)]))


CompositionMachine.TestCase.settings = settings(
    max_examples=examples("COMPOSITION_MODEL_EXAMPLES", 30, 8),
    stateful_step_count=int(os.environ.get("COMPOSITION_MODEL_STEPS", "30")),
    deadline=None, database=None,   # timing-dependent: no stale replays
    phases=tuple(Phase) if os.environ.get("COMPOSITION_MODEL_SHRINK") == "1"
    else [Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck))
TestCompositionModel = tolerate_timing_in_generation(
    CompositionMachine.TestCase)


# ---------------------------------------------------------------- regressions
# Minimized from the model.

def test_no_split_brain_for_a_generation_without_writes():
    """A node promoted and demoted again without writing anything in its
    generation has written nothing after the branch point: linking to it is
    no split brain.  (Two nodes each holding a generation the other never
    saw, e.g. A promoted, then B promoted again before A's replay reached
    it, were taken for a split brain, and the link waited for
    --discard-secondary-changes.)"""
    hd = R.history_diverges
    base = [["g1", 1], ["g2", 5]]
    # B promoted from g2 (its g4 starts at 5) links to A, which was promoted
    # as g3 at 5 and wrote nothing there (last 4).
    assert hd(base + [["g4", 5]], 4, base + [["g3", 5]], 4) == (False, 4)
    # ... and after A wrote one update in g3, it is one.
    assert hd(base + [["g4", 5]], 4, base + [["g3", 5]], 5) == (True, 4)
    # A secondary ahead by a generation it wrote nothing in.
    assert hd([["g1", 1]], 7, [["g1", 1], ["g2", 6]], 5) == (False, 5)
    assert hd([["g1", 1]], 7, [["g1", 1], ["g2", 6]], 6) == (True, 5)


def saved_link(a):
    with open(a.rsg.files.record) as f:
        return json.load(f)["links"][0]


def test_detach_and_attach_with_full_disk_change_nothing(two_nodes):
    """`rsg detach` or `rsg attach` whose record cannot be saved (ENOSPC)
    fails and leaves the link as it was, in memory as on disk (before, a
    failed detach left the link stopped and detached in memory while the
    record said attached: nothing replicated, and nothing said why)."""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    link = a.rsg.links[0]
    with failing_save(a.rsg.files), pytest.raises(OSError) as e:
        a.t.rsg_detach("g", b.addr)
    assert e.value.errno == errno.ENOSPC
    assert link.attached and saved_link(a)["attached"], link.status()
    a.t.lus["v1"].write(b"\x02" * 4096, 4096)
    converge(a, b)                  # it still replicates
    a.t.rsg_detach("g", b.addr)
    with failing_save(a.rsg.files), pytest.raises(OSError):
        a.t.rsg_attach("g", b.addr)
    assert not link.attached and not saved_link(a)["attached"]
    assert link.state == R.DETACHED, link.status()
    a.t.rsg_attach("g", b.addr)
    a.t.lus["v1"].write(b"\x03" * 4096, 8192)
    converge(a, b)
    assert b.read_base(0)[:12288] == b"\x01" * 4096 + b"\x02" * 4096 + \
        b"\x03" * 4096


def test_release_with_full_disk_keeps_the_image(two_nodes):
    """Releasing a protected image (unmarking its session) whose record
    cannot be saved (ENOSPC) fails and keeps the image: before, memory said
    unmarked while state.json said marked, so later writes were not saved
    first and the image reloaded after a restart showed them."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * 65536, 0)
    a.t.image_protect("v1")
    with failing_save(a.t.state_dir), pytest.raises(OSError):
        a.t.image_release("v1")
    session = a.t.sessions[IMAGE]
    assert session.marked
    lu.write(b"\x02" * 65536, 0)
    a.close()
    a.start()
    buf = bytearray(65536)
    a.t.sessions[IMAGE].read_frozen(buf, 0)
    assert bytes(buf) == b"\x01" * 65536


def test_restore_sends_nothing_before_the_links_replay(two_nodes,
                                                       monkeypatch):
    """A protected restore of a replicated volume: its links begin a
    replay of its regions before the restore changes anything in the
    volume.  (Before, the engine was started first: its first copies were
    streamed as ordinary updates, and the secondary said it was
    consistent at an image half restored, which the primary's hosts never
    saw.)"""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    g = CLONE_GRAN
    lu.write(b"\x01" * SIZES[0], 0)
    a.t.clone_add("v1", "a1", granularity="64K")
    a.t.clone_sync("a1")
    wait_for(lambda: a.t.clone_status("a1")["state"] == "synchronized")
    a.t.clone_fracture("a1")
    lu.write(b"\x02" * g, 0)           # the restore copies two runs
    lu.write(b"\x02" * g, 8 * g)
    converge(a, b)
    before = b.read_base(0)
    group = a.t.groups["v1"]
    second_run = threading.Event()

    def hook(engine, s, e):
        if s >= 8:
            second_run.wait(5)
    group.copy_hook = hook
    seen = []
    orig = R.PrimaryGroup.begin_volume_change

    def slow(self, *args):
        time.sleep(0.5)     # time for a running engine and the link
        sg = b.rsg
        with sg.lock:
            if sg.consistent:
                seen.append(b.read_base(0))
        second_run.set()
        return orig(self, *args)
    monkeypatch.setattr(R.PrimaryGroup, "begin_volume_change", slow)
    a.t.clone_restore("a1")
    assert seen, "the secondary was not consistent"
    assert seen[0] == before, "the secondary, consistent, holds a half " \
        "restored image: " + first_diff([before], seen)
    wait_for(lambda: a.t.clone_status("a1")["state"] == "fractured")
    converge(a, b)
    assert b.read_base(0) == b"\x01" * SIZES[0]


def test_close_refuses_a_primary_met_for_the_first_time(two_nodes):
    """A primary's first hello that is being accepted while the secondary
    closes makes no group there: before, the group was made after the
    close had shut the others down, its session went on serving (writing
    into the closed target) and the close waited for it in vain."""
    a, b = two_nodes
    converge(a, b)
    a.t.rsg_unlink("g", b.addr)
    a.t.rsg_delete("g")
    wait_for(lambda: b.rsg.connected_since is None)
    b.t.rsg_delete("g")
    srv = b.t.rsg_ops.replica_server
    entered, go = threading.Event(), threading.Event()
    orig = srv.accept

    def slow_accept(hello, peer):
        entered.set()
        go.wait(10)
        return orig(hello, peer)
    srv.accept = slow_accept
    a.t.rsg_create("g", VOLS, "1M", granularity="4K")
    a.t.rsg_link("g", b.addr, "async", a.tok)
    assert entered.wait(10)
    t = b.t
    closer = threading.Thread(target=t.close)
    t0 = time.monotonic()
    closer.start()
    time.sleep(0.3)             # the close has begun
    go.set()
    closer.join(30)
    took = time.monotonic() - t0
    b.t = None
    b.wake_accept()
    alive = [th for th in srv.connections if th.is_alive()]
    assert not alive and took < 5, (took, alive)
    assert "g" not in t.rsgs


def test_discard_choice_survives_a_reconnect(two_nodes, monkeypatch):
    """`attach --discard-secondary-changes` holds until the secondary has
    taken this side's history: a connection lost before the replay began
    (here: the old primary restarts while the replay's start is held)
    does not bring the split brain back.
    (Before, the choice was used up at the first handshake, and the next
    one stopped the link as diverged again.)"""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 65536, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    a.t.lus["v1"].write(b"\x02" * 65536, 65536)   # b never gets it
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.rsg_demote("g")
    b.t.rsg_promote("g")
    b.t.clone_add("v1", "b1", granularity="64K")
    b.t.clone_sync("b1")
    wait_for(lambda: b.t.clone_status("b1")["state"] == "synchronized")
    b.t.clone_fracture("b1")
    b.t.lus["v1"].write(b"\x03" * 65536, 0)
    with engines_held():
        b.t.clone_restore("b1")
    engine = b.t.groups["v1"].engine
    held, go = threading.Event(), threading.Event()
    send_json = R.link.send_json

    def rbeg_held(sock, kind, obj):
        if kind == b"RBEG" and not go.is_set():
            held.set()
            go.wait(10)
            raise ConnectionError("lost before the replay began")
        return send_json(sock, kind, obj)
    monkeypatch.setattr(R.link, "send_json", rbeg_held)
    b.t.rsg_link("g", a.addr, "async", a.tok)
    b.t.rsg_attach("g", a.addr, discard_secondary_changes=True)
    link = b.rsg.links[0]
    wait_for(held.is_set, 10, "the replay to begin", link.status)
    a.close()                               # the connection is lost
    a.start()
    go.set()
    engine.start()
    wait_for(lambda: b.t.clone_status("b1")["state"] == "fractured")
    wait_for(lambda: link.state in (R.REPLICATING, R.DIVERGED) and
             a.rsg.consistent and a.rsg.applied_seq == b.rsg.next_seq - 1,
             20, "the replay", link.status)
    assert link.state == R.REPLICATING, link.status()
    assert a.read_base(0) == b.read_top(0)
    # The clone's data, without the old primary's discarded write.
    assert a.read_base(0)[:131072] == b"\x01" * 65536 + bytes(65536)


def test_a_replay_broken_off_after_a_role_switch_is_no_split_brain(
        two_nodes, monkeypatch):
    """A node demoted with updates the new primary never had (numbered past
    the branch point: here a jump after a kill) takes the new primary's
    line when its replay begins; that replay broken off, the next
    connection resumes it.  (Before, the node kept its old line's last
    update number beside the new line's history, so it looked ahead of
    the primary on the primary's own line: a split brain, and the link
    waited for the admin.)"""
    a, b = two_nodes
    write_and_detach(a, b)
    a.t.lus["v1"].write(b"\x02" * 4096, 4096)     # b never gets it
    a.kill()
    a.start()
    a.t.lus["v1"].write(b"\x03" * 4096, 8192)     # nor this
    assert a.rsg.next_seq > b.rsg.applied_seq + 2, a.rsg.status()
    a.t.rsg_demote("g")
    b.t.rsg_promote("g")
    b.t.lus["v1"].write(b"\x04" * 4096, 12288)
    b.t.rsg_link("g", a.addr, "async", a.tok)
    b.t.rsg_detach("g", a.addr)
    replay_broken_off(b, a, monkeypatch, discard_secondary_changes=True)
    assert a.rsg.history == b.rsg.history, a.rsg.status()
    b.t.rsg_attach("g", a.addr)
    link = b.rsg.links[0]
    wait_for(lambda: link.state in (R.REPLICATING, R.DIVERGED) and
             a.rsg.consistent, 20, "the replay", link.status)
    assert link.state == R.REPLICATING, link.status()
    converge(b, a)
    assert a.read_base(0) == b.read_top(0), first_diff(
        [b.read_top(0)], [a.read_base(0)])


def test_a_forced_promotion_in_a_broken_off_replay_keeps_a_valid_history(
        two_nodes, monkeypatch):
    """A node whose replay was broken off holds the primary's line but
    updates of it from far behind that line's last generation; promoted
    with --force, its new generation starts after that generation's
    first update, so its history still rises and its secondaries can
    read it.  (Before, the generation started after the node's own last
    update: a history going down, which every secondary refused, and the
    link failed for ever.)"""
    a, b = two_nodes
    write_and_detach(a, b)
    for i in range(8):
        a.t.lus["v1"].write(b"\x02" * 4096, 4096 * (i + 1))  # b misses
    a.t.rsg_demote("g")
    a.t.rsg_promote("g")            # a generation from a's last on
    replay_broken_off(a, b, monkeypatch, start=lambda: a.t.rsg_link(
        "g", b.addr, "async", a.tok))
    assert b.rsg.history == a.rsg.history and not b.rsg.consistent
    b.t.rsg_promote("g", force=True)
    history = b.rsg.history
    assert R.records.peer_history(history) == history
    assert b.rsg.next_seq >= history[-1][1], b.rsg.status()
    a.t.rsg_demote("g")
    b.t.rsg_link("g", a.addr, "async", a.tok)
    link = b.rsg.links[0]
    wait_for(lambda: link.state in (R.REPLICATING, R.DIVERGED), 20,
             "the link's decision", link.status)


def test_replay_protects_every_volume_at_one_point(two_nodes, monkeypatch):
    """The image a secondary protects before a replay, which `lu rollback`
    puts back after a broken replay, must be its last consistent image:
    every volume at the same point."""
    a, b = two_nodes
    break_a_replay(a, b, monkeypatch)       # v1 protected by an admin before
    frozen = CompositionMachine.frozen_images(b)
    assert [f[:4096] for f in frozen] == [b"\x02" * 4096] * 2
    # The image protected before, of its own point, is there still.
    buf = bytearray(SIZES[0])
    b.t.sessions[IMAGE].read_frozen(buf, 0)
    assert buf[:4096] == b"\x01" * 4096


def test_replay_keeps_an_image_someone_else_protected(two_nodes):
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 4096, 0)
    converge(a, b)
    b.t.image_protect("v1")                 # an admin's or a peer's
    a.t.rsg_detach("g", b.addr)
    a.t.lus["v1"].write(b"\x02" * 4096, 0)
    a.t.rsg_attach("g", b.addr)             # a replay runs and completes
    converge(a, b)
    assert b.t.image_status("v1")["protected"]
    buf = bytearray(SIZES[0])
    b.t.sessions[IMAGE].read_frozen(buf, 0)
    assert buf[:4096] == b"\x01" * 4096


def _trace_rules(machine_class, path):
    """COMPOSITION_MODEL_TRACE=FILE: every rule run is written to FILE (the
    last case's steps survive a failure hypothesis cannot replay, as
    timing-dependent ones are)."""
    import functools
    from hypothesis.stateful import INITIALIZE_RULE_MARKER, RULE_MARKER
    for name in dir(machine_class):
        f = getattr(machine_class, name)
        for marker in (RULE_MARKER, INITIALIZE_RULE_MARKER):
            r = getattr(f, marker, None)
            if r is None:
                continue
            inner = r.function

            def traced(self, _inner=inner, _name=name, _first=(
                    marker == INITIALIZE_RULE_MARKER), **kw):
                with open(path, "a") as out:
                    if _first:
                        out.write("----\n")
                    out.write("{}({})\n".format(_name, ", ".join(
                        "{}={!r}".format(k, v) for k, v in sorted(kw.items()))))
                return _inner(self, **kw)
            r.function = functools.wraps(inner)(traced)


if os.environ.get("COMPOSITION_MODEL_TRACE"):
    _trace_rules(CompositionMachine, os.environ["COMPOSITION_MODEL_TRACE"])


def test_promoted_node_sends_what_only_it_had(two_nodes):
    """A node promoted while it holds changes the other node never got
    (its own unacknowledged writes from when it was primary, or a restore
    done while detached) sends those regions at the first contact, not
    only what it wrote since the promotion.  (Before, A demoted, B promoted,
    B demoted again before A's replay began, A promoted again: B was told
    nothing of A's last write, and said it was consistent with A while it
    lacked it.)"""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 65536, 0)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    a.t.lus["v1"].write(b"\x02" * 4096, 8192)      # b never gets it
    wait_for(lambda: b.rsg.connected_since is None)
    a.t.rsg_demote("g")
    b.t.rsg_promote("g")
    b.t.rsg_demote("g")                              # back, at once
    a.t.rsg_promote("g")
    a.t.rsg_link("g", b.addr, "async", a.tok)
    converge(a, b)
    assert b.read_base(0) == a.read_top(0), first_diff(
        [a.read_top(0)], [b.read_base(0)])


def test_restore_on_secondary_and_a_connecting_primary(two_nodes,
                                                       monkeypatch):
    """A restore on a detached secondary and a primary connecting at that
    moment: one of them is refused.  (Before, the primary's handshake
    could pass between the restore's check and its start: the restore then
    changed the volume under a replicating primary, which never learnt of
    it, and the secondary said it was consistent with other data.)"""
    a, b = two_nodes
    a.t.lus["v1"].write(b"\x01" * 65536, 0)
    converge(a, b)
    b.t.clone_add("v1", "b1", granularity="64K")
    b.t.clone_sync("b1")
    wait_for(lambda: b.t.clone_status("b1")["state"] == "synchronized")
    b.t.clone_fracture("b1")
    b.t.groups["v1"].clones["b1"].export.write(b"\x09" * 4096, 8192)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    orig = clones.CloneGroup.start_restore

    def start_restore(self, *args, **kw):
        a.t.rsg_attach("g", b.addr)     # the primary comes back now
        time.sleep(1.0)
        return orig(self, *args, **kw)
    monkeypatch.setattr(clones.CloneGroup, "start_restore", start_restore)
    try:
        b.t.clone_restore("b1")
    except R.RsgBusy:
        pass                            # refused: fine as well
    monkeypatch.undo()
    wait_for(lambda: b.t.clone_status("b1")["state"] == "fractured")
    a.t.lus["v2"].write(b"\x02" * 4096, 0)
    converge(a, b)
    assert b.read_base(0) == a.read_top(0), first_diff(
        [a.read_top(0)], [b.read_base(0)])


def test_demoted_node_reports_what_it_changed_before_a_link_did(two_nodes):
    """A node demoted right after its promotion, before any link took its
    changes (here a restore it did while detached, carried into the
    promotion), reports those regions as diverged, so the next primary
    copies them.  (Before, a demote reported only what its links' DCMs
    held: with no link, nothing; the other node said it was consistent and
    kept the restored data.)"""
    a, b = two_nodes
    converge(a, b)                          # b's first replay has ended
    b.t.clone_add("v1", "b1", granularity="64K")
    b.t.clone_sync("b1")
    wait_for(lambda: b.t.clone_status("b1")["state"] == "synchronized")
    b.t.clone_fracture("b1")                # zeroes
    a.t.lus["v1"].write(b"\x01" * 65536, 65536)
    converge(a, b)
    a.t.rsg_detach("g", b.addr)
    wait_for(lambda: b.rsg.connected_since is None)
    b.t.clone_restore("b1")                 # b's v1 is zeroes again
    wait_for(lambda: b.t.clone_status("b1")["state"] == "fractured")
    a.t.rsg_demote("g")
    b.t.rsg_promote("g")
    b.t.rsg_demote("g")                     # at once: no link yet
    a.t.rsg_promote("g")
    a.t.rsg_link("g", b.addr, "async", a.tok)
    converge(a, b)
    assert b.read_base(0) == a.read_top(0), first_diff(
        [a.read_top(0)], [b.read_base(0)])


def test_demote_makes_what_it_reports_durable(two_nodes):
    """A demoted node says it holds every change up to its last: that must
    survive a kill -9 like any flushed state.  A host write into a Source
    being restored, not flushed yet, lived only in the restore's memory
    (the extent no longer to be copied); the demotion did not flush, and
    the restore resumed after a kill copied the clone's data over the
    write the node reported as applied (a secondary consistent at a state
    that never was)."""
    a, b = two_nodes
    lu = a.t.lus["v1"]
    lu.write(b"\x01" * SIZES[0], 0)
    a.t.clone_add("v1", "a1", granularity="64K")
    a.t.clone_sync("a1")
    wait_for(lambda: a.t.clone_status("a1")["state"] == "synchronized")
    a.t.clone_fracture("a1")
    lu.write(b"\x02" * SIZES[0], 0)
    with engines_held():
        a.t.clone_restore("a1")
    at = 5 * CLONE_GRAN
    lu.write(b"\x03" * 4096, at)        # not flushed, not yet restored
    a.t.rsg_detach("g", b.addr)
    a.t.rsg_demote("g")
    a.kill()
    a.start()
    wait_for(lambda: a.t.clone_status("a1")["state"] == "fractured", 20,
             "the resumed restore")
    data = a.read_base(0)
    assert data[at:at + 4096] == b"\x03" * 4096, \
        "the demoted node lost a change it reported applied"
    assert data[:at] == b"\x01" * at
