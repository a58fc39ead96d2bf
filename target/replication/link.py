"""One link of a primary group: the thread that feeds one secondary.

Owns the link's state (one value, changed only through the transition
table below), the connection and handshake, streaming the SRL in batches,
the DCM replay pass and sync-mode waits.  What the link holds (the SRL
from its acknowledged position, its DCM, or both while a replay runs) is
part of its state; the group (primary.py) changes it under the group lock.
See the design notes in target/replication/__init__.py and
docs/replication.md.
"""

import collections
import errno
import itertools
import json
import logging
import socket
import struct
import threading
import time
import zlib

from .. import changemap, channel, copier, errors
from .layer import runs_without
from .records import read_token
from .srl import SrlCorrupt
from .verify import LinkVerify, digests
from .wire import (DATA, ENTRY, SEQ, WRITE, ZERO, Reader, entry_crc,
                   recv_frame, send_frame, send_frames, send_json,
                   shutdown_socket)

log = logging.getLogger("clonectl.replication")

BATCH_BYTES = 4 << 20          # a batch is closed after this much data
CONNECT_TIMEOUT = 5.0
RETRY_INTERVAL = 1.0
PERSIST_INTERVAL = 1.0
# How often a take of a secondary's changes records what it took (a flush
# of the volumes written and a record each time).
TAKE_RECORD_INTERVAL = 1.0
# A sync link's batches are acknowledged once applied (CAPL), and made
# durable on the secondary by a CMIT at the next host flush, or after
# this many batches or bytes, or PERSIST_INTERVAL (module notes).
VOLATILE_BATCHES = 4096
VOLATILE_BYTES = 8 << 20
REPLAY_CHUNK = 1 << 20
# A replay asks the secondary to make what it sent durable (RSYN) after
# this much data or changemap.COMMIT_INTERVAL, and clears what the
# secondary acknowledges (RSAK) from the DCM, durably: a replay broken off
# resumes from there.  At most REPLAY_SYNCS_AHEAD requests are unanswered.
# Each costs the secondary a flush of its volumes and a record save (with
# its directory synced), one after another, and the primary a record save
# and a DCM write: requests a few MiB apart pace an unthrottled replay.
REPLAY_SYNC_BYTES = 16 << 20
REPLAY_SYNCS_AHEAD = 2
# A throttled replay (--rate) sends chunks of what the rate allows in
# REPLAY_BEAT (at least REPLAY_MIN_CHUNK); while it waits for the rate it
# sends the SRL's new entries every REPLAY_IDLE and a BEAT when nothing
# went for REPLAY_BEAT, well within the secondary's idle timeout.
REPLAY_BEAT = 0.25
REPLAY_MIN_CHUNK = 4 << 10
REPLAY_IDLE = 0.05
SRL_RETRY = 5.0                # a failed SRL is tried again after this
MAX_REPLY = 64 << 10           # a frame of the secondary before its proof

MODES = ("sync", "async")

# A link's state is a pair (status, holds).
#
# The status is what `rsg status` shows as the link's state: what the
# link is doing.
CONNECTING = "connecting"
REPLICATING = "replicating"     # streaming the SRL
DCM_LOGGING = "dcm-logging"     # connected, a DCM replay is due
DCM_REPLAY = "dcm-replay"       # a DCM replay pass runs
FAILED = "failed"
DIVERGED = "diverged"           # split brain: nothing is sent
DETACHED = "detached"           # the admin detached it
STATUSES = (CONNECTING, REPLICATING, DCM_LOGGING, DCM_REPLAY, FAILED,
            DIVERGED, DETACHED)

# What the link holds: this is what the group's record keeps (dcm_active,
# holds_srl) and what decides where a change goes.
SRL = "srl"             # the SRL from acked_pos; the DCM is clear
DCM = "dcm"             # changes are marked in the DCM, not streamed
SRL_DCM = "srl+dcm"     # a replay joined the SRL stream at its head; the
                        # DCM is static and cleared when the replay completes
HOLDS = (SRL, DCM, SRL_DCM)


def _rules():
    """(state, event) -> next state, from one line per rule: event, the
    statuses and holds it applies to, and the status and holds it leads to
    (None: unchanged).  The link thread's own steps (stream, await-replay,
    replay, replayed) also apply to a status another thread set meanwhile
    (CONNECTING by attach, FAILED by the lost connection's reader): the
    thread sees that at its next check and reconnects."""
    attached = tuple(s for s in STATUSES if s != DETACHED)
    srl = (SRL, SRL_DCM)
    rules = [
        # The link stops holding the SRL (overflow, failing SRL, sync
        # timeout, lost updates, a volume change, detach, demote): what it
        # has not acknowledged goes into its DCM, and so does every change.
        ("log", (REPLICATING, DCM_REPLAY), srl, DCM_LOGGING, DCM),
        ("log", (CONNECTING, FAILED, DIVERGED, DETACHED), srl, None, DCM),
        # Connected, holding the SRL with a clear DCM: stream it (a
        # replay that broke off replays again: the handshake logs).
        ("stream", (CONNECTING, FAILED, DIVERGED, REPLICATING), (SRL,),
         REPLICATING, None),
        # Connected, logging: a replay is due (it may wait for a failed
        # SRL to work again).
        ("await-replay", attached, (DCM,), DCM_LOGGING, None),
        # A volume change while the link streams: a replay of its regions
        # begins at the stream's position, which the link keeps.
        ("extend", (REPLICATING,), (SRL,), DCM_REPLAY, SRL_DCM),
        # The replay joins the SRL stream at its head and copies the DCM;
        # once the secondary has confirmed it, the DCM is clear.
        ("replay", attached, (DCM,), DCM_REPLAY, SRL_DCM),
        ("replayed", attached, (SRL_DCM,), REPLICATING, SRL),
        # A lost connection or an error: what the link holds is kept.
        ("fail", attached, HOLDS, FAILED, None),
        ("diverge", attached, HOLDS, DIVERGED, None),
        ("detach", STATUSES, HOLDS, DETACHED, None),
        ("attach", STATUSES, HOLDS, CONNECTING, None),
    ]
    table = {}
    for event, statuses, holds, to_status, to_holds in rules:
        for status in statuses:
            for h in holds:
                table[((status, h), event)] = (to_status or status,
                                               to_holds or h)
    return table


# Where a link starts: from its record (attached or not, what it held).
INITIAL = tuple((s, h) for s in (CONNECTING, DETACHED) for h in HOLDS)
# Every state a link can be in: those the table reaches from INITIAL (a
# unit test checks it).  DCM_LOGGING goes with DCM, DCM_REPLAY with SRL_DCM
# and REPLICATING with SRL.
STATES = (
    (CONNECTING, SRL), (CONNECTING, DCM), (CONNECTING, SRL_DCM),
    (REPLICATING, SRL),
    (DCM_LOGGING, DCM), (DCM_REPLAY, SRL_DCM),
    (FAILED, SRL), (FAILED, DCM), (FAILED, SRL_DCM),
    (DIVERGED, SRL), (DIVERGED, DCM), (DIVERGED, SRL_DCM),
    (DETACHED, SRL), (DETACHED, DCM), (DETACHED, SRL_DCM),
)
TRANSITIONS = {k: v for k, v in _rules().items() if k[0] in STATES}


class RemoteRefused(errors.Error):
    msg = "secondary {peer}: {reason}"
    errno = errno.EPROTO


def authenticate(sock, token, secondary):
    """Prove the token to the secondary on sock and have it prove the
    token (channel.ClientAuth): the token never crosses the wire, and a
    node that cannot prove it gets no hello and no data.  RemoteRefused
    with the reason otherwise."""
    auth = channel.ClientAuth(token, "replication")
    send_json(sock, b"AUTH", auth.start())
    kind, payload = recv_frame(sock, MAX_REPLY)
    if kind == b"CHAL":
        send_json(sock, b"PROF", auth.answer(json.loads(payload)))
        kind, payload = recv_frame(sock, MAX_REPLY)
        if kind == b"PROF":
            try:
                auth.check(json.loads(payload))
            except channel.AuthFailed as e:
                raise RemoteRefused(peer=secondary, reason=str(e))
            return
    reply = json.loads(payload) if kind == b"HRPL" else {}
    reason = reply.get("message") or "unexpected {} frame".format(
        kind.decode(errors="replace"))
    if "expected a hello" in reason:
        # What a secondary of protocol 1 answers to AUTH.
        reason += " (the secondary runs a clonectl older than replication " \
            "protocol {}: upgrade it)".format(channel.PROTOCOL)
    raise RemoteRefused(peer=secondary, reason=reason)


class _ReplayEnded(Exception):
    """A replay pass ends before its last run; result is what _replay
    returns."""

    def __init__(self, result):
        super().__init__(result)
        self.result = result


class VerifyRefused(errors.Error):
    msg = "cannot verify {name!r} against {peer}: {reason}"
    errno = errno.EBUSY


class InvalidLinkTransition(errors.Error):
    msg = ("link to {peer}: {event!r} is not a transition of state "
           "{status}/{holds}")
    errno = errno.EPROTO


class Link:
    """One secondary of a primary group, and the thread that feeds it."""

    def __init__(self, group, index, record):
        self.group = group
        self.index = index
        self.secondary = record["secondary"]
        self.mode = record["mode"]
        self.token_file = record["token_file"]
        # The secondary's TLS: a certificates directory (channel.
        # client_context), or None for a plain connection.
        self.tls_certificates = record.get("tls_certificates")
        self.discard_secondary = record.get("discard_secondary", False)
        # Bytes per second a DCM replay may send (None: no limit).
        self.replay_rate = record.get("replay_rate")
        # What the secondary acknowledged as durable (CMIT: ACKS); the
        # SRL keeps every entry after it.
        self.acked_seq = record.get("acked_seq", 0)
        self.acked_pos = record.get("acked_pos", 0)
        # What it acknowledged as applied, durable or not (CAPL: APLD).
        self.held_seq = self.acked_seq
        # The CAPL batches sent since the last CMIT (count, bytes, and
        # when the first went), the last CMIT's sequence number, and the
        # highest sequence number a host flush waits to be durable.
        self.volatile_batches = self.volatile_bytes = 0
        self.volatile_since = 0.0
        self.durable_sent = 0
        self.durable_wanted = 0
        self.secondary_applies = False  # it answers CAPL
        self.saved_pos = self.acked_pos
        self.seeded = record.get("seeded", False)
        # A take of the secondary's changes (split-brain policy
        # discard-zero-changes) began and has not completed.
        self.pulling = record.get("pulling", False)
        self.pull = None            # the regions to take at this connection
        # What that take has not taken yet, as far as recorded (None: not
        # known, a record older than the field; _take records what it
        # took about once a second, once the data is flushed).
        left = record.get("pull_left")
        self.pull_left = None if left is None else collections.deque(left)
        # While it is not over (PrimaryGroup._note_takes): the regions of
        # the take not recorded as taken, per volume, the parts of them
        # hosts changed (bytes, in this process), the extents they changed
        # (durable), and whether they changed one not taken before this
        # process began.
        self.take_regions = {}
        self.take_noted = None
        self.take_map = None
        self.take_changed_before = False
        self.split_brain = None     # what each side changed, while diverged
        self.error = record.get("error")
        self.stopped_error = record.get("stopped_error")
        self.dcm = None
        if not record.get("dcm_active", True):
            holds = SRL
        elif record.get("holds_srl", False):
            # A replay was running: the group marks what it streamed
            # unacknowledged in the DCM and logs (PrimaryGroup).
            holds = SRL_DCM
        else:
            holds = DCM
        # The one state of the link (module notes); changed by transition().
        self.phase = (CONNECTING if record.get("attached", True)
                      else DETACHED, holds)
        self.epoch = 0
        self.secondary_consistent = None
        self.secondary_applied = None
        self.replay_total = 0
        self.replay_done = 0
        self.replay_bytes = [0, 0]      # done, total of the replay's data
        self.replay_times = None        # (started, ended or None)
        self.replay_syncs = []          # (id, epoch, runs) not acknowledged
        # RSYN ids are (round << 32) + n: the round is counted durably at
        # each replay start, so ids only grow, across restarts too.
        self.replay_round = record.get("replay_round", 0)
        self.replay_sync_n = 0
        # The highest RSYN id whose regions were cleared from the DCM
        # (saved before they are cleared); 0 once a replay completed.
        self.replay_cleared = record.get("replay_cleared", 0)
        # The secondary's last consistent image the replays since it was
        # consistent write over ({id, base}, as its RBOK said; None: none
        # or unknown): the DCM with the regions written there since holds
        # every region where this node differs from that image.
        self.replay_image = record.get("replay_image")
        self.replay_cancel = threading.Event()
        # The running replay began in the SRL stream (a volume change):
        # the secondary had every acknowledged write and gets the new ones
        # in order, so sync writes keep waiting for it.
        self.kept_stream = False
        # Why the running or due replay copies its regions (a volume
        # change's), for status; None for a catch-up.
        self.replay_reason = None
        self.secondary_syncs = False    # it answers RSYN
        self.sent_bytes = 0
        self.replays = 0
        self.thread = None
        self.sock = None
        self.stopping = False
        self.batches = []       # (last seq, end pos) sent, not yet acked
        self.replay_acked = None
        self.refused = None
        self.stream_from = None
        self.last_sent_seq = 0
        # The link thread waits for acknowledgements (flow control).
        self.flow_waits = False
        # The running or last online verify (LinkVerify) and the answer to
        # its request in flight.
        self.verifying = None
        self.verify_answer = None
        self.secondary_verifies = False

    # State.

    @property
    def state(self):
        """The status, shown as the link's state."""
        return self.phase[0]

    @property
    def acknowledged(self):
        """The secondary has every update up to this one, applied (APLD)
        or durable (ACKS)."""
        return max(self.acked_seq, self.held_seq)

    @property
    def holds(self):
        return self.phase[1]

    @property
    def holds_srl(self):
        """The link streams the SRL from acked_pos and keeps its entries."""
        return self.phase[1] in (SRL, SRL_DCM)

    @property
    def logging(self):
        """Changes are marked in the DCM, not streamed."""
        return self.phase[1] == DCM

    @property
    def dcm_active(self):
        """The DCM holds changes the secondary may lack (cleared only when
        a replay completes)."""
        return self.phase[1] in (DCM, SRL_DCM)

    @property
    def attached(self):
        return self.phase[0] != DETACHED

    @property
    def sync_waits(self):
        """A host write (and flush) waits for this secondary's
        acknowledgement: a sync link that streams, or replays within the
        stream it never left."""
        return self.mode == "sync" and (
            self.state == REPLICATING or
            (self.state == DCM_REPLAY and self.kept_stream))

    def can(self, event):
        return (self.phase, event) in TRANSITIONS

    def transition(self, event):
        """Take the state the table gives for event; an event the table
        does not define for the current state is refused (a bug: it is
        logged, and the state is left as it was).  Called under the group
        lock, except while the group is being loaded."""
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            e = InvalidLinkTransition(peer=self.secondary, event=event,
                                      status=self.phase[0],
                                      holds=self.phase[1])
            log.error("group %s: %s", self.group.name, e)
            raise e
        self.phase = nxt

    def record(self):
        return {"secondary": self.secondary, "index": self.index,
                "mode": self.mode,
                "token_file": self.token_file,
                "tls_certificates": self.tls_certificates,
                "attached": self.attached,
                "discard_secondary": self.discard_secondary,
                "replay_rate": self.replay_rate,
                "replay_round": self.replay_round,
                "replay_cleared": self.replay_cleared,
                "replay_image": self.replay_image,
                "acked_seq": self.acked_seq, "acked_pos": self.acked_pos,
                "dcm_active": self.dcm_active, "seeded": self.seeded,
                "holds_srl": self.holds_srl, "pulling": self.pulling,
                "pull_left": None if self.pull_left is None
                else list(self.pull_left),
                "error": self.error, "stopped_error": self.stopped_error}

    # Thread.

    def start(self):
        if self.thread is not None and self.thread.is_alive():
            return
        self.stopping = False
        self.thread = threading.Thread(
            target=self.run, name="rsg-{}-{}".format(self.group.name,
                                                     self.secondary),
            daemon=True)
        self.thread.start()

    def stop(self, join=True):
        self.stopping = True
        self.replay_cancel.set()
        sock = self.sock
        if sock is not None:
            shutdown_socket(sock)
        with self.group.cond:
            self.group.cond.notify_all()
        if join and self.thread is not None and \
                self.thread is not threading.current_thread():
            self.thread.join(10)

    def run(self):
        while not self.stopping:
            if not self.attached or self.stopped_error:
                return
            try:
                self._connect_and_serve()
            except (OSError, ConnectionError, errors.Error, ValueError,
                    struct.error) as e:
                if self.stopping:
                    return
                self._failed(e)
            except Exception as e:
                # A value of the secondary's of a shape nothing here
                # expects (a reply malformed by a bug or by a node posing
                # as the secondary): said, and retried as any failure, not
                # the end of the link's thread (replication off for good).
                if self.stopping:
                    return
                failure = errors.ProtocolError(
                    reason="an answer of the secondary's could not be "
                    "used ({}: {})".format(e.__class__.__name__, e))
                if self.error != str(failure):
                    log.exception("group %s, link %s", self.group.name,
                                  self.secondary)
                self._failed(failure)
            finally:
                self._close_sock()
            deadline = time.monotonic() + (RETRY_INTERVAL if self.refused
                                           is None else 3 * RETRY_INTERVAL)
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)

    def _failed(self, e):
        msg = str(e) or e.__class__.__name__
        g = self.group
        with g.cond:
            if isinstance(e, SrlCorrupt):
                self.stopped_error = msg
            if not (self.state == DIVERGED and self.refused) and \
                    self.can("fail"):
                self.transition("fail")
            self.error = msg
            g.cond.notify_all()
        log.warning("group %s, link %s: %s", g.name, self.secondary, msg)
        try:
            g.persist()
        except (OSError, errors.Error) as e:
            # The record says less than memory (the next save says it);
            # the link retries all the same, not ending its thread.
            log.error("group %s: could not save its record: %s", g.name, e)

    def _close_sock(self):
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _connect_and_serve(self):
        g = self.group
        host, _, port = self.secondary.rpartition(":")
        token = read_token(self.token_file)
        tls = channel.client_context(self.tls_certificates,
                                     "--tls-certificates") \
            if self.tls_certificates else None
        sock = socket.create_connection((host, int(port)),
                                        timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = channel.connect_tls(sock, tls, host.strip("[]"))
        self.sock = sock
        if self.stopping:
            return
        try:
            authenticate(sock, token, self.secondary)
        except RemoteRefused as e:
            self.refused = e.kwargs["reason"]
            raise
        self.refused = None
        send_json(sock, b"HELO", g.hello())
        kind, payload = recv_frame(sock)
        reply = json.loads(payload)
        if kind != b"HRPL" or not reply.get("ok"):
            self.refused = reply.get("message", "refused")
            raise RemoteRefused(peer=self.secondary, reason=self.refused)
        self.refused = None
        self.secondary_consistent = reply.get("consistent")
        self.secondary_applied = reply.get("applied_seq")
        self.secondary_verifies = bool(reply.get("verify"))
        self.secondary_syncs = bool(reply.get("replay_sync"))
        self.secondary_applies = bool(reply.get("applied_acks"))
        sock.settimeout(None)
        if not g.accept_secondary(self, reply):
            return
        if self.pull is not None:
            self._take(sock)
        self.error = None
        reader = threading.Thread(target=self._read_acks, args=(sock,),
                                  daemon=True, name="rsg-acks")
        reader.start()
        try:
            while not self.stopping:
                # A replay is due once the link holds its DCM (it logs,
                # or a volume change began a replay in its stream).
                # Decided under the lock: an overflow between that look
                # and the state change would leave the link "replicating"
                # while it logs, never replaying.
                with g.cond:
                    replay = self.holds != SRL
                    if not replay:
                        self.transition("stream")
                        self.secondary_consistent = True
                        epoch = self.epoch
                if replay:
                    if not self._replay(sock):
                        return
                else:
                    g.persist()
                    if not self._stream(sock, epoch):
                        return
        finally:
            shutdown_socket(sock)
            reader.join(5)

    def _take(self, sock):
        """Take the secondary's changes (self.pull: [vol, offset, length])
        before the replay sends the union back (module notes)."""
        g = self.group
        runs, self.pull = self.pull, None

        saved, taken = time.monotonic(), []

        def record():
            # Taken for good once its data is durable, then said so in the
            # record: a crash after the record resumes past it; one before
            # takes it again (its host changes since are in the take map).
            for vol in sorted({vol for vol, _, _ in taken}):
                g.volumes[vol].stack.below("guard").flush()
            with g.cond:
                for vol, off, length in taken:
                    self.pull_left = _taken(self.pull_left, vol, off,
                                            length)
            g.persist()
            with g.cond:
                g.take_recorded(self, taken)
            taken.clear()
        with g.taking(self, runs):
            send_json(sock, b"PULL", {"runs": runs})
            while True:
                kind, payload = recv_frame(sock)
                if kind == b"PEND":
                    break
                if kind == b"FAIL":
                    raise RemoteRefused(peer=self.secondary,
                                        reason=json.loads(payload).get(
                                            "message", "failed"))
                if kind != b"RDAT":
                    raise errors.ProtocolError(
                        reason="unexpected {!r} while taking the "
                        "secondary's changes".format(bytes(kind)))
                vol, k, off, length, crc = DATA.unpack_from(payload)
                data = payload[DATA.size:]
                if k != WRITE or not 0 <= vol < len(g.sizes) or off < 0 \
                        or off + length > g.sizes[vol] or \
                        len(data) != length or zlib.crc32(data) != crc:
                    raise errors.ProtocolError(
                        reason="the secondary's data at {} of volume {} "
                        "fails its checks".format(off, vol))
                g.take_changes(vol, off, data)
                taken.append([vol, off, length])
                if time.monotonic() - saved >= TAKE_RECORD_INTERVAL:
                    record()
                    saved = time.monotonic()
            record()
        with g.cond:
            # Taken: this side's data wins from now on (until the secondary
            # has taken this side's history), whatever the next handshake
            # finds this node changed.
            self.pulling, self.pull_left = False, None
            self.discard_secondary = True
        g.persist()
        with g.cond:
            # Recorded as over: its notes and take map go.
            g.take_over(self)
        log.info("group %s: took %d region(s) changed on %s", g.name,
                 len(runs), self.secondary)

    def _read_acks(self, sock):
        g = self.group
        reader = Reader(sock)
        try:
            while True:
                kind, payload = recv_frame(reader)
                if kind == b"ACKS":
                    seq, = SEQ.unpack(payload)
                    with g.cond:
                        n = 0
                        while n < len(self.batches) and \
                                self.batches[n][0] <= seq:
                            n += 1
                        if n:
                            self.acked_seq, self.acked_pos = \
                                self.batches[n - 1]
                            del self.batches[:n]
                        g.cond.durable(self)
                elif kind == b"APLD":
                    seq, = SEQ.unpack(payload)
                    with g.cond:
                        # Never past what was sent (as ACKS, by batches):
                        # a sync write waits for its own update.
                        sent = self.batches[-1][0] if self.batches \
                            else self.acked_seq
                        self.held_seq = max(self.held_seq, min(seq, sent))
                        g.cond.acknowledged(self)
                elif kind == b"VANS":
                    with g.cond:
                        self.verify_answer = json.loads(payload)
                        g.cond.notify_all()
                elif kind == b"RSAK":
                    ident, = SEQ.unpack(payload)
                    with g.cond:
                        clear = self._replay_synced(ident)
                        g.cond.notify_all()
                    if clear is not None:
                        # What the secondary must report having made
                        # durable is saved before the DCM says it has it.
                        g.persist()
                        with g.cond:
                            self._clear_replayed(*clear)
                elif kind in (b"RBOK", b"RACK"):
                    with g.cond:
                        self.replay_acked = (kind, json.loads(payload))
                        g.cond.notify_all()
                elif kind == b"FAIL":
                    msg = json.loads(payload).get("message", "failed")
                    with g.cond:
                        self.error = "the secondary reports: " + msg
                        self.stopped_error = self.error
                        g.cond.notify_all()
                    break
        except (OSError, ConnectionError, ValueError, errors.Error,
                struct.error):
            pass
        finally:
            with g.cond:
                if self.state in (REPLICATING, DCM_REPLAY) and \
                        not self.stopping:
                    self.transition("fail")
                    self.error = self.error or "connection lost"
                # What it applied and had not made durable may be gone (a
                # crash there): from here on it holds what it made durable.
                self.held_seq = self.acked_seq
                g.cond.notify_all()
            shutdown_socket(sock)

    def _send_entries(self, sock, send_pos, until_pos, epoch,
                      volatile=False):
        """Send SRL entries [send_pos, until_pos) in batches (volatile:
        CAPL where no CMIT is due); return the position reached, or None
        if the link's epoch changed."""
        g = self.group
        parts, batch_bytes, last_seq = [], 0, None
        pos = send_pos
        while pos < until_pos:
            try:
                e, ok = g.srl.entry(pos)
            except OSError as err:
                with g.cond:
                    self._srl_unreadable(err, epoch)
                return None
            ok = ok or e is not None and \
                entry_crc(e[0], e[1], e[2], e[3], e[4], e[6]) == e[5]
            if not ok:
                with g.cond:
                    if self.epoch != epoch:
                        return None
                raise SrlCorrupt(name=g.name, seq=e[0] if e else "?",
                                 pos=pos, peer=self.secondary)
            seq, vol, kind, off, length, crc, data, nxt = e
            parts.append((b"ENTR", ENTRY.pack(seq, vol, kind, off, length,
                                              crc), data))
            batch_bytes += length if kind == WRITE else 0
            last_seq, pos = seq, nxt
            if batch_bytes >= BATCH_BYTES or len(parts) >= 4096:
                self._commit(sock, parts, last_seq, pos, volatile,
                             batch_bytes)
                parts, batch_bytes = [], 0
        if parts:
            self._commit(sock, parts, last_seq, pos, volatile, batch_bytes)
        return pos

    def _srl_unreadable(self, err, epoch):
        """(Under the lock.)  A read of the SRL failed: as for a failed
        write, the links that hold it log to their DCMs and replay once it
        works again (not a lost connection to retry for ever: the entries
        would never go)."""
        if self.epoch == epoch and self.holds_srl:
            self.group.srl_failed(err)

    def _commit(self, sock, parts, last_seq, end_pos, volatile=False,
                nbytes=0):
        """Close a batch: CAPL if volatile and no CMIT is due, else CMIT
        (which makes every batch before it durable too)."""
        g = self.group
        with g.cond:
            self.batches.append((last_seq, end_pos))
            self.last_sent_seq = last_seq
            volatile = volatile and not self._durable_due(nbytes)
            if volatile:
                if not self.volatile_batches:
                    self.volatile_since = time.monotonic()
                self.volatile_batches += 1
                self.volatile_bytes += nbytes
            else:
                self.volatile_batches = self.volatile_bytes = 0
                self.durable_sent = last_seq
        parts.append((b"CAPL" if volatile else b"CMIT", SEQ.pack(last_seq),
                      None))
        send_frames(sock, parts)
        self.sent_bytes += sum(len(p[1]) + (len(p[2]) if p[2] else 0)
                               for p in parts)

    def _durable_due(self, nbytes=0):
        """(Under the lock.)  The next batch closes with CMIT: a host
        flush waits, or enough went as CAPL since the last CMIT."""
        return self.durable_wanted > self.durable_sent or \
            self.volatile_batches + 1 >= VOLATILE_BATCHES or \
            self.volatile_bytes + nbytes >= min(
                VOLATILE_BYTES, self.group.srl.capacity // 4) or \
            (self.volatile_batches > 0 and
             time.monotonic() - self.volatile_since >= PERSIST_INTERVAL)

    def _commit_due(self):
        """(Under the lock.)  A CMIT with no entry is due: something went
        as CAPL since the last CMIT, and a host flush waits for it or it
        has waited PERSIST_INTERVAL."""
        return self.last_sent_seq > self.durable_sent and (
            self.durable_wanted > self.durable_sent or
            time.monotonic() - self.volatile_since >= PERSIST_INTERVAL)

    def _unheld(self):
        """(Under the lock.)  Batches sent that the secondary has not
        acknowledged at all."""
        held, n = self.acknowledged, 0
        for last, _ in reversed(self.batches):
            if last <= held:
                break
            n += 1
        return n

    def _stream(self, sock, epoch):
        g = self.group
        volatile = self.mode == "sync" and self.secondary_applies
        with g.cond:
            if self.stream_from is not None:
                send_pos, self.stream_from = self.stream_from, None
            else:
                # Skip entries the secondary has already (a lost ack).
                try:
                    send_pos = g.skip_applied(self.acked_pos,
                                              self.secondary_applied)
                except OSError as err:
                    self._srl_unreadable(err, epoch)
                    return not self.stopping
                if send_pos != self.acked_pos:
                    self.acked_pos = send_pos
                    self.acked_seq = max(self.acked_seq,
                                         int(self.secondary_applied))
                self.last_sent_seq = self.acked_seq
            # Whatever went before is durable or covered by a CMIT sent.
            self.durable_sent = self.last_sent_seq
            self.held_seq = self.acked_seq
            self.volatile_batches = self.volatile_bytes = 0
        last_persist = time.monotonic()
        while not self.stopping:
            with g.cond:
                while not self.stopping and self.epoch == epoch and \
                        g.srl.head_pos <= send_pos and \
                        self.state == REPLICATING and \
                        not self.verify_due() and not self._commit_due():
                    g.waiters += 1
                    g.cond.feed.wait(0.5)
                    g.waiters -= 1
                    if time.monotonic() - last_persist > PERSIST_INTERVAL:
                        break
                if self.epoch != epoch:
                    return not self.stopping
                if self.stopping or self.state != REPLICATING:
                    return False
                until = g.srl.head_pos
                # Flow control: at most 8 batches unacknowledged.
                while self._unheld() > 8 and self.state == REPLICATING \
                        and not self.stopping and self.epoch == epoch:
                    self.flow_waits = True
                    g.cond.feed.wait(0.5)
                    self.flow_waits = False
            if time.monotonic() - last_persist > PERSIST_INTERVAL:
                g.persist()
                last_persist = time.monotonic()
                if until <= send_pos:
                    # Idle: tell the secondary the primary is alive.
                    send_frame(sock, b"BEAT")
            pos = self._send_entries(sock, send_pos, until, epoch,
                                     volatile)
            if pos is None:
                return True
            send_pos = pos
            with g.cond:
                commit = self._commit_due()
            if commit:
                self._commit(sock, [], self.last_sent_seq, send_pos)
            if self.verify_due():
                pos = self.verify_region(sock, send_pos, epoch)
                if pos is None:
                    return True
                send_pos = pos
        return False

    def _replay(self, sock):
        """One DCM replay pass (module notes); True when it completed or
        was broken off by an overflow (the caller goes on), False if the
        link is stopping or down."""
        g = self.group
        with g.cond:
            if self.holds == SRL_DCM:
                # A volume change began (or widened) a replay while the
                # link streamed: the pass goes on from the stream's
                # position, after every entry sent so far.
                send_pos = self.batches[-1][1] if self.batches \
                    else self.acked_pos
                # Batches of it that went as CAPL are made durable once
                # the secondary began the replay (a host flush may wait).
                unsynced_stream = self.last_sent_seq > self.durable_sent
            else:
                self.transition("await-replay")
                # After an SRL failure, not at once: each try of a failing
                # SRL would switch the link back to logging after a pass.
                while not self.stopping and \
                        time.monotonic() - g.srl_failed_at < SRL_RETRY:
                    g.cond.wait(0.5)
                if self.stopping:
                    return False
                self.error = None
                g.replay_join(self)
                send_pos = self.acked_pos
                unsynced_stream = False
            epoch = self.epoch
            runs = list(self.dcm.runs())
            self.replay_total = self.dcm.count()
            self.replay_done = 0
            self.replay_bytes = [0, sum(n for _, _, n in runs)]
            self.replay_times = (time.monotonic(), None)
            self.replay_syncs = []
            # At least the time in seconds: ids of a later link (or of
            # another primary) to the same secondary are larger too.
            self.replay_round = max(self.replay_round + 1, int(time.time()))
            self.replay_sync_n = 0
            self.replays += 1
            self.replay_acked = None
            self.replay_cancel.clear()
            if self.stopping:
                return False
        # The stream's start is durable before anything of it is sent.
        g.persist()
        started = time.monotonic()
        log.info("group %s: replay to %s started: %d extents of %d bytes",
                 g.name, self.secondary, self.replay_total, g.granularity)
        send_json(sock, b"RBEG", {"extents": self.replay_total})
        began = self._wait_replay_reply(b"RBOK")
        if began is None:
            return False
        image = began.get("image")
        with g.cond:
            # What the secondary writes from here on lands on this image
            # (a secondary that keeps none, or does not say: None).
            self.replay_image = image if isinstance(image, dict) and \
                isinstance(image.get("id"), str) and \
                isinstance(image.get("base"), list) else None
        g.persist()
        if unsynced_stream:
            self._commit(sock, [], self.last_sent_seq, send_pos)
        gran = g.granularity
        vol = None
        # Sent since the last RSYN: (vol, offset, length), and its data
        # bytes (zeroes, sent as a length, cost nothing to send again).
        unsynced, unsynced_bytes, synced_at = [], 0, time.monotonic()

        def current():
            # (Under g.cond.)  The SRL head, if this replay still runs.
            if self.epoch != epoch or self.stopping:
                raise _ReplayEnded(not self.stopping)
            if self.state != DCM_REPLAY:
                raise _ReplayEnded(False)
            return g.srl.head_pos

        def send_entries(until):
            nonlocal send_pos
            pos = self._send_entries(sock, send_pos, until, epoch)
            if pos is None:
                raise _ReplayEnded(True)
            send_pos = pos

        def read(view, off):
            # The data under the group lock is the state after every entry
            # logged so far: those entries go first, then the data.
            with g.cond:
                until = current()
                # Holes are not read: zeroes in the chunk, which the
                # copier's zero check sends as a zero.  Asked under the
                # lock with the read, so both are the state at `until`.
                below = g.replay_view(vol)
                for start, n, hole in below.extents(off, len(view)):
                    part = view[start - off:start - off + n]
                    if hole:
                        part[:] = bytes(n)
                    else:
                        below.readinto(part, start)
            send_entries(until)

        def send_data(view, off):
            nonlocal unsynced_bytes
            head = DATA.pack(vol, WRITE, off, len(view), zlib.crc32(view))
            send_frames(sock, [(b"RDAT", head, bytes(view))])
            unsynced.append((vol, off, len(view)))
            unsynced_bytes += len(view)

        def send_zero(off, n):
            send_frames(sock, [(b"RDAT", DATA.pack(vol, ZERO, off, n, 0),
                                None)])
            unsynced.append((vol, off, n))

        def sync_due():
            nonlocal unsynced, unsynced_bytes, synced_at
            if not unsynced or not self.secondary_syncs or (
                    unsynced_bytes < REPLAY_SYNC_BYTES and
                    time.monotonic() - synced_at < changemap.COMMIT_INTERVAL):
                return False
            # Only whole extents leave the DCM; an extent sent in part
            # waits for the chunks that complete it (its part sent now is
            # durable by then, since it is acknowledged before them).
            whole, rest = self._whole_extents(unsynced)
            unsynced, unsynced_bytes, synced_at = rest, 0, time.monotonic()
            if not whole:
                return False
            self._replay_sync(sock, epoch, whole)
            return True

        def sent(n):
            nonlocal beat_at
            self.sent_bytes += n
            self.replay_done += (n + gran - 1) // gran
            self.replay_bytes[0] += n
            sync_due()
            beat_at = time.monotonic()

        def idle():
            # While the rate holds the replay back: the SRL stream is not
            # throttled (entries logged meanwhile go now), an RSYN is sent
            # when due, and a BEAT keeps the secondary from taking the
            # silent primary for a lost one.
            nonlocal beat_at
            with g.cond:
                until = current()
            if until > send_pos:
                send_entries(until)
            elif not sync_due():
                if time.monotonic() - beat_at < REPLAY_BEAT:
                    return
                send_frame(sock, b"BEAT")
            beat_at = time.monotonic()

        def wait(timeout):
            # The rate holds the replay back: a host write wakes it, so
            # that idle() sends its entry at once (a sync write waits
            # for it), not at the next look.
            with g.cond:
                if not self.replay_cancel.is_set() and \
                        g.srl.head_pos <= send_pos:
                    g.waiters += 1
                    try:
                        g.cond.feed.wait(timeout)
                    finally:
                        g.waiters -= 1
            return self.replay_cancel.is_set()

        beat_at = time.monotonic()
        # One RDAT frame per chunk (pieces of a whole chunk); under a rate,
        # a chunk is what the rate sends in REPLAY_BEAT at most, so the
        # data goes out evenly and every RSYN goes when due.
        chunk = REPLAY_CHUNK
        if self.replay_rate:
            chunk = max(REPLAY_MIN_CHUNK, min(
                REPLAY_CHUNK, int(self.replay_rate * REPLAY_BEAT) //
                REPLAY_MIN_CHUNK * REPLAY_MIN_CHUNK))
        copying = copier.Copier(read, send_data, zero=send_zero,
                                chunk=chunk, piece=chunk,
                                progress=sent, rate=self.replay_rate,
                                cancel=self.replay_cancel, idle=idle,
                                wait=wait,
                                idle_interval=REPLAY_IDLE)
        try:
            self._replay_hold(idle, current, lambda: send_pos,
                              ending=False)
            for vol, vol_runs in itertools.groupby(runs, key=lambda r: r[0]):
                if not copying.copy([(off, length)
                                     for _, off, length in vol_runs]):
                    return False
            # The last chunk too: the replay takes its size over the rate.
            copying.throttle()
            self._replay_hold(idle, current, lambda: send_pos,
                              ending=True)
        except _ReplayEnded as e:
            return e.result
        finally:
            self.replay_times = (self.replay_times[0], time.monotonic())
        if self.stopping:
            return False
        with g.cond:
            if self.epoch != epoch:
                return True
            until = g.srl.head_pos
        pos = self._send_entries(sock, send_pos, until, epoch)
        if pos is None:
            return True
        with g.cond:
            if self.epoch != epoch:
                return True
            # Entries appended after `until` follow in the stream; the end
            # marker names the state sent so far.
            final = g.next_seq - 1 if g.srl.head_pos == pos \
                else self.last_sent_seq
            self.replay_acked = None
        # A sequence number sent to a secondary must survive a crash.
        g.persist()
        send_frames(sock, [(b"REND", SEQ.pack(final), None)])
        if self._wait_replay_reply(b"RACK") is None:
            return False
        with g.cond:
            if self.epoch != epoch:
                return True
            self.dcm.clear()
            self.replay_cleared = 0
            self.replay_image = None
            self.replay_reason = None
            self.kept_stream = False
            self.transition("replayed")
            self.secondary_consistent = True
            self.replay_done = self.replay_total
            self.replay_syncs = []
            # The stream goes on from where the replay left it.
            self.stream_from = pos
        g.persist()
        log.info("group %s: replay to %s completed: %d extents in %.1f s",
                 g.name, self.secondary, self.replay_total,
                 time.monotonic() - started)
        return True

    def _replay_hold(self, idle, current, sent, ending):
        """Before the replay reads (or, ending, ends) anything: while
        group.replay_hold says so, the stream goes on (idle; sent() is
        the stream's position) and the secondary stays as it is."""
        g = self.group
        while True:
            with g.cond:
                current()
                if g.replay_hold(ending) is None:
                    return
                # Nothing to send: a waiter, so that a change wakes it (a
                # sync write waits for what it sends), not the next look.
                if g.srl.head_pos <= sent():
                    g.waiters += 1
                    try:
                        g.cond.feed.wait(REPLAY_IDLE)
                    finally:
                        g.waiters -= 1
            idle()

    def _whole_extents(self, runs):
        """Runs (vol, offset, length) a replay sent, in order: the runs of
        the whole extents they cover (an extent's end at the volume's end
        counts), and as a list, the part of an extent the last one ends
        in, which later chunks complete."""
        gran, sizes = self.group.granularity, self.group.sizes
        merged = []
        for vol, off, n in runs:
            if merged and merged[-1][0] == vol and \
                    merged[-1][1] + merged[-1][2] == off:
                merged[-1][2] += n
            else:
                merged.append([vol, off, n])
        whole, rest = [], []
        for vol, off, n in merged:
            end = off + n
            a = -(-off // gran) * gran
            b = end if end >= sizes[vol] else end // gran * gran
            if b > a:
                whole.append((vol, a, b - a))
            start = b if b >= a else off
            rest = [(vol, start, end - start)] if b < end else []
        return whole, rest

    def _replay_sync(self, sock, epoch, runs):
        """Ask the secondary to make the replay data sent so far durable
        (RSYN); its answer clears `runs` from the DCM (_replay_synced).
        Waits while REPLAY_SYNCS_AHEAD requests are unanswered, which
        bounds what a broken-off replay sends again."""
        g = self.group
        with g.cond:
            while len(self.replay_syncs) >= REPLAY_SYNCS_AHEAD and \
                    not self.stopping and self.epoch == epoch and \
                    self.state == DCM_REPLAY:
                g.cond.wait(0.5)
            if self.epoch != epoch or self.stopping:
                raise _ReplayEnded(not self.stopping)
            if self.state != DCM_REPLAY:
                raise _ReplayEnded(False)
            self.replay_sync_n += 1
            ident = (self.replay_round << 32) + self.replay_sync_n
            self.replay_syncs.append((ident, epoch, runs))
        send_frames(sock, [(b"RSYN", SEQ.pack(ident), None)])

    def _replay_synced(self, ident):
        """(Under the lock.)  The secondary has made the replay data up to
        request ident durable (and recorded ident): the regions to clear
        from the DCM, with the epoch they belong to, or None.  A DCM the
        replay no longer holds as it read it (the link fell back to
        logging: the epoch changed) is left alone.  The record saying
        ident was cleared is saved before the clear (_clear_replayed)."""
        runs = []
        while self.replay_syncs and self.replay_syncs[0][0] <= ident:
            _, epoch, done = self.replay_syncs.pop(0)
            if epoch == self.epoch and self.state == DCM_REPLAY:
                runs.extend(done)
        if not runs:
            return None
        self.replay_cleared = max(self.replay_cleared, ident)
        return self.epoch, runs

    def _clear_replayed(self, epoch, runs):
        """(Under the lock, after the record with replay_cleared is saved.)"""
        if epoch != self.epoch or self.state != DCM_REPLAY:
            return
        try:
            self.dcm.clear_runs(runs)
        except OSError as e:
            # The bits stay set on disk: a restart copies them again.
            log.warning("group %s, link %s: cannot clear replayed "
                        "regions in the DCM: %s", self.group.name,
                        self.secondary, e)

    # ------------------------------------------------------------ verify

    def start_verify(self, rate=None):
        """(Under the lock.)  Start an online verify of this link
        (target.replication.verify); returns its LinkVerify."""
        g = self.group
        self.verify_left()
        self.check_verify()
        self.verifying = LinkVerify(
            [v.name for v in g.volumes], [v.size for v in g.volumes],
            g.granularity, rate)
        g.cond.notify_all()
        log.info("group %s: verify against %s started", g.name,
                 self.secondary)
        return self.verifying

    def check_verify(self):
        """(Under the lock.)  Refuse a verify that cannot start now."""
        if self.verifying is not None and self.verifying.running:
            raise VerifyRefused(name=self.group.name, peer=self.secondary,
                                reason="a verify is running")
        if self.state != REPLICATING:
            raise VerifyRefused(name=self.group.name, peer=self.secondary,
                                reason="the link is {}, not replicating"
                                .format(self.state))
        if not self.secondary_verifies:
            raise VerifyRefused(name=self.group.name, peer=self.secondary,
                                reason="the secondary runs a clonectl "
                                "without online verify: upgrade it")

    def stop_verify(self):
        """(Under the lock.)  Stop the running verify; what it marked
        stays in the DCM."""
        if self.verifying is not None and self.verifying.running:
            self.verifying.cancel.set()
            self.group.cond.notify_all()
            return True
        return False

    def verify_due(self):
        """(Under the lock, or from the sender.)  A region to compare."""
        job = self.verifying
        return job is not None and job.running

    def verify_left(self):
        """A verify whose link stopped streaming (a failure, an overflow,
        a detach) ends there: its marks stay, the replay covers them."""
        job = self.verifying
        if job is not None and job.running and self.state != REPLICATING:
            job.end(stopped=True, error="the link left replicating ({})"
                    .format(self.state))

    def verify_region(self, sock, send_pos, epoch):
        """Compare the verify's next region (verify.py's notes); return
        the stream position reached, or None if the link's epoch changed."""
        g, job = self.group, self.verifying
        with g.cond:
            self.verify_left()
            if not job.running:
                return send_pos
        stopped = job.cancel.is_set()
        region = None if stopped else job.next_region()
        if region is None:
            with g.cond:
                if job.extents_differing:
                    # The replay copies the marked extents (and the record
                    # saying so is saved with the switch).
                    g.to_logging(self)
                    self.error = "verify found {} extent(s) that differ; " \
                        "replaying them".format(job.extents_differing)
                job.end(stopped=stopped)
            log.info("group %s: verify against %s %s: %d extents "
                     "compared, %d differ", g.name, self.secondary,
                     "stopped" if stopped else "completed",
                     job.extents_compared, job.extents_differing)
            return send_pos
        vol, offset, length = region
        buf = bytearray(length)
        with g.cond:
            if self.epoch != epoch or self.state != REPLICATING:
                job.end(stopped=True, error="the link left replicating")
                return None
            until = g.srl.head_pos
            # What hosts read, as a replay sends it (a restore's view).
            g.replay_view(vol).readinto(buf, offset)
        mine = digests(buf, job.granularity)
        pos = self._send_entries(sock, send_pos, until, epoch)
        if pos is None:
            with g.cond:
                job.end(stopped=True, error="the link left replicating")
            return None
        job.request += 1
        with g.cond:
            self.verify_answer = None
        send_json(sock, b"VREQ", {"id": job.request, "vol": vol,
                                  "offset": offset, "length": length,
                                  "granularity": job.granularity})
        with g.cond:
            while self.verify_answer is None and not self.stopping and \
                    self.epoch == epoch and self.state == REPLICATING:
                g.cond.wait(0.5)
            answer, self.verify_answer = self.verify_answer, None
            if answer is None or answer.get("id") != job.request:
                job.end(stopped=True, error="the link left replicating")
                return None if self.epoch != epoch else pos
            try:
                found = job.compared(vol, offset, length, mine,
                                     answer.get("digests") or [])
            except ValueError as e:
                job.end(stopped=True, error=str(e))
                return pos
            for off in found:
                self.dcm.mark(vol, off, job.granularity)
        # --rate; woken by a stop, and ended by the link leaving the stream.
        while not job.cancel.is_set() and not self.stopping and \
                self.epoch == epoch and self.state == REPLICATING:
            ahead = job.ahead()
            if ahead <= 0:
                break
            job.cancel.wait(min(ahead, 0.2))
        with g.cond:
            self.verify_left()
        return pos

    def _wait_replay_reply(self, kind):
        """The secondary's answer of kind (RBOK, RACK) to the replay's
        frame, a dict; None if the link stops or leaves the replay first."""
        g = self.group
        deadline = time.monotonic() + 120
        with g.cond:
            while self.replay_acked is None and not self.stopping and \
                    self.state == DCM_REPLAY and time.monotonic() < deadline:
                g.cond.wait(0.5)
            got = self.replay_acked
            self.replay_acked = None
        if got is None:
            return None
        if got[0] != kind or not got[1].get("ok", True):
            raise RemoteRefused(peer=self.secondary,
                                reason=got[1].get("message", "replay refused"))
        return got[1]

    def wait_ack(self, seq, durable=False):
        """Sync mode: wait until the secondary has applied seq, or with
        durable (a host flush) made it durable (or the link fails, which
        the DCM then covers)."""
        g = self.group
        deadline = time.monotonic() + g.sync_timeout
        if not durable:
            self._wait_applied(seq, deadline)
            return
        with g.cond:
            if self.durable_wanted < seq:
                self.durable_wanted = seq
                g.cond.notify_all()
            while self.acked_seq < seq and self.sync_waits and \
                    not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._ack_timed_out("a flush")
                    break
                g.cond.wait(min(left, 0.5))

    def _ack_timed_out(self, what):
        """(Under the lock.)  The secondary did not acknowledge what (a
        write, a flush) within the group's sync timeout: the link logs to
        its DCM."""
        self.error = "the secondary did not acknowledge {} within {:.0f} " \
            "s; changes are tracked in the DCM".format(
                what, self.group.sync_timeout)
        self.group.to_logging(self)

    def _wait_applied(self, seq, deadline):
        """wait_ack for a write: woken by the acknowledgement that covers
        seq (or any event of the group), which the write sees without
        taking the lock again."""
        g = self.group
        with g.cond:
            if self.acknowledged >= seq or not self.sync_waits or \
                    self.stopping:
                return
            waiter = g.cond.ack_waiter(self, seq)
        try:
            while True:
                waiter.event.wait(max(0.0, min(deadline - time.monotonic(),
                                               0.5)))
                if self.acknowledged >= seq:
                    return
                with g.cond:
                    if self.acknowledged >= seq or not self.sync_waits or \
                            self.stopping:
                        return
                    if time.monotonic() >= deadline:
                        self._ack_timed_out("a write")
                        return
                    # Set again by whatever changes next (under the lock).
                    # An acknowledgement that covered it took it off the
                    # list, and a lost connection may have taken that
                    # acknowledgement back since: back on the list.
                    if waiter.listed:
                        waiter.event.clear()
                    else:
                        waiter = g.cond.ack_waiter(self, seq)
        finally:
            if waiter.listed:
                with g.cond:
                    g.cond.ack_done(waiter)

    def replay_progress(self):
        """The running or last DCM replay's data: bytes done and total,
        rate (bytes per second), seconds left; None before the first."""
        if self.replay_times is None:
            return None
        started, ended = self.replay_times
        running = ended is None
        elapsed = (ended or time.monotonic()) - started
        done, total = self.replay_bytes
        rate = done / elapsed if elapsed > 0 else 0.0
        return {"running": running, "elapsed": round(elapsed, 3),
                "bytes_done": done, "bytes_total": total,
                "rate": round(rate),
                "eta": round((total - done) / rate, 1)
                if rate > 0 and running else None}

    def status(self):
        g = self.group
        held = self.acknowledged
        held_pos = next((end for last, end in reversed(self.batches)
                         if last <= held), self.acked_pos)
        lag_updates = max(0, g.next_seq - 1 - held) \
            if self.holds_srl else None
        lag_bytes = max(0, g.srl.head_pos - held_pos) \
            if self.holds_srl else None
        self.verify_left()
        return {"secondary": self.secondary, "mode": self.mode,
                "state": self.state, "attached": self.attached,
                "secondary_consistent": self.secondary_consistent,
                "acked_seq": held, "durable_seq": self.acked_seq,
                "lag_updates": lag_updates,
                "lag_bytes": lag_bytes, "dcm_logging": self.logging,
                "dcm_extents": self.dcm.count() if self.dcm else None,
                "replay_total": self.replay_total,
                "replay_done": self.replay_done, "replays": self.replays,
                "replay_reason": self.replay_reason if self.dcm_active
                else None,
                "replay_rate_limit": self.replay_rate,
                "replay": self.replay_progress(),
                "bytes_sent": self.sent_bytes, "error": self.error,
                "split_brain": self.split_brain,
                "stopped_error": self.stopped_error,
                "verify": self.verifying.to_dict()
                if self.verifying is not None else None,
                "dcm_problem": self.dcm.problem if self.dcm else None}


def _taken(left, vol, offset, length):
    """left (a deque of [vol, offset, length], in the order a secondary
    sends them) without a region just taken: its head, as a secondary
    answering in order sends it (in place), else wherever it is."""
    head = left[0] if left else None
    if head is not None and head[:2] == [vol, offset] and head[2] >= length:
        if head[2] == length:
            left.popleft()
        else:
            left[0] = [vol, offset + length, head[2] - length]
        return left
    return collections.deque(runs_without(left, vol, offset, length))
