"""The target's event bus: every state change, in order, for `clonectl events`.

Events are kept in memory only (a bounded ring of the last MAX_EVENTS), each
with a sequence number, so a reader that long-polls since() with the last
number it saw gets every later event exactly once, in order; a reader that
fell more than MAX_EVENTS behind is told how many it lost.

Where events come from (the engines know nothing of this module):
- The Target wraps the callbacks through which engines report what they
  must make durable (a clone's state, a session's record) and emits from
  there: those changes are never missed, however short a state lasts.
- Everything else (operation progress, replication links and roles, LUs,
  recovery problems) is found by comparing status snapshots (Watcher),
  taken every WATCH_INTERVAL seconds and after each reported change.

An event: {"seq": N, "time": ISO 8601 UTC, "kind": "clone" | "operation" |
"session" | "transfer" | "link" | "rsg" | "lu" | "problem", "object": name,
"change": "new" | "changed" | "removed" | "state", and the fields that
changed with their new values}.  A "state" event describes an object as it
is (the snapshot printed by `clonectl events` before it follows).
"""

import collections
import threading
import time

from . import units

MAX_EVENTS = 4096
WATCH_INTERVAL = 1.0


class EventBus:

    def __init__(self, capacity=MAX_EVENTS):
        self.cond = threading.Condition()
        self.ring = collections.deque(maxlen=capacity)
        self.seq = 0

    def emit(self, kind, obj, change="changed", **fields):
        with self.cond:
            self.seq += 1
            event = {"seq": self.seq, "time": units.iso_time(time.time()),
                     "kind": kind, "object": obj, "change": change}
            event.update(fields)
            self.ring.append(event)
            self.cond.notify_all()
            return event

    def since(self, seq, timeout=0.0):
        """Events after seq (waiting up to timeout seconds for one):
        {"seq": last number, "events": [...], "lost": how many of those
        after seq are no longer kept}."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self.cond:
            while self.seq <= seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            oldest = self.ring[0]["seq"] if self.ring else self.seq + 1
            events = [e for e in self.ring if e["seq"] > seq]
            return {"seq": self.seq, "events": events,
                    "lost": max(0, min(oldest, self.seq + 1) - seq - 1)}


def _flat(st, keys):
    return {k: st.get(k) for k in keys}


# What the Watcher compares, per kind: the key of each object and the
# fields whose changes are events.  Clone states and session records are
# emitted by the Target's callbacks, not here.
CLONE_FIELDS = ("broken",)
OPERATION_FIELDS = ("operation", "running", "bytes_copied", "rate")
SESSION_FIELDS = ("frozen_export",)
TRANSFER_FIELDS = ("transferring", "bytes_sent", "result")
LINK_FIELDS = ("state", "mode", "error", "dcm_logging")
RSG_FIELDS = ("role", "generation", "consistent", "connected", "primary")
LU_FIELDS = ("size", "readonly", "exported", "error")


def objects(status):
    """{(kind, name): fields} of a target status snapshot."""
    out = {}
    for lu in status.get("lus", []):
        out[("lu", lu["name"])] = _flat(lu, LU_FIELDS)
    for c in status.get("clones", []):
        out[("clone", c["name"])] = dict(_flat(c, CLONE_FIELDS),
                                         state=c["state"], error=c["error"],
                                         source=c["source"])
        op = c.get("operation")
        if op:
            out[("operation", c["name"])] = _flat(op, OPERATION_FIELDS)
    for s in status.get("sessions", []):
        out[("session", s["name"])] = dict(
            _flat(s, SESSION_FIELDS), source=s["source"], marked=s["marked"],
            error=s.get("error"))
        tr = s.get("transfer") or {}
        last = s.get("last_transfer") or {}
        if s.get("transferring") or last:
            out[("transfer", s["name"])] = {
                "transferring": bool(s.get("transferring")),
                "bytes_sent": tr.get("bytes_sent", last.get("bytes_sent")),
                "result": None if s.get("transferring") else
                last.get("result")}
    for r in status.get("rsgs", []):
        out[("rsg", r["name"])] = _flat(r, RSG_FIELDS)
        for link in r.get("links") or []:
            out[("link", "{}->{}".format(r["name"], link["secondary"]))] = \
                _flat(link, LINK_FIELDS)
    for i, p in enumerate(status.get("recovery_problems", [])):
        who = "/".join(str(p[k]) for k in ("lu", "source", "clone",
                                           "session", "rsg")
                       if p.get(k)) or str(i)
        out[("problem", who)] = {"message": p.get("message")}
    return out


# Fields reported by the Target's callbacks (emitted there, at once).
_CALLBACK_FIELDS = {"clone": {"state", "error"},
                    "session": {"marked", "error"}}
# Fields whose changes alone are progress, not worth an event more often
# than each snapshot anyway (they are in every "changed" event).
_PROGRESS = {"bytes_copied", "rate", "bytes_sent"}


def state_events(status):
    """The current state as events (without sequence numbers)."""
    now = units.iso_time(time.time())
    return [dict({"time": now, "kind": kind, "object": name,
                  "change": "state"}, **fields)
            for (kind, name), fields in sorted(objects(status).items())]


class Watcher:
    """Emits the differences between successive status snapshots.

    note() is how the Target's callbacks report a change at once: it is
    emitted, and remembered so that the next snapshot does not report it
    again.  Snapshots are taken without holding the watcher's lock (the
    callbacks run under engine locks that a snapshot takes too).
    """

    def __init__(self, bus, status):
        self.bus = bus
        self.status = status        # callable -> a Target.status() snapshot
        self.last = None
        self.lock = threading.Lock()
        self.notes = 0              # note() calls so far
        self.noted_at = {}          # key -> self.notes when last noted
        # Objects first seen in a note: the next snapshot fills in their
        # other fields without an event.
        self.partial = set()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.thread = None

    def note(self, kind, name, fields):
        with self.lock:
            self.notes += 1
            key = (kind, name)
            self.noted_at[key] = self.notes
            old = None if self.last is None else self.last.get(key)
            if old is None:
                self.bus.emit(kind, name, "new", **fields)
                if self.last is not None:
                    self.last[key] = dict(fields)
                    self.partial.add(key)
            else:
                self.bus.emit(kind, name, **fields)
                old.update(fields)
        self.wake.set()

    def check(self):
        with self.lock:
            taken_at = self.notes
        now = objects(self.status())
        with self.lock:
            if self.last is None:
                self.last = now
                return
            for key in sorted(set(self.last) | set(now)):
                kind, name = key
                if self.noted_at.get(key, 0) > taken_at:
                    # Noted after this snapshot was taken: it is older
                    # than what the note said.
                    if key in now and key in self.last:
                        now[key] = dict(self.last[key])
                    elif key in self.last:
                        now[key] = self.last[key]
                    continue
                old, new = self.last.get(key), now.get(key)
                if key in self.partial:
                    self.partial.discard(key)
                    if new is not None:
                        continue
                if old == new:
                    continue
                if old is None:
                    self.bus.emit(kind, name, "new", **new)
                elif new is None:
                    self.bus.emit(kind, name, "removed")
                else:
                    skip = _CALLBACK_FIELDS.get(kind, set())
                    changed = {k: v for k, v in new.items()
                               if old.get(k) != v and k not in skip}
                    if changed:
                        self.bus.emit(kind, name, **changed)
            self.last = now
            self.noted_at = {k: n for k, n in self.noted_at.items()
                             if n > taken_at}

    def poke(self):
        """Look again soon (a command may have changed something)."""
        self.wake.set()

    def start(self, interval=WATCH_INTERVAL):
        self.check()

        def run():
            while not self.stopped.is_set():
                self.wake.wait(interval)
                self.wake.clear()
                if self.stopped.is_set():
                    return
                try:
                    self.check()
                except Exception:   # a snapshot failed: try again later
                    pass
        self.thread = threading.Thread(target=run, name="events",
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.stopped.set()
        self.wake.set()
