"""A byte-level model of a replicated group's change sequence, for model
tests of replication (no test module imports another; they share this).

The model is the ordered list of the changes of one line of history, each
an `Op` with the sequence number the primary gave it.  Besides host writes,
zeroes and trims there is SET: a region replaced at once (a protected
restore shows the clone's data from its start on).  A SET gets a number
between two of the primary's (n - 0.5): the engine's own writes that carry
it out are numbered after it and carry data hosts already read (the links
replay the operation's regions as hosts read them; a secondary is
consistent again only after such a pass, and during a reverse sync only
once it has ended).
A restore made on a secondary before its promotion is a SET numbered like
the last change it had: the new primary's state at that number includes it.

A secondary that says it is consistent at applied_seq must hold exactly the
state after some prefix of the line whose last number is >= applied_seq
(`check_sample`); at a quiet point, exactly the state after the changes
numbered up to applied_seq (`check_exact`).
"""

import time

from target import replication as R

SET = "set"
KINDS = {R.WRITE: "write", R.ZERO: "zero", R.TRIM: "trim", SET: "set"}


class Op:
    __slots__ = ("seq", "vol", "kind", "off", "length", "data")

    def __init__(self, seq, vol, kind, off, length, data=None):
        self.seq, self.vol, self.kind = seq, vol, kind
        self.off, self.length, self.data = off, length, data

    def apply(self, imgs):
        img = imgs[self.vol]
        if self.kind in (R.WRITE, SET):
            img[self.off:self.off + self.length] = self.data
        else:                       # zero, and trim (punch hole: zeroes)
            img[self.off:self.off + self.length] = bytes(self.length)

    def __repr__(self):
        return "Op(seq={}, vol {}, {}, off={}, len={})".format(
            self.seq, self.vol, KINDS[self.kind], self.off, self.length)


def blank(sizes):
    return [bytearray(n) for n in sizes]


def state_after(ops, sizes):
    imgs = blank(sizes)
    for op in ops:
        op.apply(imgs)
    return imgs


def first_diff(a, b, names=None):
    for vol in range(len(a)):
        if a[vol] != b[vol]:
            x, y = a[vol], b[vol]
            i = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
            return "{} differs first at byte {} (extent of 4K {})".format(
                names[vol] if names else "volume %d" % vol, i, i // 4096)
    return None


def matching_prefixes(ops, imgs, min_seq, sizes, only=None):
    """Indices k such that imgs == state after ops[:k] and ops[:k] holds
    every change numbered min_seq or less (only: the volumes compared)."""
    only = range(len(sizes)) if only is None else only
    need = sum(1 for op in ops if op.seq <= min_seq)
    model = blank(sizes)
    found = []

    def same():
        return all(model[v] == imgs[v] for v in only)
    if need == 0 and same():
        found.append(0)
    for k, op in enumerate(ops):
        op.apply(model)
        if k + 1 >= need and same():
            found.append(k + 1)
    return found


def check_sample(ops, applied, imgs, sizes, what="secondary", only=None):
    """A consistent secondary, possibly behind: some prefix >= applied."""
    found = matching_prefixes(ops, imgs, applied, sizes, only)
    assert found, ("{} (consistent, applied_seq {}) is not the primary's "
                   "state after any prefix of changes ending at seq >= {} "
                   "({} changes in the model, {})".format(
                       what, applied, applied, len(ops),
                       first_diff(state_after(
                           [op for op in ops if op.seq <= applied], sizes),
                           imgs)))
    return found


def check_exact(ops, imgs, applied, sizes, what="secondary", names=None):
    """imgs == state after exactly the changes numbered up to applied."""
    # A SET may share the number of the change before it: a restore made
    # on a secondary before its promotion belongs to its state at that
    # number.
    assert all(a.seq < b.seq or (b.kind == SET and a.seq == b.seq)
               for a, b in zip(ops, ops[1:])), \
        "sequence numbers were reused: {}".format(
            [(a, b) for a, b in zip(ops, ops[1:]) if not (a.seq < b.seq or (b.kind == SET and a.seq == b.seq))][:3])
    model = state_after([op for op in ops if op.seq <= applied], sizes)
    diff = first_diff(model, imgs, names)
    assert diff is None, "{} at applied_seq {} is not the model's state " \
        "after changes 1..{}: {}".format(what, applied, applied, diff)




def wait_for(pred, timeout=20.0, what="condition", info=lambda: ""):
    end = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for {}: {}".format(
                what, info()))
        time.sleep(0.02)


def fast_timing():
    """Shorter retry and persist intervals (restore_timing puts them
    back), so that reconnects do not cost a second each."""
    saved = (R.link.RETRY_INTERVAL, R.link.PERSIST_INTERVAL)
    R.link.RETRY_INTERVAL = 0.05
    R.link.PERSIST_INTERVAL = 0.2
    return saved


def restore_timing(saved):
    R.link.RETRY_INTERVAL, R.link.PERSIST_INTERVAL = saved
