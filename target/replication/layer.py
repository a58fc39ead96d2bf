"""The layers replication puts in its volumes' I/O stacks (target.iostack).

On a primary, ReplicationLayer orders every change through the group (SRL,
DCMs) before it reaches the volume.  On a secondary, Guard is the outermost
layer: reads wait for the update being applied and are refused while the
group is inconsistent; writes from above are refused (replication writes
below it).  See docs/replication.md.
"""

from .. import errors, iostack
from .wire import TRIM, WRITE, ZERO

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


class Guard(iostack.Layer):
    """A secondary volume's guard, the outermost layer of its LU's I/O
    stack: a read waits for the update being applied and is refused while
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
