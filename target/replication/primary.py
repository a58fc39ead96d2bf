"""Replication of storage groups to secondary nodes (seed 003).

Design notes
------------
A replicated storage group (RSG) is a set of LUs of this target replicated
with write-order fidelity to one or more secondary nodes (other clonectl
targets, `serve --replication-port`).  One object owns the group on each
node: `PrimaryGroup` (the node that hosts writes) or `SecondaryGroup`.

Primary.  Every change to a volume (host writes, zeroes, trims, and clone
engines writing into it) passes the volume's `ReplicationLayer` in its LU's
I/O stack (target.iostack), which calls `PrimaryGroup.change()`.  Under the group lock a change gets the next
sequence number, is appended to the storage replicator log (SRL, a ring
file: `Srl`) and is then applied to the volume, still under the lock: the
order of the SRL is exactly the order in which the bytes changed, across all
volumes of the group (two overlapping writes from two connections land in
SRL order on both nodes).  The SRL is written with pwrite (page cache) and
made durable (fdatasync) at every host flush and FUA write, before the
volume's own flush; a kill -9 loses nothing written to the page cache, and
writes not flushed are not promised durable.

Activity log.  A power cut (unlike a kill -9) can keep a data write whose
SRL entry was not yet durable, or lose SRL entries a secondary already
applied.  So, as DRBD does, the primary keeps an activity log (`ActivityLog`,
rsg/NAME.al): regions of 4 MiB, each marked durably before the first write
into it is logged, and cleared lazily once it has not been written for a
whole persist interval (the SRL sync of the previous persist covers its
writes).  A clean close clears it.  Marks found at start-up mean the group
stopped uncleanly: every link that streamed the SRL switches to DCM logging
with its unacknowledged entries and every active region ORed into its DCM
(so it replays them), and sequence numbers jump past anything the lost SRL
tail could have handed out (a secondary may have applied entries the
primary no longer has; a reused number would be skipped there).  A kill -9
pays a replay of the active regions it did not need; a torn SRL tail is no
longer taken for corruption then.

Links.  One `Link` per secondary, each with a thread that reads the SRL at
its own pace and sends entries in order, in batches closed by a commit
frame; the secondary acknowledges a batch once it is durable in its staging
log.  An entry is freed once every link that holds the SRL has it (the
persisted acknowledged position: space is reclaimed only after the link
positions are saved, so a crash never finds a link pointing at reused
space).  Sync links make the host write wait for the acknowledgement (up to
`sync_timeout`; then the link is failed and changes are tracked in its
DCM, the write proceeds); async links acknowledge at once.

DCM.  When the SRL would overflow, each link that still holds entries the
new one needs is switched to DCM logging: its pending entries are marked in
its data change map (one byte per extent per volume, `maps.ActivityFile`,
set in place and made durable before the change it describes) and every
later change sets bits there.  A detached link, a link whose secondary lost
its data, a link added to a secondary of unknown content (all extents), and
a volume-changing operation (below) do the same.

DCM replay converges under any write load the link can carry: the replay
does not chase a moving bitmap.  Under the group lock the link stops
logging and joins the SRL stream at its head; from then on new changes
reach the secondary in order through the stream, and the replay makes one
pass over the (now static) DCM.  For each run it reads the data under the
group lock, so the data is exactly the state after every entry with a
sequence number below the current one; it sends the stream's entries up to
that point first, then the run, so later entries, sent after, land on top.
When the pass is done the secondary has the primary's state at the last
sequence sent: it becomes consistent, and the DCM is cleared (only then:
a crash or an overflow during a replay simply replays again).  Before a
replay the secondary protects its last consistent image (a copy-on-first-
write snapshot, LU@protected-LU, the peer channel's mechanism) and releases
it when the replay completes.

A failing SRL (a read, a write or a sync returns an error) must not fail the
host's I/O, since the volumes are fine: every link that holds the SRL
switches to DCM logging with what it had not acknowledged and the change
that could not be logged, the record is saved without the SRL, and the
links replay once SRL_RETRY has passed (and log again if it still fails).

Volume-changing operations (protected restore, reverse sync of a
replicated volume) change regions without host writes.  Before one starts,
every link is switched to DCM logging (pending entries marked) and the
operation's region map is ORed into every DCM; the links do not replay
until it has finished.  The secondary then receives exactly the regions the
operation changed plus the host writes made meanwhile, never a full copy.

Secondary.  `SecondaryGroup` receives batches, writes each whole batch to
one of two staging slots (crc over the batch, fdatasync), acknowledges it,
applies it in order to the volumes, flushes them, and marks the slot
applied.  After a crash the slot holding a committed, unapplied batch is
applied again as one unit (the window of unacknowledged updates); a torn
slot is ignored (the primary still has it: it was never acknowledged).
Reads of a secondary's volume take the apply lock (its guard layer, the
outermost of the LU's I/O stack), so no reader sees half a batch; while the
secondary is inconsistent (a replay running or broken off) its exports
refuse connections and reads with a message.  Batches are applied just
below that guard, so a clone or session of a secondary's volume sees each
replicated change as it would a host write.  While a restore or reverse
sync runs on a secondary, primaries are refused (they retry) so that no
batch lands beside the operation's writes.

Generations.  A group's history is a list of (generation id, first
sequence number).  `promote` on a secondary starts a new generation; on
reconnect each side's history and last sequence number show whether the
old primary wrote after the branch point (split brain): replication is
refused with a message until the admin chooses (`--discard-secondary-
changes` on the new primary), and then only the regions that diverged (the
new primary's writes since the promotion, plus the old primary's writes the
new one never received, which the demoted node reports) are copied.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
import zlib

from .. import backends, errors, fsutil, iostack, limits, maps

log = logging.getLogger("clonectl.replication")

DEFAULT_GRANULARITY = 64 << 10
MIN_SRL = 1 << 20
SECTOR = 512
BATCH_BYTES = 4 << 20          # a batch is closed after this much data
SYNC_TIMEOUT = 10.0            # a sync link that does not ack is failed
CONNECT_TIMEOUT = 5.0
RETRY_INTERVAL = 1.0
PERSIST_INTERVAL = 1.0
MAX_FRAME = 64 << 20
MAX_HELLO = 64 << 10           # the first frame, read before the token
MAX_UNAUTHENTICATED = 8        # connections without the token, at once
MAX_PRIMARIES = 64             # connections to the replication port
SEQ_RESERVE = 1 << 20          # unlogged sequence numbers saved ahead
HEARTBEAT = 1.0                # an idle link sends a heartbeat this often
IDLE_TIMEOUT = 10.0            # a secondary drops a silent primary
REPLAY_CHUNK = 1 << 20
AL_REGION = 4 << 20            # activity log region (DRBD's AL extent)
SRL_RETRY = 5.0                # a failed SRL is tried again after this

PRIMARY, SECONDARY = "primary", "secondary"

# Link states (status).
REPLICATING = "replicating"
DCM_LOGGING = "dcm-logging"
DCM_REPLAY = "dcm-replay"
INCONSISTENT = "inconsistent"
DETACHED = "detached"
FAILED = "failed"
CONNECTING = "connecting"
DIVERGED = "diverged"

MODES = ("sync", "async")

# Entry kinds.
WRITE, ZERO, TRIM = 0, 1, 2


# ---------------------------------------------------------------- errors

class ReplicationError(errors.Error):
    msg = "replicated group {name!r}: {reason}"
    errno = errno.EINVAL


class UnknownGroup(errors.Error):
    msg = "no replicated storage group named {name!r}"
    errno = errno.ENOENT


class GroupBusy(errors.Error):
    msg = "replicated group {name!r}: {reason}"
    errno = errno.EBUSY


class ReplicaUnavailable(errors.Error):
    msg = ("LU {name!r} is a secondary of replicated group {group!r} and is "
           "inconsistent ({reason}); it serves no reads until replication "
           "makes it consistent{hint}")
    errno = errno.EIO


class RemoteRefused(errors.Error):
    msg = "secondary {peer}: {reason}"
    errno = errno.EPROTO


class _SrlSyncFailed(Exception):
    """PrimaryGroup._persist could not make the SRL durable (the OSError
    is its __cause__)."""


class SrlCorrupt(errors.Error):
    msg = ("SRL of group {name!r}: entry {seq} at byte {pos} fails its "
           "checksum; replication to {peer} stopped, nothing of it was sent")
    errno = errno.EUCLEAN


# ---------------------------------------------------------------- wire

FRAME = struct.Struct("<4sI")
ENTRY = struct.Struct("<QIBQII")      # seq vol kind offset length crc
DATA = struct.Struct("<IBQII")        # vol kind offset length crc
SEQ = struct.Struct("<Q")


def send_frame(sock, kind, payload=b""):
    sock.sendall(FRAME.pack(kind, len(payload)) + payload)


def send_frames(sock, parts):
    """parts: list of (kind, header bytes, data or None); one sendmsg."""
    bufs = []
    for kind, head, data in parts:
        n = len(head) + (len(data) if data is not None else 0)
        bufs.append(FRAME.pack(kind, n))
        bufs.append(head)
        if data is not None:
            bufs.append(data)
    sock.sendall(b"".join(bufs))


def _recv_exact(sock, n, deadline=None):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            # A peer sending a byte at a time does not extend the deadline.
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed")
        got += k
    return buf


def recv_frame(sock, limit=MAX_FRAME, deadline=None):
    """(kind, payload) of the next frame; a frame announcing more than
    limit bytes is refused before anything is allocated for it."""
    kind, n = FRAME.unpack(_recv_exact(sock, FRAME.size, deadline))
    if n > limit:
        raise errors.ProtocolError(reason="{} frame of {} bytes (at most {})"
                                   .format(kind.decode(errors="replace"), n,
                                           limit))
    return kind, _recv_exact(sock, n, deadline) if n else bytearray()


def send_json(sock, kind, obj):
    send_frame(sock, kind, json.dumps(obj).encode())


def shutdown_socket(sock):
    """Wake every thread blocked on sock (recv, send, accept); a socket
    that is already down is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def entry_crc(seq, vol, kind, offset, length, data):
    head = struct.pack("<QIBQI", seq, vol, kind, offset, length)
    return zlib.crc32(data, zlib.crc32(head)) if data is not None \
        else zlib.crc32(head)


# ---------------------------------------------------------------- SRL

SRL_MAGIC = b"CLNSRL01"
SRL_HEADER = struct.Struct("<8sQI")        # magic, capacity, crc
SRL_DATA_START = 4096
ENTRY_MAGIC = b"SRLE"
PAD_MAGIC = b"SRLP"
SRL_ENTRY = struct.Struct("<4sQIBQII")      # magic seq vol kind off len crc
ENTRY_SPACE = SECTOR                        # entries start on 512 bytes


def _round_up(n, m):
    return (n + m - 1) // m * m


class Srl:
    """A ring of entries in a file: positions are logical byte counts that
    only grow; an entry never wraps (it starts at the ring's beginning if
    it does not fit before the end)."""

    def __init__(self, path, capacity=None):
        self.path = path
        if capacity is not None:
            capacity = _round_up(capacity, SECTOR)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL |
                         os.O_CLOEXEC, 0o600)
            try:
                head = SRL_HEADER.pack(SRL_MAGIC, capacity, 0)
                os.pwrite(fd, head.ljust(SRL_DATA_START, b"\0"), 0)
                os.ftruncate(fd, SRL_DATA_START + capacity)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            fsutil.fsync_dir(os.path.dirname(path))
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                raw = os.pread(fd, SRL_HEADER.size, 0)
                magic, capacity, _ = SRL_HEADER.unpack(raw)
                if magic != SRL_MAGIC or capacity < MIN_SRL // 2:
                    raise errors.CorruptState(path=path,
                                              reason="not an SRL file")
            except (struct.error, errors.Error):
                os.close(fd)
                raise errors.CorruptState(path=path, reason="not an SRL file")
        self.fd = fd
        self.capacity = capacity
        # Tests only (CLONECTL_FAULTS): a failing log device.
        self.faults = backends.fault_rules(path)
        self.head_pos = 0          # where the next entry goes
        self.next_seq = 1
        self.dirty = False

    @staticmethod
    def space(length, kind):
        data = length if kind == WRITE else 0
        return _round_up(SRL_ENTRY.size + data, ENTRY_SPACE)

    def _placement(self, pos, need):
        """(logical start, physical offset) of an entry of need bytes."""
        room = self.capacity - pos % self.capacity
        if room < need:
            pos += room
        return pos, SRL_DATA_START + pos % self.capacity

    def end_after(self, pos, need):
        start, _ = self._placement(pos, need)
        return start + need

    def append(self, seq, vol, kind, offset, length, data, crc):
        need = self.space(length, kind)
        start, phys = self._placement(self.head_pos, need)
        if self.faults is not None:
            self.faults.check("write", phys, need)
        if start != self.head_pos and \
                self.capacity - self.head_pos % self.capacity >= \
                SRL_ENTRY.size:
            # The rest of the lap is skipped: say so, so that a reader
            # never takes the old bytes there for an entry.
            os.pwrite(self.fd, PAD_MAGIC.ljust(SRL_ENTRY.size, b"\0"),
                      SRL_DATA_START + self.head_pos % self.capacity)
        head = SRL_ENTRY.pack(ENTRY_MAGIC, seq, vol, kind, offset, length, crc)
        if data is not None:
            os.pwritev(self.fd, [head, data], phys)
        else:
            os.pwrite(self.fd, head, phys)
        self.head_pos = start + need
        self.next_seq = seq + 1
        self.dirty = True
        return start

    def read(self, pos, with_data=True):
        """The entry at logical pos: (seq, vol, kind, off, len, crc, data,
        next pos), or None if there is no entry there.  The caller checks
        the sequence number and the crc (entry_crc)."""
        room = self.capacity - pos % self.capacity
        if room < SRL_ENTRY.size:
            pos += room
            room = self.capacity
        phys = SRL_DATA_START + pos % self.capacity
        if self.faults is not None:
            self.faults.check("read", phys, SRL_ENTRY.size)
        raw = os.pread(self.fd, SRL_ENTRY.size, phys)
        if raw[:4] == PAD_MAGIC:
            pos += room
            room = self.capacity
            phys = SRL_DATA_START
            raw = os.pread(self.fd, SRL_ENTRY.size, phys)
        if len(raw) < SRL_ENTRY.size or raw[:4] != ENTRY_MAGIC:
            return None
        magic, seq, vol, kind, off, length, crc = SRL_ENTRY.unpack(raw)
        need = self.space(length, kind)
        if need > room:
            return None
        data = None
        if kind == WRITE and with_data:
            data = os.pread(self.fd, length, phys + SRL_ENTRY.size)
        return seq, vol, kind, off, length, crc, data, pos + need

    def scan(self, pos, seq):
        """Follow the entries from (pos, seq); set head and next_seq.
        Return (seq, pos) of the first entry whose checksum fails (it is
        kept: the link that reaches it stops with a message), or None."""
        corrupt = None
        while True:
            e = self.read(pos, with_data=True)
            if e is None or e[0] != seq:
                break
            if entry_crc(e[0], e[1], e[2], e[3], e[4], e[6]) != e[5] and \
                    corrupt is None:
                corrupt = (seq, pos)
            pos, seq = e[7], seq + 1
        self.head_pos, self.next_seq = pos, seq
        return corrupt

    def sync(self):
        if self.dirty:
            # Cleared first: an append during the sync sets it again.
            self.dirty = False
            try:
                if self.faults is not None:
                    self.faults.check("flush", 0, 0)
                os.fdatasync(self.fd)
            except OSError:
                self.dirty = True
                raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------- DCM

class Dcm:
    """A link's data change map: one byte per extent of every volume,
    persisted in place ahead of the changes it describes."""

    def __init__(self, path, granularity, sizes, fresh_value=None):
        self.granularity = granularity
        self.bases = []
        total = 0
        for size in sizes:
            self.bases.append(total)
            total += maps.extent_count(size, granularity)
        self.extents = total
        self.sizes = list(sizes)
        self.file = maps.ActivityFile(path, granularity, total)
        self.problem = None
        if fresh_value is not None:
            self.bits = bytearray([fresh_value]) * total
            self.file.reset(self.bits)
            return
        try:
            self.bits = maps.load(path, granularity, total, with_crc=False)
            self.file.fd = maps.files.open(path)
        except maps.MapCorrupt as e:
            # Lost or corrupt: everything may differ (and status says so).
            self.problem = "DCM unusable ({}); every extent will be copied" \
                .format(e)
            self.bits = bytearray(b"\x01") * total
            self.file.reset(self.bits)

    def range_of(self, vol, offset, length):
        g = self.granularity
        base = self.bases[vol]
        return base + offset // g, base + (offset + max(length, 1) - 1) // g + 1

    def mark(self, vol, offset, length):
        """Set the extents of a change, durable before it is made."""
        a, b = self.range_of(vol, offset, length)
        if self.bits.count(1, a, b) == b - a:
            return
        maps.set_range(self.bits, a, b)
        self.file.persist(self.bits, a, b)

    def mark_all(self):
        self.bits[:] = b"\x01" * self.extents
        self.file.reset(self.bits)

    def merge(self, vol, extent_bits, granularity):
        """OR a region map (one byte per extent of `granularity`) of vol."""
        size = self.sizes[vol]
        for s, e in maps.runs(extent_bits):
            off = s * granularity
            length = min(e * granularity, size) - off
            if length > 0:
                a, b = self.range_of(vol, off, length)
                maps.set_range(self.bits, a, b)
        self.file.reset(self.bits)

    def count(self):
        return self.bits.count(1)

    def runs(self, bits=None):
        """(vol, offset, length) of every set run of bits (default: this
        map's own; another map of the same geometry may be given), in
        volume order."""
        bits = self.bits if bits is None else bits
        g = self.granularity
        for vol, base in enumerate(self.bases):
            n = maps.extent_count(self.sizes[vol], g)
            for s, e in maps.runs(bits, base, base + n):
                off = (s - base) * g
                yield vol, off, min((e - base) * g, self.sizes[vol]) - off

    def clear(self):
        self.bits[:] = bytes(self.extents)
        self.file.reset(self.bits)

    def close(self):
        self.file.close()


class ActivityLog(Dcm):
    """The primary's activity log (module notes): regions that may hold
    writes whose SRL entries are not durable yet.  mark() is durable before
    it returns (only the first write into a cold region pays an
    fdatasync); sweep() clears, without a sync, the regions nobody wrote
    since the previous sweep, once the SRL sync that followed that sweep
    has completed (sweep_ok)."""

    def __init__(self, path, granularity, sizes):
        super().__init__(path, max(AL_REGION, granularity), sizes,
                         fresh_value=None if os.path.exists(path) else 0)
        self.touched = bytearray(self.extents)
        self.sweep_ok = False

    def mark(self, vol, offset, length):
        a, b = self.range_of(vol, offset, length)
        self.touched[a:b] = b"\x01" * (b - a)
        super().mark(vol, offset, length)

    def sweep(self):
        if self.sweep_ok:
            for a, b in list(maps.runs(self.bits)):
                for s, e in list(maps.runs(self.touched, a, b, value=0)):
                    self.bits[s:e] = bytes(e - s)
                    maps.files.pwrite(self.file.fd, bytes(e - s),
                                      maps.HEADER.size + s)
        self.touched[:] = bytes(self.extents)
        self.sweep_ok = False


# ---------------------------------------------------------------- backend

class ReplicationLayer(iostack.Layer):
    """A volume's layer in its LU's I/O stack (target.iostack): every
    change is ordered through the group (SRL, DCM) before it reaches the
    volume below; reads pass through."""

    def __init__(self, group, vol):
        self.group = group
        self.vol = vol

    def intercepts(self):
        return {"write": self.write, "zero": self.zero, "trim": self.trim,
                "flush": self.flush}

    def write(self, buf, offset):
        self.group.change(self.vol, WRITE, offset, len(buf), buf,
                          lambda: self.inner.write(buf, offset))

    def zero(self, offset, length, may_trim=False, fast=False):
        self.group.change(self.vol, ZERO, offset, length, None,
                          lambda: self.inner.zero(offset, length,
                                                  may_trim=may_trim,
                                                  fast=fast))

    def trim(self, offset, length):
        self.group.change(self.vol, TRIM, offset, length, None,
                          lambda: self.inner.trim(offset, length))

    def flush(self):
        self.group.flush_log()
        self.inner.flush()


# ---------------------------------------------------------------- records

def parse_secondary(text):
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or \
            not 0 < int(port) < 65536:
        raise errors.InvalidArgument(
            reason="invalid secondary address {!r}: use HOST:PORT"
            .format(text))
    return "{}:{}".format(host.strip("[]"), int(port))


def read_token(path):
    from ..peer import read_token as read_shared_token
    return read_shared_token(path, what="replication")


class GroupFiles:
    """Where a group keeps its files in the state directory."""

    def __init__(self, rsg_dir, name):
        self.dir = rsg_dir
        self.name = name
        self.record = os.path.join(rsg_dir, name + ".json")
        self.srl = os.path.join(rsg_dir, name + ".srl")
        self.stage = [os.path.join(rsg_dir, "{}.stage{}".format(name, i))
                      for i in (0, 1)]
        self.diverged = os.path.join(rsg_dir, name + ".diverged")

    def dcm(self, index):
        return os.path.join(self.dir, "{}.link{}.dcm".format(self.name, index))

    def since(self):
        return os.path.join(self.dir, self.name + ".since-promotion.dcm")

    def activity_log(self):
        return os.path.join(self.dir, self.name + ".al")

    def save(self, record):
        fsutil.write_json_atomic(self.record, record)

    def load(self):
        try:
            with open(self.record, "rb") as f:
                rec = json.load(f)
        except ValueError as e:
            raise errors.CorruptState(path=self.record,
                                      reason="not valid JSON ({})".format(e))
        if not isinstance(rec, dict) or rec.get("role") not in \
                (PRIMARY, SECONDARY) or not isinstance(rec.get("volumes"),
                                                       list):
            raise errors.CorruptState(path=self.record,
                                      reason="not a replicated group record")
        return rec

    def dcms(self):
        """Every link DCM path a group may have (link indexes < 64)."""
        return [self.dcm(i) for i in range(64)]

    @staticmethod
    def remove(paths):
        fsutil.remove_durably(paths)

    def paths(self):
        """Every file the group may have."""
        return [self.record, self.srl, self.diverged, self.since(),
                self.activity_log()] + self.stage + self.dcms()

    def on_disk(self):
        return [p for p in self.paths() if os.path.lexists(p)]

    def remove_all(self):
        self.remove(self.paths())


def new_generation():
    return uuid.uuid4().hex[:16]


def history_diverges(mine, my_last, theirs, their_last):
    """Has the side with history `theirs` (last seq their_last) written
    something the side with `mine` never had?  Returns (diverged, common):
    common is the last sequence number both histories share."""
    # Walk the common prefix of generations.
    i = 0
    while i < len(mine) and i < len(theirs) and mine[i][0] == theirs[i][0]:
        i += 1
    if i == 0:
        return True, 0
    if i == len(theirs):
        # Their last generation is one of mine.
        if i == len(mine):
            return False, min(my_last, their_last)
        branch = mine[i][1] - 1      # my next generation starts after this
        return their_last > branch, min(branch, their_last)
    # They have a generation I never had: they wrote after the branch
    # point only if they wrote in it (a node promoted and demoted again
    # without a write has nothing to lose).
    wrote = their_last >= theirs[i][1]
    if i == len(mine):
        # They are ahead of me (they have a newer generation).
        return wrote, min(theirs[i][1] - 1, my_last)
    return wrote, min(mine[i][1], theirs[i][1]) - 1


# ---------------------------------------------------------------- primary

class Link:
    """One secondary of a primary group, and the thread that feeds it."""

    def __init__(self, group, index, record):
        self.group = group
        self.index = index
        self.secondary = record["secondary"]
        self.mode = record["mode"]
        self.token_file = record["token_file"]
        self.attached = record.get("attached", True)
        self.discard_secondary = record.get("discard_secondary", False)
        self.acked_seq = record.get("acked_seq", 0)
        self.acked_pos = record.get("acked_pos", 0)
        self.saved_pos = self.acked_pos
        self.seeded = record.get("seeded", False)
        # dcm_active: the DCM holds changes the secondary may lack; it is
        # cleared only when a replay completes.  logging: changes are
        # marked in the DCM (not streamed); holds_srl: the link streams
        # the SRL from acked_pos and keeps those entries.
        self.dcm_active = record.get("dcm_active", True)
        self.error = record.get("error")
        self.stopped_error = record.get("stopped_error")
        self.dcm = None
        self.logging = self.dcm_active
        self.holds_srl = not self.dcm_active
        # A replay was running (it streamed the SRL while the DCM was
        # still set): what it streamed unacknowledged is marked at load.
        self.was_holding = record.get("holds_srl", False)
        self.epoch = 0
        self.state = CONNECTING if self.attached else DETACHED
        self.secondary_consistent = None
        self.secondary_applied = None
        self.replay_total = 0
        self.replay_done = 0
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

    def record(self):
        return {"secondary": self.secondary, "mode": self.mode,
                "token_file": self.token_file, "attached": self.attached,
                "discard_secondary": self.discard_secondary,
                "acked_seq": self.acked_seq, "acked_pos": self.acked_pos,
                "dcm_active": self.dcm_active, "seeded": self.seeded,
                "holds_srl": self.holds_srl,
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
            if not (self.state == DIVERGED and self.refused):
                self.state = FAILED
            self.error = msg
            g.cond.notify_all()
        log.warning("group %s, link %s: %s", g.name, self.secondary, msg)
        g.persist()

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
        sock = socket.create_connection((host, int(port)),
                                        timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        if self.stopping:
            return
        send_json(sock, b"HELO", g.hello(token))
        kind, payload = recv_frame(sock)
        reply = json.loads(payload)
        if kind != b"HRPL" or not reply.get("ok"):
            self.refused = reply.get("message", "refused")
            raise RemoteRefused(peer=self.secondary, reason=self.refused)
        self.refused = None
        self.secondary_consistent = reply.get("consistent")
        self.secondary_applied = reply.get("applied_seq")
        sock.settimeout(None)
        if not g.accept_secondary(self, reply):
            return
        self.error = None
        reader = threading.Thread(target=self._read_acks, args=(sock,),
                                  daemon=True, name="rsg-acks")
        reader.start()
        try:
            while not self.stopping:
                # Decided under the lock: an overflow between a look at
                # `logging` and the state change would leave the link
                # "replicating" while it logs, never replaying.
                with g.cond:
                    replay = self.logging
                    if not replay:
                        self.state = REPLICATING
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

    def _read_acks(self, sock):
        g = self.group
        try:
            while True:
                kind, payload = recv_frame(sock)
                if kind == b"ACKS":
                    seq, = SEQ.unpack(payload)
                    with g.cond:
                        while self.batches and self.batches[0][0] <= seq:
                            last, end = self.batches.pop(0)
                            self.acked_seq, self.acked_pos = last, end
                        g.cond.notify_all()
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
                    self.state = FAILED
                    self.error = self.error or "connection lost"
                g.cond.notify_all()
            shutdown_socket(sock)

    def _send_entries(self, sock, send_pos, until_pos, epoch):
        """Send SRL entries [send_pos, until_pos) in batches; return the
        position reached, or None if the link's epoch changed."""
        g = self.group
        parts, batch_bytes, last_seq = [], 0, None
        pos = send_pos
        while pos < until_pos:
            try:
                e = g.srl.read(pos)
            except OSError as err:
                with g.cond:
                    self._srl_unreadable(err, epoch)
                return None
            ok = e is not None and \
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
                self._commit(sock, parts, last_seq, pos)
                parts, batch_bytes = [], 0
        if parts:
            self._commit(sock, parts, last_seq, pos)
        return pos

    def _srl_unreadable(self, err, epoch):
        """(Under the lock.)  A read of the SRL failed: as for a failed
        write, the links that hold it log to their DCMs and replay once it
        works again (not a lost connection to retry for ever: the entries
        would never go)."""
        if self.epoch == epoch and self.holds_srl:
            self.group.srl_failed(err)

    def _commit(self, sock, parts, last_seq, end_pos):
        g = self.group
        with g.cond:
            self.batches.append((last_seq, end_pos))
            self.last_sent_seq = last_seq
        parts.append((b"CMIT", SEQ.pack(last_seq), None))
        send_frames(sock, parts)
        self.sent_bytes += sum(len(p[1]) + (len(p[2]) if p[2] else 0)
                               for p in parts)

    def _stream(self, sock, epoch):
        g = self.group
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
        last_persist = time.monotonic()
        while not self.stopping:
            with g.cond:
                while not self.stopping and self.epoch == epoch and \
                        g.srl.head_pos <= send_pos and \
                        self.state == REPLICATING:
                    g.waiters += 1
                    g.cond.wait(0.5)
                    g.waiters -= 1
                    if time.monotonic() - last_persist > PERSIST_INTERVAL:
                        break
                if self.epoch != epoch:
                    return not self.stopping
                if self.stopping or self.state != REPLICATING:
                    return False
                until = g.srl.head_pos
                # Flow control: at most 8 batches unacknowledged.
                while len(self.batches) > 8 and self.state == REPLICATING \
                        and not self.stopping and self.epoch == epoch:
                    g.cond.wait(0.5)
            if time.monotonic() - last_persist > PERSIST_INTERVAL:
                g.persist()
                last_persist = time.monotonic()
                if until <= send_pos:
                    # Idle: tell the secondary the primary is alive.
                    send_frame(sock, b"BEAT")
            pos = self._send_entries(sock, send_pos, until, epoch)
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
            self.state = DCM_LOGGING
            while not self.stopping and g.volume_change_reason() is not None:
                self.error = "waiting for {} to finish before the DCM " \
                    "replay".format(g.volume_change_reason())
                g.cond.wait(0.5)
            # After an SRL failure, not at once: each try of a failing
            # SRL would switch the link back to logging after a pass.
            while not self.stopping and \
                    time.monotonic() - g.srl_failed_at < SRL_RETRY:
                g.cond.wait(0.5)
            if self.stopping:
                return False
            self.error = None
            g.replay_join(self)
            epoch = self.epoch
            send_pos = self.acked_pos
            runs = list(self.dcm.runs())
            self.replay_total = self.dcm.count()
            self.replay_done = 0
            self.replays += 1
            self.state = DCM_REPLAY
            self.replay_acked = None
        # The stream's start is durable before anything of it is sent.
        g.persist()
        started = time.monotonic()
        log.info("group %s: replay to %s started: %d extents of %d bytes",
                 g.name, self.secondary, self.replay_total, g.granularity)
        send_json(sock, b"RBEG", {"extents": self.replay_total})
        if not self._wait_replay_reply(b"RBOK"):
            return False
        buf = bytearray(REPLAY_CHUNK)
        gran = g.granularity
        for vol, off, length in runs:
            end = off + length
            while off < end:
                n = min(REPLAY_CHUNK, end - off)
                view = memoryview(buf)[:n]
                with g.cond:
                    if self.epoch != epoch or self.stopping:
                        return not self.stopping
                    if self.state != DCM_REPLAY:
                        return False
                    until = g.srl.head_pos
                    g.volumes[vol].stack.below("replication").readinto(
                        view, off)
                pos = self._send_entries(sock, send_pos, until, epoch)
                if pos is None:
                    return True
                send_pos = pos
                if not any(view):
                    head = DATA.pack(vol, ZERO, off, n, 0)
                    send_frames(sock, [(b"RDAT", head, None)])
                else:
                    head = DATA.pack(vol, WRITE, off, n, zlib.crc32(view))
                    send_frames(sock, [(b"RDAT", head, bytes(view))])
                self.sent_bytes += n
                self.replay_done += (n + gran - 1) // gran
                off += n
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
        if not self._wait_replay_reply(b"RACK"):
            return False
        with g.cond:
            if self.epoch != epoch:
                return True
            self.dcm.clear()
            self.dcm_active = False
            self.logging = False
            self.holds_srl = True
            self.secondary_consistent = True
            self.state = REPLICATING
            self.replay_done = self.replay_total
            # The stream goes on from where the replay left it.
            self.stream_from = pos
        g.persist()
        log.info("group %s: replay to %s completed: %d extents in %.1f s",
                 g.name, self.secondary, self.replay_total,
                 time.monotonic() - started)
        return True

    def _wait_replay_reply(self, kind):
        g = self.group
        deadline = time.monotonic() + 120
        with g.cond:
            while self.replay_acked is None and not self.stopping and \
                    self.state == DCM_REPLAY and time.monotonic() < deadline:
                g.cond.wait(0.5)
            got = self.replay_acked
            self.replay_acked = None
        if got is None:
            return False
        if got[0] != kind or not got[1].get("ok", True):
            raise RemoteRefused(peer=self.secondary,
                                reason=got[1].get("message", "replay refused"))
        return True

    def wait_ack(self, seq):
        """Sync mode: wait until the secondary has seq (or the link fails,
        which the DCM then covers)."""
        g = self.group
        deadline = time.monotonic() + g.sync_timeout
        with g.cond:
            while self.acked_seq < seq and self.state == REPLICATING and \
                    not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = "the secondary did not acknowledge a " \
                        "write within {:.0f} s; changes are tracked in " \
                        "the DCM".format(g.sync_timeout)
                    g.to_logging(self)
                    break
                g.cond.wait(min(left, 0.5))

    def status(self):
        g = self.group
        lag_updates = max(0, g.next_seq - 1 - self.acked_seq) \
            if self.holds_srl else None
        lag_bytes = max(0, g.srl.head_pos - self.acked_pos) \
            if self.holds_srl else None
        return {"secondary": self.secondary, "mode": self.mode,
                "state": self.state, "attached": self.attached,
                "secondary_consistent": self.secondary_consistent,
                "acked_seq": self.acked_seq, "lag_updates": lag_updates,
                "lag_bytes": lag_bytes, "dcm_logging": self.logging,
                "dcm_extents": self.dcm.count() if self.dcm else None,
                "replay_total": self.replay_total,
                "replay_done": self.replay_done, "replays": self.replays,
                "bytes_sent": self.sent_bytes, "error": self.error,
                "stopped_error": self.stopped_error,
                "dcm_problem": self.dcm.problem if self.dcm else None}


class PrimaryGroup:
    """A replicated storage group on its primary node."""

    role = PRIMARY

    def __init__(self, files, record, volumes, volume_change=None,
                 sync_timeout=SYNC_TIMEOUT):
        self.files = files
        self.name = record["name"]
        self.record_base = record
        self.granularity = record["granularity"]
        self.volumes = volumes              # LogicalUnit objects, in order
        self.sizes = [lu.size for lu in volumes]
        self.generation = record["generation"]
        self.history = [list(h) for h in record["history"]]
        self.sync_timeout = sync_timeout
        self._volume_change = volume_change or (lambda: None)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.persist_lock = threading.Lock()
        self.waiters = 0
        self.closed = False
        self.problems = []
        self.seq_bound = 0
        self.srl_failed_at = -SRL_RETRY
        if os.path.exists(files.srl):
            self.srl = Srl(files.srl)
        else:
            self.srl = Srl(files.srl, record["srl_size"])
        tail = record.get("tail") or {"pos": 0, "seq": 1}
        corrupt = self.srl.scan(tail["pos"], tail["seq"])
        self.al = ActivityLog(files.activity_log(), self.granularity,
                              self.sizes)
        unclean = self.al.count() > 0
        if corrupt is not None and not unclean:
            self.problems.append("SRL entry {} (byte {}) fails its checksum; "
                                 "links that still need it stop there"
                                 .format(*corrupt))
        # Numbers of logged changes are found again in the SRL; numbers of
        # changes made while no link holds the SRL are saved ahead of use
        # (seq_bound), so a number handed out before a crash is never
        # handed out again.
        self.seq_bound = record.get("seq_bound", 1)
        self.next_seq = max(self.srl.next_seq, record.get("next_seq", 1),
                            self.seq_bound)
        self.since = None
        if record.get("since_promotion"):
            self.since = Dcm(files.since(), self.granularity, self.sizes)
        self.links = []
        for i, rec in enumerate(record.get("links", [])):
            self._add_link_object(i, rec, fresh=False)
        self.layers = []            # ReplicationLayer per volume
        if unclean:
            self._recover_unclean(corrupt)

    def _recover_unclean(self, corrupt):
        """The activity log has marks: the group was not closed, and a
        power cut may have kept data writes whose SRL entries it lost, or
        lost entries a secondary has (module notes)."""
        regions = list(self.al.runs())
        for link in self.links:
            if link.holds_srl:
                self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
                link.holds_srl = False
                link.logging = link.dcm_active = True
            if link.dcm_active:
                for vol, off, length in regions:
                    link.dcm.mark(vol, off, length)
        # Past every number the SRL could have held beyond what survived.
        self.next_seq += self.srl.capacity // ENTRY_SPACE + 1
        self.seq_bound = self.next_seq
        note = "not closed cleanly: {} active region(s) of the activity " \
            "log are replayed to every link{}".format(
                len(regions), "" if corrupt is None else
                " (the SRL's tail was torn at entry {})".format(corrupt[0]))
        self.problems.append(note)
        log.warning("group %s: %s", self.name, note)
        # The record (links logging, the new numbers) before the log is
        # let go: a crash in between recovers again.
        self.persist()
        self.al.clear()

    def _add_link_object(self, index, rec, fresh):
        link = Link(self, index, rec)
        link.dcm = Dcm(self.files.dcm(index), self.granularity, self.sizes,
                       fresh_value=0 if fresh else None)
        if not fresh and not link.dcm_active and link.dcm.count():
            # The DCM is written ahead and is the truth: bits there mean
            # the link was logging, whatever the record says.
            link.dcm_active = link.logging = True
            link.holds_srl = False
            link.was_holding = True
        if link.dcm.problem:
            self.problems.append("link {}: {}".format(link.secondary,
                                                      link.dcm.problem))
            link.dcm_active = link.logging = True
            link.holds_srl = False
        if not fresh and link.dcm_active and link.was_holding:
            # Entries streamed but not acknowledged before the stop: the
            # DCM must cover them now that the link logs again.
            self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
        self.links.append(link)
        return link

    # Wiring.

    def attach(self):
        for vol, lu in enumerate(self.volumes):
            self.layers.append(ReplicationLayer(self, vol))
            lu.stack.set("replication", self.layers[-1])

    def detach(self):
        for lu, layer in zip(self.volumes, self.layers):
            lu.stack.remove("replication", layer)
        self.layers = []

    def start(self):
        for link in self.links:
            if link.attached and not link.stopped_error:
                link.start()

    def close(self):
        self.closed = True
        for link in self.links:
            link.stop()
        try:
            self.persist()
        except (OSError, errors.Error) as e:
            log.error("group %s: could not save its record: %s", self.name, e)
        for link in self.links:
            link.dcm.close()
        if self.since is not None:
            self.since.close()
        try:
            self.clear_activity_log()
        except (OSError, errors.Error) as e:
            log.error("group %s: could not clear its activity log: %s",
                      self.name, e)
        self.al.close()
        self.srl.close()

    def clear_activity_log(self):
        """(Stop and close.)  Make every SRL entry durable and empty the
        activity log, so that a stop that ends in nbdkit's SIGKILL (it
        waits for connected clients) is not taken for a crash at the next
        start.  A write after this marks its region again."""
        with self.lock:
            if any(l.holds_srl for l in self.links):
                self.srl.sync()
            self.al.clear()

    def volume_change_reason(self):
        return self._volume_change()

    # Persistence.

    def record(self):
        rec = dict(self.record_base)
        holders = [(l.acked_pos, l.acked_seq + 1) for l in self.links
                   if l.holds_srl]
        tail = min(holders) if holders else (self.srl.head_pos,
                                             self.next_seq)
        rec.update({"role": PRIMARY, "generation": self.generation,
                    "history": self.history, "next_seq": self.next_seq,
                    "seq_bound": self.seq_bound,
                    "tail": {"pos": tail[0], "seq": tail[1]},
                    "links": [l.record() for l in self.links],
                    "since_promotion": self.since is not None})
        return rec, {l: l.acked_pos for l in self.links}

    def persist(self, locked=False):
        """Save the record (link positions, next sequence number); then
        the SRL space before the saved positions may be reused."""
        # Lock order: the group lock, then persist_lock (taken before the
        # group lock is let go, so records are written in snapshot order).
        try:
            self._persist(locked)
        except _SrlSyncFailed as e:
            # Not saved: the positions would point past what is durable.
            if locked:
                self.srl_failed(e.__cause__)
            else:
                with self.lock:
                    self.srl_failed(e.__cause__)

    def _persist(self, locked):
        def snapshot():
            self.persist_lock.acquire()
            rec, saved = self.record()
            held = any(l.holds_srl for l in self.links)
            self.al.sweep()
            return rec, saved, held
        if locked:
            rec, saved, held = snapshot()
        else:
            with self.lock:
                rec, saved, held = snapshot()
        try:
            # The SRL must hold every entry up to the positions saved.
            if held:
                try:
                    self.srl.sync()
                except OSError as e:
                    raise _SrlSyncFailed() from e
            self.al.sweep_ok = True
            self.files.save(rec)
            for link, pos in saved.items():
                link.saved_pos = pos
        finally:
            self.persist_lock.release()

    # Data path.

    def change(self, vol, kind, offset, length, data, apply):
        sync_links = None
        with self.lock:
            seq = self.next_seq
            self.next_seq = seq + 1
            logged = False
            try:
                for link in self.links:
                    if link.logging:
                        link.dcm.mark(vol, offset, length)
                if self.since is not None:
                    self.since.mark(vol, offset, length)
                if any(l.holds_srl for l in self.links):
                    self._make_room(Srl.space(length, kind), vol, offset,
                                    length)
                if any(l.holds_srl for l in self.links):
                    self.al.mark(vol, offset, length)
                    payload = data if kind == WRITE else None
                    try:
                        self.srl.append(seq, vol, kind, offset, length,
                                        payload,
                                        entry_crc(seq, vol, kind, offset,
                                                  length, payload))
                        logged = True
                    except OSError as e:
                        self.srl_failed(e, (vol, offset, length))
            except BaseException:
                # A map could not be written: the change is refused before
                # it is made, and its number was never logged -- giving it
                # out again keeps the SRL free of gaps (a scan stops at one).
                self.next_seq = seq
                raise
            if logged:
                sync_links = [l for l in self.links if l.mode == "sync"
                              and l.state == REPLICATING]
            elif seq >= self.seq_bound:
                # An unlogged number: reserve the next ones durably first.
                self.seq_bound = seq + SEQ_RESERVE
                self.persist(locked=True)
            try:
                apply()
            except OSError as e:
                if logged:
                    # The secondaries would apply what the volume refused:
                    # they get the region's real content by a replay.
                    self._all_to_dcm(
                        "a write to volume {} failed after it was logged "
                        "({}); the region is replayed".format(
                            self.volumes[vol].name, e), (vol, offset, length))
                    sync_links = None
                raise
            if self.waiters:
                self.cond.notify_all()
        if sync_links:
            for link in sync_links:
                link.wait_ack(seq)

    def flush_log(self):
        with self.lock:
            dirty = self.srl.dirty
        if dirty:
            try:
                self.srl.sync()
            except OSError as e:
                with self.lock:
                    self.srl_failed(e)

    def srl_failed(self, e, change=None):
        """(Under the lock.)  The SRL cannot be read, written or made
        durable: every link that holds it switches to DCM logging with what
        it has not acknowledged (and the change that failed to be logged),
        so the host write or flush goes on and nothing is lost for
        replication; the links replay once the SRL works again (after
        SRL_RETRY)."""
        self.srl_failed_at = time.monotonic()
        self._all_to_dcm("the SRL failed ({}); changes are tracked in the "
                         "DCM and replayed when it works again".format(e),
                         change)

    def _all_to_dcm(self, msg, change=None):
        """(Under the lock.)  Every link that holds the SRL switches to DCM
        logging with what it has not acknowledged and `change`; saved
        without syncing the SRL."""
        log.error("group %s: %s", self.name, msg)
        for link in self.links:
            if not link.holds_srl:
                continue
            try:
                self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
            except OSError:
                link.dcm.mark_all()
            if change is not None:
                link.dcm.mark(*change)
            link.error = msg
            self._stop_holding(link)
        # No link holds the SRL now: the record is saved without syncing it.
        self.persist(locked=True)

    def _tail(self):
        holders = [l.saved_pos for l in self.links if l.holds_srl]
        return min(holders) if holders else self.srl.head_pos

    def _fits(self, need):
        return self.srl.end_after(self.srl.head_pos, need) - self._tail() \
            <= self.srl.capacity

    def _make_room(self, need, vol, offset, length):
        """Called under the lock before an append: reclaim acknowledged
        space, else switch the links that hold it the longest to DCM
        logging (and mark this change for them)."""
        if self._fits(need):
            return
        self.persist(locked=True)
        while not self._fits(need):
            holders = [l for l in self.links if l.holds_srl]
            if not holders:
                return
            link = min(holders, key=lambda l: l.saved_pos)
            log.warning("group %s: the SRL is full; link %s switches to DCM "
                        "logging", self.name, link.secondary)
            link.error = "the SRL overflowed (the link could not keep up); " \
                "changes are tracked in the DCM and replayed"
            self.to_logging(link)
            link.dcm.mark(vol, offset, length)
            self.persist(locked=True)

    def _mark_pending(self, link, from_pos, seq):
        """Mark the SRL entries from from_pos (sequence number seq) to the
        head in link's DCM."""
        pos = from_pos
        while pos < self.srl.head_pos:
            e = self.srl.read(pos, with_data=False)
            if e is None or e[0] != seq:
                break
            seq += 1
            vol, kind, off, length = e[1:5]
            if vol < len(self.sizes) and 0 <= off and \
                    off + length <= self.sizes[vol]:
                link.dcm.mark(vol, off, length)
            else:
                # An entry too damaged to say what it changed.
                link.dcm.mark_all()
                break
            pos = e[7]
        if pos < self.srl.head_pos:
            link.dcm.mark_all()

    def to_logging(self, link):
        """(Under the lock.)  The link stops holding the SRL: what it has
        not acknowledged goes into its DCM, and changes are marked there
        from now on."""
        if link.logging:
            return
        if link.holds_srl:
            self._mark_pending(link, link.acked_pos, link.acked_seq + 1)
        self._stop_holding(link)
        # Saved now: a record that still says the link streams would,
        # after a crash, ignore the DCM bits set from here on.
        self.persist(locked=True)

    def _stop_holding(self, link):
        link.holds_srl = False
        link.logging = True
        link.dcm_active = True
        link.epoch += 1
        if link.state in (REPLICATING, DCM_REPLAY):
            link.state = DCM_LOGGING
        self.cond.notify_all()

    def replay_join(self, link):
        """(Under the lock.)  The link joins the SRL stream at its head; the
        DCM is static from here on (module notes)."""
        link.logging = False
        link.holds_srl = True
        link.acked_pos = link.saved_pos = self.srl.head_pos
        link.acked_seq = self.next_seq - 1
        # Changes are logged again from here on: no number above next_seq
        # was handed out unlogged (the caller saves this).
        self.seq_bound = self.next_seq
        link.last_sent_seq = link.acked_seq
        link.batches = []
        link.epoch += 1

    def skip_applied(self, pos, applied):
        if not applied:
            return pos
        while pos < self.srl.head_pos:
            e = self.srl.read(pos, with_data=False)
            if e is None or e[0] > applied:
                break
            pos = e[7]
        return pos

    # Links and the handshake.

    def hello(self, token):
        return {"token": token, "group": self.name,
                "granularity": self.granularity,
                "volumes": [{"lu": lu.name, "size": lu.size}
                            for lu in self.volumes],
                "generation": self.generation, "history": self.history,
                "last_seq": self.next_seq - 1}

    def accept_secondary(self, link, reply):
        """Decide, from the secondary's handshake reply, how the link goes
        on: stream from its position, or replay its DCM.  False (with the
        link's state set) when replication must not start."""
        theirs = reply.get("history") or []
        their_last = int(reply.get("last_seq") or 0)
        with self.cond:
            link.batches = []
            link.stream_from = None
            # (A node that is itself primary refuses the hello instead.)
            diverged = False
            if theirs:
                diverged, _ = history_diverges(self.history,
                                               self.next_seq - 1, theirs,
                                               their_last)
            if diverged and not link.discard_secondary:
                link.state = DIVERGED
                link.error = (
                    "split brain: {} wrote updates of group {!r} after "
                    "this node took over (generation {} vs {}); nothing "
                    "is sent until you choose: `clonectl rsg attach {} "
                    "--secondary {} --discard-secondary-changes` makes "
                    "this node win (only the diverged regions are copied), "
                    "or demote this node".format(
                        link.secondary, self.name, theirs[-1][0],
                        self.generation, self.name, link.secondary))
                link.refused = link.error
                return False
            if not diverged:
                # The secondary has taken this side's history (a replay
                # began there): a choice to discard its changes is used.
                # Until then it holds, across lost connections.
                link.discard_secondary = False
            same_line = bool(theirs) and theirs[-1][0] == self.generation
            if reply.get("diverged") or reply.get("diverged_all"):
                # Regions the other node changed on its own (it was a
                # primary, or was restored while detached).
                self._seed_from(link, reply, with_since=not same_line)
                link.seeded = True
            if not link.seeded:
                # First contact: what may differ?
                if theirs and (not same_line or diverged):
                    self._seed_from(link, reply)
                elif not (same_line and reply.get("consistent") and
                          link.holds_srl and
                          int(reply.get("applied_seq") or 0) >=
                          link.acked_seq):
                    link.dcm.mark_all()
                link.seeded = True
            elif diverged or (theirs and not same_line):
                self._seed_from(link, reply)
            elif link.holds_srl:
                applied = int(reply.get("applied_seq") or 0)
                if applied < link.acked_seq or not reply.get("consistent"):
                    # It lost updates it had acknowledged, or a replay was
                    # broken off there: replay (everything, if lost).
                    if applied < link.acked_seq:
                        link.dcm.mark_all()
                    self.to_logging(link)
            if link.logging:
                link.state = DCM_LOGGING
        self.persist()
        return True

    def _seed_from(self, link, reply, with_since=True):
        """(Under the lock.)  A secondary on another line of history: copy
        what this node wrote since its promotion and what the other node
        wrote that this one never got."""
        if not with_since:
            pass
        elif self.since is None:
            link.dcm.mark_all()
        else:
            link.dcm.bits = bytearray(a | b for a, b in
                                      zip(link.dcm.bits, self.since.bits))
            link.dcm.file.reset(link.dcm.bits)
        for vol, off, length in reply.get("diverged") or []:
            if 0 <= vol < len(self.sizes):
                a, b = link.dcm.range_of(vol, off, length)
                maps.set_range(link.dcm.bits, a, b)
        if reply.get("diverged_all"):
            link.dcm.bits[:] = b"\x01" * link.dcm.extents
        link.dcm.file.reset(link.dcm.bits)
        if not link.logging:
            self.to_logging(link)

    def add_link(self, secondary, mode, token_file):
        if any(l.secondary == secondary for l in self.links):
            raise ReplicationError(name=self.name, reason="it already has a "
                                   "link to {}".format(secondary))
        with self.cond:
            index = max([l.index for l in self.links] + [-1]) + 1
            rec = {"secondary": secondary, "mode": mode,
                   "token_file": token_file, "attached": True,
                   "dcm_active": True, "seeded": False}
            link = self._add_link_object(index, rec, fresh=True)
        self.persist()
        link.start()
        return link

    def remove_link(self, link):
        link.stop()
        with self.cond:
            self.links.remove(link)
        link.dcm.close()
        self.files.remove([self.files.dcm(link.index)])
        self.persist()

    def link(self, secondary):
        for l in self.links:
            if l.secondary == secondary:
                return l
        raise ReplicationError(name=self.name, reason="no link to {}"
                               .format(secondary))

    def detach_link(self, link):
        link.stop()
        try:
            with self.cond:
                link.attached = False
                self.to_logging(link)
                link.state = DETACHED
                link.error = None
            self.persist()
        except BaseException:
            # Not saved (a full state directory): the link stays attached,
            # as the record says; it logs to its DCM now and replays it.
            with self.cond:
                link.attached = True
                link.state = CONNECTING
            link.start()
            raise

    def attach_link(self, link, discard_secondary=False):
        fields = ("attached", "stopped_error", "discard_secondary", "error",
                  "state")
        with self.cond:
            before = {f: getattr(link, f) for f in fields}
            link.attached = True
            link.stopped_error = None
            link.discard_secondary = bool(discard_secondary)
            link.error = None
            link.state = CONNECTING
        try:
            self.persist()
        except BaseException:
            # Not saved (a full state directory): still detached, as the
            # record says.
            with self.cond:
                for f, v in before.items():
                    setattr(link, f, v)
            raise
        link.start()

    def begin_volume_change(self, vol, region_bits, granularity, what):
        """Before a volume-changing operation on volume vol (module notes):
        every link logs, and the operation's region map is in every DCM."""
        with self.cond:
            for link in self.links:
                self.to_logging(link)
                link.dcm.merge(vol, region_bits, granularity)
                link.error = "{} changes {}; its regions are replayed once " \
                    "it has finished".format(what, self.volumes[vol].name)
        self.persist()

    def status(self):
        with self.lock:
            used = self.srl.head_pos - min(
                [l.acked_pos for l in self.links if l.holds_srl] +
                [self.srl.head_pos])
            return {"name": self.name, "role": PRIMARY,
                    "generation": self.generation, "history": self.history,
                    "granularity": self.granularity,
                    "volumes": [{"lu": lu.name, "size": lu.size}
                                for lu in self.volumes],
                    "last_seq": self.next_seq - 1,
                    "srl": {"size": self.srl.capacity, "used": used,
                            "used_percent": round(100.0 * used /
                                                  self.srl.capacity, 1)},
                    "activity_log_regions": self.al.count(),
                    "links": [l.status() for l in self.links],
                    "problems": self.problems}


# ---------------------------------------------------------------- secondary

STAGE_MAGIC = b"CLNSTG01"
STAGE_HEADER = struct.Struct("<8sBQQII")   # magic state first last count crc
STAGED, APPLIED = 1, 2


class SecondaryGroup:
    """A replicated storage group on a secondary node (module notes)."""

    role = SECONDARY

    def __init__(self, files, record, volumes, protect=None, release=None,
                 volume_change=None):
        self.files = files
        self.name = record["name"]
        self.record_base = record
        self.granularity = record["granularity"]
        self.volumes = volumes
        self.sizes = [lu.size for lu in volumes]
        self.history = [list(h) for h in record.get("history", [])]
        self.last_seq = record.get("last_seq", 0)
        self.applied_seq = record.get("applied_seq", 0)
        self.consistent = record.get("consistent", False)
        self.protected = record.get("protected", False)
        self.primary = record.get("primary")
        self.diverged = record.get("diverged")       # set by demote
        self.protect = protect or (lambda lu: None)
        self.release = release or (lambda lu: None)
        # A volume-changing operation (restore, reverse sync) running here,
        # described, or None: a primary is refused meanwhile.
        self.volume_change = volume_change or (lambda: None)
        # Changes of the volumes made here being started (a restore until
        # it runs, a rollback): under session_lock, like `connection`.
        self.local_changes = []
        self.layers = []                    # _Guard per volume
        self.lock = threading.Lock()        # apply vs. host reads
        self.session_lock = threading.Lock()
        self.connection = None
        self.serving = None         # the thread serving self.connection
        self.connected_since = None
        self.reason = record.get("reason") or "never synchronized"
        self.error = None
        self.batches = 0
        self.slot = 0
        self.closed = False
        self._recover_stage()

    # Stage slots.

    def _read_slot(self, i):
        try:
            with open(self.files.stage[i], "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) < STAGE_HEADER.size:
            return None
        magic, st, first, last, count, crc = STAGE_HEADER.unpack_from(raw)
        body = raw[STAGE_HEADER.size:]
        if magic != STAGE_MAGIC or st not in (STAGED, APPLIED):
            return None
        # The declared body is what the crc covers; a longer file holds
        # leftovers of an earlier, larger batch.
        entries, pos = [], 0
        for _ in range(count):
            if pos + ENTRY.size > len(body):
                return None
            seq, vol, kind, off, length, ecrc = ENTRY.unpack_from(body, pos)
            pos += ENTRY.size
            data = None
            if kind == WRITE:
                data = body[pos:pos + length]
                pos += length
            entries.append((seq, vol, kind, off, length, ecrc, data))
        if zlib.crc32(body[:pos]) != crc:
            return None
        return {"state": st, "first": first, "last": last,
                "entries": entries, "slot": i}

    def _recover_stage(self):
        """Batches are staged one at a time, each applied before the next
        is staged: only the newest valid slot can be unapplied."""
        slots = [s for s in (self._read_slot(0), self._read_slot(1)) if s]
        if not slots or not self.consistent:
            return
        newest = max(slots, key=lambda s: s["last"])
        self.slot = 1 - newest["slot"]
        if newest["last"] <= self.applied_seq:
            return
        if newest["state"] == STAGED:
            log.info("group %s: applying the staged batch %d-%d again "
                     "(one atomic unit)", self.name, newest["first"],
                     newest["last"])
            self._apply_entries(newest["entries"])
            self._flush_volumes()
            self._mark_applied(self.files.stage[newest["slot"]])
        self.applied_seq = newest["last"]
        self.persist()

    def _stage(self, entries, first, last):
        body = b"".join(ENTRY.pack(*e[:6]) + (bytes(e[6]) if e[6] is not
                                              None else b"") for e in entries)
        head = STAGE_HEADER.pack(STAGE_MAGIC, STAGED, first, last,
                                 len(entries), zlib.crc32(body))
        path = self.files.stage[self.slot]
        new = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwritev(fd, [head, body], 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if new:
            # The batch is acknowledged next: a power cut must not take the
            # new file's entry and the batch with it.
            fsutil.fsync_dir(os.path.dirname(path))
        return path

    def _mark_applied(self, path):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes([APPLIED]), 8)
        finally:
            os.close(fd)

    def _clear_stage(self):
        fsutil.remove_durably(self.files.stage)

    # Applying.

    def attach(self):
        for lu in self.volumes:
            self.layers.append(_Guard(self, lu))
            lu.stack.set("guard", self.layers[-1])

    def detach(self):
        for lu, layer in zip(self.volumes, self.layers):
            lu.stack.remove("guard", layer)
        self.layers = []

    def _backend(self, vol):
        # Below the read guard and above everything else: a clone or a
        # session of the volume sees a replicated change as a host write.
        return self.volumes[vol].stack.below("guard")

    def _apply_one(self, vol, kind, off, length, data):
        b = self._backend(vol)
        if kind == WRITE:
            b.write(memoryview(data), off)
        elif kind == ZERO:
            b.zero(off, length)
        else:
            b.trim(off, length)

    def _apply_entries(self, entries):
        with self.lock:
            for seq, vol, kind, off, length, crc, data in entries:
                self._apply_one(vol, kind, off, length, data)

    def _flush_volumes(self):
        for vol in range(len(self.volumes)):
            self._backend(vol).flush()

    def persist(self):
        rec = dict(self.record_base)
        rec.update({"role": SECONDARY, "history": self.history,
                    "last_seq": max(self.last_seq, self.applied_seq),
                    "applied_seq": self.applied_seq,
                    "consistent": self.consistent,
                    "protected": self.protected, "primary": self.primary,
                    "diverged": self.diverged, "reason": self.reason})
        self.files.save(rec)

    # Host reads.

    @contextlib.contextmanager
    def local_change(self, what):
        """A change of the volumes made on this node (a restore, a reverse
        sync, a rollback): refused while a primary is connected, and no
        primary is accepted while it is being made; a restore that runs is
        seen by `volume_change` from then on."""
        with self.session_lock:
            if self.connection is not None:
                raise GroupBusy(name=self.name, reason="{} is refused: this "
                                "node is a secondary and its primary is "
                                "replicating; detach the link on the primary "
                                "first".format(what))
            self.local_changes.append(what)
        try:
            yield
        finally:
            with self.session_lock:
                self.local_changes.remove(what)

    def refuse_primary(self):
        """Under session_lock: why a primary may not connect now, or None.
        Its batches would land beside a local change's own writes; the
        primary tries again and replays what the change did once it has
        finished."""
        busy = self.local_changes[0] if self.local_changes \
            else self.volume_change()
        if busy:
            return "{} is running on this secondary; replication resumes " \
                "when it has finished".format(busy)
        return None

    def check_readable(self, lu):
        if not self.consistent:
            hint = "; its last consistent image is readable as " \
                "{}@protected-{}".format(lu.name, lu.name) \
                if self.protected else ""
            raise ReplicaUnavailable(name=lu.name, group=self.name,
                                     reason=self.reason, hint=hint)


    # The session with a primary.

    def handshake(self, hello):
        """Check a primary's hello; return the reply."""
        vols = hello.get("volumes") or []
        mine = [{"lu": lu.name, "size": lu.size} for lu in self.volumes]
        if vols != mine:
            raise ReplicationError(
                name=self.name, reason="the primary's volumes {} do not match "
                "this secondary's {}".format(
                    ", ".join("{lu}({size})".format(**v) for v in vols),
                    ", ".join("{lu}({size})".format(**v) for v in mine)))
        reply = {"ok": True, "role": SECONDARY,
                 "consistent": self.consistent,
                 "applied_seq": self.applied_seq, "history": self.history,
                 "last_seq": max(self.last_seq, self.applied_seq)}
        if self.diverged is not None:
            reply["diverged"] = self.diverged.get("runs", [])
            reply["diverged_all"] = self.diverged.get("all", False)
        return reply

    def serve(self, sock, hello, peer):
        """Receive from one primary until the connection ends."""
        self.primary = peer
        theirs = [list(h) for h in hello.get("history") or []]
        self.connected_since = time.time()
        batch = []
        replaying = False
        try:
            while not self.closed:
                kind, payload = recv_frame(sock)
                if kind == b"ENTR":
                    seq, vol, k, off, length, crc = \
                        ENTRY.unpack_from(payload)
                    data = payload[ENTRY.size:] if k == WRITE else None
                    self._check_entry(seq, vol, k, off, length, crc, data)
                    if replaying or not self.consistent:
                        with self.lock:
                            self._apply_one(vol, k, off, length, data)
                    elif seq > self.applied_seq:
                        batch.append((seq, vol, k, off, length, crc, data))
                elif kind == b"BEAT":
                    continue
                elif kind == b"CMIT":
                    seq, = SEQ.unpack(payload)
                    if replaying or not self.consistent:
                        self._flush_volumes()
                        send_frame(sock, b"ACKS", SEQ.pack(seq))
                        continue
                    if batch:
                        path = self._stage(batch, batch[0][0], batch[-1][0])
                    send_frame(sock, b"ACKS", SEQ.pack(seq))
                    if batch:
                        self._apply_entries(batch)
                        self._flush_volumes()
                        self._mark_applied(path)
                        self.slot = 1 - self.slot
                        self.applied_seq = batch[-1][0]
                        self.batches += 1
                        batch = []
                    self.last_seq = max(self.last_seq, seq)
                    if self.history != theirs:
                        self.history = theirs
                        self.persist()
                elif kind == b"RBEG":
                    replaying = True
                    self._begin_replay(theirs)
                    send_json(sock, b"RBOK", {"ok": True})
                elif kind == b"RDAT":
                    vol, k, off, length, crc = DATA.unpack_from(payload)
                    data = payload[DATA.size:] if k == WRITE else None
                    self._check_data(vol, k, off, length, crc, data)
                    with self.lock:
                        self._apply_one(vol, k, off, length, data)
                elif kind == b"REND":
                    seq, = SEQ.unpack(payload)
                    self._end_replay(seq, theirs)
                    replaying = False
                    send_json(sock, b"RACK", {"ok": True})
                else:
                    raise errors.ProtocolError(reason="unknown frame {!r}"
                                               .format(kind))
        except errors.Error as e:
            if self.closed:
                # The target closing under this session (its LUs go away):
                # no FAIL, which would stop the primary's link for good;
                # the primary sees the connection drop and comes back.
                log.info("group %s: session ended by the close: %s",
                         self.name, e)
                return
            self.error = str(e)
            log.error("group %s: %s", self.name, e)
            if not isinstance(e, (ReplicationError, errors.ProtocolError)):
                # A failure of this node's own (a state that cannot be
                # saved, a disk gone): not a refusal of the primary's
                # updates, so no FAIL, which would stop its link for good;
                # the connection drops and the primary tries again.
                return
            # Refused updates (checksum, range, history): the primary stops
            # with the message.
            try:
                send_json(sock, b"FAIL", {"message": str(e)})
            except OSError:
                pass
        finally:
            self.connected_since = None

    def _check_entry(self, seq, vol, kind, off, length, crc, data):
        if vol >= len(self.sizes) or off + length > self.sizes[vol] or \
                (kind == WRITE and len(data) != length) or \
                entry_crc(seq, vol, kind, off, length, data) != crc:
            raise ReplicationError(
                name=self.name, reason="update {} fails its checksum or "
                "range check; replication stopped, nothing of its batch "
                "was applied".format(seq))

    def _check_data(self, vol, kind, off, length, crc, data):
        if vol >= len(self.sizes) or off + length > self.sizes[vol] or \
                (kind == WRITE and (len(data) != length or
                                    zlib.crc32(data) != crc)):
            raise ReplicationError(
                name=self.name, reason="replay data at {} of volume {} fails "
                "its checksum or range check; replication stopped".format(
                    off, vol))

    def _begin_replay(self, theirs):
        log.info("group %s: replay from the primary started", self.name)
        if self.consistent:
            # Keep the last consistent image readable and restorable.
            for lu in self.volumes:
                self.protect(lu)
            self.protected = True
        with self.lock:
            self.consistent = False
            self.reason = "a DCM replay from the primary is running"
        self.diverged = None
        self.history = theirs
        self._clear_stage()
        self.persist()

    def _end_replay(self, seq, theirs):
        self._flush_volumes()
        with self.lock:
            self.applied_seq = seq
            self.last_seq = seq
            self.history = theirs
            self.consistent = True
            self.reason = None
        self._clear_stage()
        self.persist()
        log.info("group %s: replay from the primary completed: consistent "
                 "at sequence %d", self.name, seq)
        if self.protected:
            for lu in self.volumes:
                self.release(lu)
            self.protected = False
            self.persist()

    def status(self):
        return {"name": self.name, "role": SECONDARY,
                "granularity": self.granularity,
                "volumes": [{"lu": lu.name, "size": lu.size}
                            for lu in self.volumes],
                "consistent": self.consistent,
                "reason": None if self.consistent else self.reason,
                "applied_seq": self.applied_seq, "history": self.history,
                "generation": self.history[-1][0] if self.history else None,
                "primary": self.primary,
                "connected": self.connected_since is not None,
                "protected": self.protected, "batches": self.batches,
                "error": self.error}

    def close(self):
        # Under the session lock: a connection being set up sees `closed`
        # (ReplicaServer._serve) or is shut down here, never neither.
        with self.session_lock:
            self.closed = True
            conn = self.connection
        if conn is not None:
            shutdown_socket(conn)


class _Guard(iostack.Layer):
    """A secondary volume's guard, the outermost layer of its LU's I/O
    stack: a read waits for the batch being applied and is refused while
    the volume is inconsistent; a write from above is refused, whatever
    connection it came on (one opened before the LU became a secondary's
    included): the volume is written by replication only, which enters
    below the guard."""

    def __init__(self, group, lu):
        self.group = group
        self.lu = lu

    def intercepts(self):
        return {"readinto": self.readinto, "write": self.refuse,
                "zero": self.refuse, "trim": self.refuse}

    def readinto(self, buf, offset):
        with self.group.lock:
            self.group.check_readable(self.lu)
            self.inner.readinto(buf, offset)

    def refuse(self, *args, **kwargs):
        raise errors.ReadOnly(name=self.lu.name)


class ReplicaServer:
    """The replication port of a secondary: one thread per primary
    connection; the hello is checked (token, group, volumes, roles) by
    the target's `accept(hello, peer)`, which returns the group to serve."""

    def __init__(self, bind, port, token, accept,
                 hello_timeout=limits.HELLO_TIMEOUT,
                 max_connections=MAX_PRIMARIES,
                 max_unauthenticated=MAX_UNAUTHENTICATED):
        self.token = token
        self.accept = accept
        # Before the token is checked a peer may send one hello of at most
        # MAX_HELLO bytes within hello_timeout, on one of at most
        # max_unauthenticated connections: what a peer without the token
        # can make this process hold is small and brief.
        self.hello_timeout = hello_timeout
        self.gate = limits.Gate("replication port", max_connections,
                                max_unauthenticated)
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind
                                  else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind, port))
        self.sock.listen(16)
        self.thread = None
        self.connections = []       # threads serving primaries
        self.stopping = False

    def start(self):
        self.thread = threading.Thread(target=self._accept_loop,
                                       name="replica-server", daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.stopping:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.1)
                continue
            if self.stopping:
                conn.close()
                return
            if not self.gate.enter(addr[0]):
                conn.close()
                continue
            th = threading.Thread(target=self._serve, args=(conn, addr),
                                  daemon=True, name="replica-conn")
            self.connections = [t for t in self.connections
                                if t.is_alive()] + [th]
            th.start()

    def _serve(self, conn, addr):
        import hmac
        peer = "{}:{}".format(addr[0], addr[1])
        group = None
        authenticated = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kind, payload = recv_frame(
                conn, MAX_HELLO, time.monotonic() + self.hello_timeout)
            conn.settimeout(30)
            if kind != b"HELO":
                raise errors.ProtocolError(reason="expected a hello")
            hello = json.loads(payload)
            if not isinstance(hello, dict):
                raise errors.ProtocolError(reason="the hello is not an object")
            token = hello.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                    token.encode(), self.token.encode()):
                raise ReplicationError(name=hello.get("group", "?"),
                                       reason="invalid token; nothing was "
                                              "done")
            authenticated = True
            self.gate.authenticated()
            group = self.accept(hello, addr[0])
            with group.session_lock:
                if group.closed:
                    # The target is closing: no answer that the primary
                    # could take for a refusal; it connects again later.
                    group = None
                    return
                busy = group.refuse_primary()
                if busy:
                    busy_group, group = group, None
                    raise GroupBusy(name=busy_group.name, reason=busy)
                old, old_thread = group.connection, group.serving
                if old is not None:
                    # A primary that reconnects (after a crash or a cut)
                    # takes over from its dead connection.
                    shutdown_socket(old)
                group.connection = conn
                group.serving = threading.current_thread()
            # One session at a time: the old one may still be applying a
            # batch or ending a replay; the handshake must see its result,
            # and two sessions must never write the volumes side by side.
            if old_thread is not None:
                old_thread.join(60)
                if old_thread.is_alive():
                    raise ReplicationError(
                        name=group.name, reason="the previous session with "
                        "a primary has not ended within 60 s; try again")
            send_json(conn, b"HRPL", group.handshake(hello))
            # A primary that goes silent (a cut link) is dropped, so the
            # secondary can be promoted; idle primaries send heartbeats.
            conn.settimeout(IDLE_TIMEOUT)
            group.serve(conn, hello, addr[0])
        except errors.Error as e:
            if not authenticated:
                log.warning("replication hello from %s refused: %s",
                            addr[0], e)
            try:
                send_json(conn, b"HRPL", {"ok": False, "message": str(e)})
            except OSError:
                pass
        except socket.timeout as e:
            if authenticated:
                log.info("replication connection from %s ended: %s", peer, e)
            else:
                log.warning("replication connection from %s closed: no "
                            "hello within %.0f s", addr[0],
                            self.hello_timeout)
        except (OSError, ConnectionError, ValueError, struct.error) as e:
            if authenticated:
                log.info("replication connection from %s ended: %s", peer, e)
            else:
                log.warning("replication connection from %s closed before "
                            "its hello was read: %s", addr[0], e)
        finally:
            self.gate.leave(authenticated)
            if group is not None:
                with group.session_lock:
                    if group.connection is conn:
                        group.connection = None
                        group.serving = None
            try:
                conn.close()
            except OSError:
                pass

    def stop(self):
        self.stopping = True
        # close() alone does not wake a thread blocked in accept().
        shutdown_socket(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(5)

    def join(self, timeout=10):
        """Wait for the threads serving primaries (once their groups have
        shut their connections down): they change the target's sessions
        (protected images) and must be done before it closes."""
        for th in self.connections:
            th.join(timeout)
