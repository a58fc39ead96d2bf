"""Clone groups (see group.py)."""

from .group import *  # noqa: F401,F403
from .group import KEEP, SyncEngine  # noqa: F401
