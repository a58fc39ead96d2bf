"""Error classes of the target and the manager.

Each class carries a message template and the errno a client should see when
the error ends an NBD request (the plugin passes it to nbdkit.set_error) or
the exit status the CLI uses.  Raise them with keyword arguments:

    raise UnknownLU(name="db1")
"""

import errno as _errno


class Error(Exception):
    """Base class: a message template filled from keyword arguments."""

    msg = "{reason}"
    errno = _errno.EIO

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def __str__(self):
        try:
            return self.msg.format(**self.kwargs)
        except (KeyError, IndexError):
            return "{}: {}".format(self.__class__.__name__, self.kwargs)

    @property
    def code(self):
        """Stable machine-readable name, used on the control socket."""
        return self.__class__.__name__

    def to_dict(self):
        return {"code": self.code, "message": str(self), "errno": self.errno}


class InvalidArgument(Error):
    msg = "{reason}"
    errno = _errno.EINVAL


class InvalidName(Error):
    msg = ("invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
           "starting with a letter or digit")
    errno = _errno.EINVAL


class InvalidSize(Error):
    msg = "invalid size {value!r}: {reason}"
    errno = _errno.EINVAL


class UnknownLU(Error):
    msg = "no LU named {name!r}"
    errno = _errno.ENOENT


class DuplicateLU(Error):
    msg = "the name {name!r} is already used by an LU or a clone"
    errno = _errno.EEXIST


class UnknownClone(Error):
    msg = "no clone named {name!r}"
    errno = _errno.ENOENT


class BackingMissing(Error):
    msg = "backing file {path!r} does not exist"
    errno = _errno.ENOENT


class BackingUnusable(Error):
    msg = "backing file {path!r} cannot be used: {reason}"
    errno = _errno.EIO


class BackingLocked(Error):
    msg = ("backing file {path!r} is in use by another program ({reason}); "
           "`lslocks` or `fuser -v FILE` names it")
    errno = _errno.EBUSY


class BackingShared(Error):
    msg = ("backing file {path!r} of {owner} is the storage of {other} "
           "already (its path names the same file or device now: a symlink "
           "retargeted, a device renamed at boot); not used")
    errno = _errno.EBUSY


class StorageChanged(Error):
    msg = ("backing file {path!r} of {owner} names other storage than when "
           "it was added: {found} now, {recorded} then (device names and "
           "symlinks can change at boot); not used. If its data was moved "
           "there on purpose: `clonectl {command}`")
    errno = _errno.ENXIO


class StorageServed(Error):
    msg = ("{owner} is served from {served}, opened when the server "
           "started; its backing file {path!r} names {found} now. Not "
           "accepted: it would be served from the next start on, with "
           "what hosts write meanwhile on the other storage. Point the "
           "path back, or stop the server before moving the data")
    errno = _errno.EBUSY


class BackingTooSmall(Error):
    msg = ("backing file {path!r} holds {actual} bytes, smaller than the "
           "LU size of {size} bytes")
    errno = _errno.ENOSPC


class BackingInUse(Error):
    msg = "backing file {path!r} is already used by LU {name!r}"
    errno = _errno.EBUSY


class ReadOnly(Error):
    msg = "LU {name!r} is read-only"
    errno = _errno.EPERM


class OutOfRange(Error):
    msg = ("request of {length} bytes at offset {offset} is outside LU "
           "{name!r} of {size} bytes")
    errno = _errno.EINVAL


class LUBusy(Error):
    msg = "LU {name!r} cannot be deleted: {reason}"
    errno = _errno.EBUSY


class LUResizeRefused(Error):
    msg = "LU {name!r} cannot be resized: {reason}"
    errno = _errno.EBUSY


class CorruptState(Error):
    msg = ("state file {path!r} is corrupt: {reason}; it was left untouched. "
           "Restore it from a backup or move it away to start empty")
    errno = _errno.EUCLEAN


class StateMissing(Error):
    msg = ("state file {path!r} is missing, but the state directory holds "
           "files of LUs, clones or replicated groups ({files}); nothing was "
           "started. Restore state.json from a backup, or move those files "
           "away to start with an empty inventory")
    errno = _errno.EUCLEAN


class StateDirUnusable(Error):
    msg = "state directory {path!r} cannot be used: {reason}"
    errno = _errno.EIO


class FileError(Error):
    """An operating system error on a file, worded for a user."""

    msg = "{path}: {reason}"
    errno = _errno.EIO


class StateNotSaved(Error):
    """state.json could not be replaced (the errno is the OSError's)."""

    msg = "cannot save the state file {path!r}: {reason}"

    def __init__(self, errno=_errno.EIO, **kwargs):
        super().__init__(**kwargs)
        self.errno = errno


class UnsupportedState(Error):
    msg = ("state file {path!r} has format version {version}, this clonectl "
           "understands version {supported}")
    errno = _errno.EUCLEAN


class ServerRunning(Error):
    msg = "a server already runs on state directory {state_dir!r} (pid {pid})"
    errno = _errno.EBUSY


class SocketDirUnsafe(Error):
    msg = ("directory {path!r} for sockets whose paths are too long cannot "
           "be used: {reason}; another user could put a socket there that "
           "our clients would talk to. Remove it, or use a shorter state "
           "directory or --socket path")
    errno = _errno.EACCES


class StateDirBusy(Error):
    msg = ("a server is starting or stopping for state directory "
           "{state_dir!r}, or another clonectl command works on it (pid "
           "{pid}); try again")
    errno = _errno.EBUSY


class ServerNotRunning(Error):
    msg = "no server runs on state directory {state_dir!r}"
    errno = _errno.ENOTCONN


class StopTimeout(Error):
    msg = "server pid {pid} did not stop within {timeout} s"
    errno = _errno.ETIMEDOUT


class Reported(Error):
    """An error already worded by another process (the daemon)."""

    msg = "{message}"


class ServerFailed(Error):
    msg = "the server did not start: {reason}"
    errno = _errno.EIO


class ControlError(Error):
    """An error reported by the target over the control socket."""

    msg = "{message}"

    def __init__(self, code="ControlError", message="", errno=_errno.EIO):
        super().__init__(message=message)
        self._code = code
        self.errno = errno

    @property
    def code(self):
        return self._code


class ProtocolError(Error):
    msg = "control protocol error: {reason}"
    errno = _errno.EPROTO


class ReplyLost(ProtocolError):
    """The whole request was sent and no reply came: the target may have
    carried it out."""

    msg = "no reply to {op}: {reason}"


class OutcomeUnknown(Error):
    """A request that changes something was delivered and its reply lost
    (the target went away meanwhile): sending it again could do it twice,
    or report as refused what the first one did."""

    msg = ("the target went away after {op} reached it and before it "
           "answered ({reason}): whether it was carried out is unknown, and "
           "it was not sent again; look with `clonectl status` (the "
           "target's log: {log}) before repeating it")
    # The CLI's exit status: neither done (0) nor refused with nothing
    # changed (1).
    exit_status = 5


class TLSCertificatesUnusable(Error):
    msg = ("TLS certificate directory {path!r} cannot be used: {reason} (it "
           "must hold ca-cert.pem, server-cert.pem and server-key.pem, the "
           "key readable by its owner only)")
    errno = _errno.EINVAL


class InvalidAllow(Error):
    msg = ("invalid --allow {value!r}: {reason}; give an IPv4 or IPv6 address "
           "with an optional /PREFIX, e.g. 192.0.2.7 or 10.1.0.0/16")
    errno = _errno.EINVAL


class InvalidAllowExport(Error):
    msg = ("invalid --allow-export {value!r}: {reason}; give "
           "EXPORT=ADDR[/PREFIX], e.g. db1=192.0.2.7 or db1@s1=10.1.0.0/16")
    errno = _errno.EINVAL


class InvalidFaults(Error):
    msg = "fault injection file {path!r} (CLONECTL_FAULTS): {reason}"
    errno = _errno.EINVAL


class ClientRefused(Error):
    msg = "client {address} is not in the --allow list: connection refused"
    errno = _errno.EACCES


class ExportRefused(Error):
    msg = ("client {address} may not open export {export!r}: it is not in "
           "the --allow-export list for {rule!r}")
    errno = _errno.EACCES
