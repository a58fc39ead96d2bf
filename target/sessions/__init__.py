"""Incremental copy sessions (target.sessions.session)."""

from .session import *  # noqa: F401,F403
from .session import (ACTIVITY_REGION, CHECKPOINT_BYTES, COMMIT_INTERVAL,  # noqa: F401
                      DEFAULT_TIMEOUT, CONSISTENT, INCONSISTENT, NEW)
