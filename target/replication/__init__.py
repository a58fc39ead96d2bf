"""Replication of storage groups to secondary nodes.

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
whole persist interval (the SRL sync and the volume flush of the previous
persist cover its writes: a volume's writes a secondary applied must not
be lost here with their region gone from the log).  A clean close clears
it.  Marks found at start-up mean the group stopped uncleanly: every link
that streamed the SRL switches to DCM logging with its unacknowledged
entries and every active region ORed into its DCM (so it replays them),
and sequence numbers jump past anything the lost SRL tail could have
handed out (a secondary may have applied entries the
primary no longer has; a reused number would be skipped there).  A kill -9
pays a replay of the active regions it did not need; a torn SRL tail is no
longer taken for corruption then.

Links.  One `Link` per secondary, each with a thread that reads the SRL at
its own pace and sends entries in order, in batches closed by a commit
frame (the newest entries come from memory: the SRL keeps them, so a
link that keeps up reads nothing back).  After CMIT the secondary
acknowledges a batch (ACKS) once it is durable in its staging log.  A
sync link closes most batches with CAPL instead: the secondary applies the batch and acknowledges it (APLD) with
nothing made durable, so a sync write costs one round trip and one write
there rather than two fdatasyncs; its durability follows the host's
flushes, as a local disk's does.  A host flush (and a FUA write, which
the I/O stack turns into one) waits until every sync link's secondary has
acknowledged a CMIT that covers each change before it, and a link sends
CMIT on its own after VOLATILE_BATCHES batches, VOLATILE_BYTES or
PERSIST_INTERVAL (a CMIT makes every batch before it durable: the
secondary flushes its volumes first).  `acked_seq`/`acked_pos` are the
durable position, `held_seq` what the secondary applied: the SRL keeps
every entry after the durable position, so a secondary that lost what it
had only applied gets it again.  Such a secondary cannot tell which of
those updates reached its disk (a power cut keeps some pages and not
others): its record says it may hold some (`volatile`, saved before the
first CAPL apply of a session and cleared by the flush at the session's
end, or when the primary idles after a CMIT), and it starts
inconsistent; the primary then replays the regions of
the changes after the durable position, not the volume.  Async links send
CMIT only.  An entry is freed once every link that holds the SRL has it
durably (the persisted acknowledged position: space is reclaimed only
after the link positions are saved, so a crash never finds a link
pointing at reused space).  Sync links make the host write wait for the acknowledgement (up to
`sync_timeout`; then the link is failed and changes are tracked in its
DCM, the write proceeds), while they stream and during a replay begun
within the stream (a volume change, below: the secondary has every
acknowledged write, and gets the new ones in order); during a catch-up
replay they do not wait (the secondary lacks the DCM's regions anyway, and
a hung one would stall every write again at each try).  Async links
acknowledge at once.  A link's
state is one value, changed only through the transition table of link.py:
its status (what `rsg status` shows) and what it holds (the SRL, its DCM,
or both while a replay runs).

DCM.  When the SRL would overflow, each link that still holds entries the
new one needs is switched to DCM logging: its pending entries are marked in
its data change map (one byte per extent per volume, `maps.ActivityFile`,
set in place and made durable before the change it describes) and every
later change sets bits there.  A detached link, a link whose secondary lost
its data and a link added to a secondary of unknown content (all extents)
do the same; a volume-changing operation (below) sets its regions in
every DCM, and only links that do not stream log.

DCM replay converges under any write load the link can carry: the replay
does not chase a moving bitmap.  Under the group lock the link stops
logging and joins the SRL stream at its head; from then on new changes
reach the secondary in order through the stream, and the replay makes one
pass over the (now static) DCM.  For each run it reads the data under the
group lock, so the data is exactly the state after every entry with a
sequence number below the current one; it sends the stream's entries up to
that point first, then the run, so later entries, sent after, land on top.
When the pass is done the secondary has the primary's state at the last
sequence sent: it becomes consistent, and the DCM is cleared.  Before
that, the DCM is static but for the regions the secondary has made
durable: every REPLAY_SYNC_BYTES of data (or second) the link sends RSYN,
the secondary flushes and answers RSAK, and the link clears the regions
sent before it from the DCM, in place.  A later change of such a region is
in the SRL, and what the link has not acknowledged of the SRL goes into
the DCM when the replay breaks off (a crash, an overflow, a lost
connection): the next replay copies what is left, not the whole DCM.
Only whole extents are cleared.  The clears trust the secondary to keep
what it acknowledged, so it proves it at every handshake: each RSYN has
an id that only grows (a round counted durably at each replay start,
at least the time in seconds so that a later link's ids are larger too,
and a number within it); the secondary saves the id of the last one it
answered in its record, after the flush and before RSAK, and reports it;
the primary saves the highest id it cleared (replay_cleared) before it
clears.  The rule: a secondary reporting an id below replay_cleared (or
none: one that does not answer RSYN) went back to an earlier state since
(a restored snapshot of the node), so the cleared regions may be missing
there and the whole DCM is copied again; replay_cleared is 0 once a
replay completed.  A secondary that does not answer RSYN is never sent
one: its replays clear nothing and, broken off, copy everything again
when it lost acknowledged updates, as before.
Before a replay the secondary keeps its last consistent image: a
copy-on-first-write snapshot of every volume (the peer channel's
mechanism), exported as LU@consistent-LU, all marked at one point under
the apply lock, so after a broken replay `lu rollback` of every volume
gives the group's last consistent point.  It is the group's own, apart
from the image an admin or a peer protects (LU@protected-LU): the group
never keeps or releases theirs, nor they its (the session names are
reserved; user operations refuse them).  The record's `protected` says it
is kept; a replay that begins on an inconsistent node keeps the one made
before, so it survives broken replays and restarts while the node stays
inconsistent, and the replay that completes releases it, after its
answer to the end (the node is consistent on disk by then; a crash
before the release leaves the image to the start, a release that fails
is done again at the next session's start and the primary's next BEAT
or CMIT).  A promotion or
a deletion of the group releases it too (a primary keeps none), as does a
rollback of a volume to it (that volume's); once every volume is rolled
back the node holds that point again (`image_point`: the history, update
and diverged regions it had then): consistent there, with the regions
the rollbacks changed added to its diverged ones, so a primary copies
exactly those back (the replay's regions it cleared after RSAK are among
them); a replay that begins after such a rollback of some volumes
releases the others' (the rolled-back volume is written again: what is
left is no point the group had); a
start releases one a crash left behind (a consistent node, or no
secondary of that LU).
The secondary writes a replay's data with several threads while it
receives the next frames (what a write waits for, the image's copy on
first write and its flush above all, is shared and overlaps the network):
a stream entry, or any frame but data, is handled once the data received
before it is written, and RSAK goes once the writes before its RSYN are
done and flushed.

A failing SRL (a read, a write or a sync returns an error) must not fail the
host's I/O, since the volumes are fine: every link that holds the SRL
switches to DCM logging with what it had not acknowledged and the change
that could not be logged, the record is saved without the SRL, and the
links replay once SRL_RETRY has passed (and log again if it still fails).

Volume-changing operations (protected restore, reverse sync of a
replicated volume, rollback) change regions without host writes; a
restore and a reverse sync change what hosts read of all their regions at
once (the clone's data, through the clones layer), while their engines
copy below that view, through this group's layer.  Before one starts
(`begin_volume_change`), its region map is ORed into every DCM and, on a
promoted node, into the since-promotion map (as a host write's extents:
a demotion while the engine copies must report them all, a link made
meanwhile must copy them), durably;
a link that streams begins a replay of it at its stream's position
(`extend`: it keeps holding the SRL, sync writes go on waiting for it), a
running replay starts its pass again from where its stream is (its pending
clears are dropped: they were sent before the bits came back), any other
link logs.  No replay reads until the operation has taken effect
(`end_volume_change`): read before, a region would miss the change, which
no entry carries.  A replay reads what hosts read (`replay_view`: the
operation's VolumeChange reads the clone for the extents not yet copied,
without a copy on demand, which would need the group lock the read holds;
an extent leaves the map only once its copy is complete).  The engines'
copies are changes of the volume below the clones layer, so they are
logged and streamed: a restore's carry the data hosts already read (an
extent is copied once, hosts wait for it), so its replay ends at the end
of its pass and the secondary is consistent while the restore still runs.
A reverse sync's engine copies a run again when a host write collided
with it, after a first copy carrying data hosts never read: its replays
end only once it has ended (`replay_hold`), the secondary being
inconsistent meanwhile with its last consistent image kept.  The
secondary receives exactly the regions the operation changed plus the
host writes made meanwhile, never a full copy.

Secondary.  `SecondaryGroup` receives batches.  A CMIT batch it writes
whole to one of two staging slots (crc over the batch, fdatasync; the
volumes are flushed first if CAPL batches were applied since they last
were), acknowledges it, applies it in order to the volumes, flushes them,
and marks the slot applied; a CMIT with no entries after CAPL batches
leaves an applied slot naming the last update applied, where a start
finds what is durable.  A CAPL batch it applies and acknowledges.  After a crash the slot holding a committed, unapplied batch is
applied again as one unit (the window of unacknowledged updates); a torn
slot is ignored (the primary still has it: it was never acknowledged).
Reads of a secondary's volume take the apply lock (its guard layer, the
outermost of the LU's I/O stack), which an update holds while it is
applied: a reader sees the volumes between two updates (every prefix of
the stream is a state the primary had), never half of one, and waits for
a slice of a batch (APPLY_SLICE) at most, not for all of it; while the
secondary is inconsistent (a replay running or broken off) its exports
refuse connections and reads with a message.  Batches are applied just
below that guard, so a clone or session of a secondary's volume sees each
replicated change as it would a host write.  While a restore or reverse
sync runs on a secondary, primaries are refused (they retry) so that no
batch lands beside the operation's writes.

Generations.  A group's history is a list of (generation id, first
sequence number).  `promote` on a secondary starts a new generation.  Each
node keeps, from the moment it stops replicating with another, a durable
map of what it changes, with the point of its history the map starts from
(its base): a link's DCM (since its secondary last agreed with this node),
the since-promotion map (since `since_base`), a demoted or restored
secondary's `diverged` regions (since their base).  On reconnect the two
histories give the point both last agreed (`history_diverges`); each
side's map is used if its base lies on the common line at or before that
point (`map_covers`; else that side counts as having changed everything),
and the link replays the union, from the primary.  The secondary wrote
after that point: a split brain, handled by the group's policy
(`after_split_brain`): disconnect (the link waits for `--discard-
secondary-changes`, reporting what each side changed), discard-secondary
(the primary wins), discard-zero-changes (the primary takes the
secondary's changes first (PULL, the secondary answers with RDAT frames
and PEND) when it changed nothing itself; both changed: disconnect).
Hosts write on during a take: from the decision until the take is over,
the group notes what hosts change in its regions (the bytes in memory,
the extents durably in the link's take map), and each volume written
has a TakeGuard while the take runs (layer), which orders host writes
into regions not taken yet with the take and puts their bytes on top of
the secondary's data.  A take cut off goes on with what it had not taken
(link.pull_left, saved now and then); after a crash, a region left that
the take map says a host changed was changed on both sides.

One map has no such base: the DCM of a link whose replays broke off over
its secondary's last consistent image.  The image's point is older than
what the link acknowledged (the replay joined the stream), and the regions
the secondary made durable left the DCM; what the DCM holds with the
regions written over the image is every region where the primary differs
from the image.  So each image has an id, given to the primary in RBOK and
kept by its link (`replay_image`); a demotion keeps such a DCM as a map of
that image (diverged `image_maps`), and the secondary, once rolled back to
the image, tags its diverged map (those regions, and what it changes since)
with the id, which its promotion keeps in `since_maps`.  Only that node,
linking to the old primary, pairs the two (`_image_changes`), counting the
regions written over the image on both sides; a map of an image it did not
roll back to counts as everything.

Modules: wire (frames on the replication connection), srl (the primary's
log), dcm (data change maps, the activity log), records (a group's files,
record and history), layer (the volumes' I/O stack layers), link (one
link of a primary and its state table), primary, secondary, server (the
secondary's replication port).  User documentation: docs/replication.md;
files, durability and recovery: docs/persistence.md.
"""

from .dcm import ActivityLog, Dcm
from .layer import Guard, ReplicationLayer
from .link import (CONNECTING, DCM_LOGGING, DCM_REPLAY, DETACHED, DIVERGED,
                   FAILED, MODES, REPLICATING, Link, RemoteRefused,
                   authenticate)
from .primary import PrimaryGroup, VolumeChange
from .records import (DEFAULT_GRANULARITY, DISCARD_SECONDARY,
                      DISCARD_ZERO_CHANGES, DISCONNECT, PRIMARY, SECONDARY,
                      SPLIT_BRAIN_POLICIES, GroupFiles, ReplicaUnavailable,
                      ReplicationError, RsgBusy, UnknownGroup,
                      check_split_brain_policy, history_diverges,
                      map_covers, new_generation, parse_secondary,
                      read_token)
from .secondary import SecondaryGroup
from .server import MAX_HELLO, ReplicaServer
from .srl import MIN_SRL, SRL_DATA_START, SRL_ENTRY, Srl, SrlCorrupt
from .wire import (FRAME, TRIM, WRITE, ZERO, entry_crc, recv_frame,
                   send_frame)



__all__ = [
    "ActivityLog", "CONNECTING", "DCM_LOGGING", "DCM_REPLAY",
    "DEFAULT_GRANULARITY", "DETACHED", "DISCARD_SECONDARY",
    "DISCARD_ZERO_CHANGES", "DISCONNECT", "DIVERGED", "Dcm", "FAILED", "FRAME",
    "GroupFiles", "Guard", "Link", "MAX_HELLO", "MIN_SRL", "MODES", "PRIMARY",
    "PrimaryGroup", "REPLICATING", "RemoteRefused", "ReplicaServer",
    "ReplicaUnavailable", "ReplicationError", "ReplicationLayer", "RsgBusy",
    "SECONDARY", "SPLIT_BRAIN_POLICIES", "SRL_DATA_START", "SRL_ENTRY",
    "SecondaryGroup", "Srl", "SrlCorrupt", "TRIM", "UnknownGroup",
    "VolumeChange", "WRITE",
    "ZERO", "authenticate", "check_split_brain_policy", "entry_crc",
    "history_diverges", "map_covers", "new_generation", "parse_secondary", "read_token",
    "recv_frame", "send_frame",
]
