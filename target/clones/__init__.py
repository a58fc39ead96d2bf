"""Clone groups: a Source LU, its clones, their maps and the sync engine.

group.py (CloneGroup), model.py (states and Clone), mirroring.py (host
writes), restore.py (protected restore, copy on demand), sync.py (the
engine).  The names other layers use are re-exported here.
"""

from .group import CloneGroup  # noqa: F401
from .model import (  # noqa: F401
    DEFAULT_GRANULARITY, EXPORTED, FRACTURED, MAX_CLONES, MAX_GRANULARITY,
    MIN_GRANULARITY, MIRRORED, OUT_OF_SYNC, RESTORING, REVERSE_SYNCING,
    RUNNING, STATES, SYNCHRONIZED, SYNCING, TRANSITIONS, AlreadyRunning,
    Clone, CloneBroken, CloneExport, CloneInUse, GroupBusy,
    InvalidTransition, SiblingsMirrored, TransitionNotSaved,
    check_granularity)
from .sync import Progress, SyncEngine  # noqa: F401
from .verify import VerifyEngine  # noqa: F401
