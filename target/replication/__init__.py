"""Replication of storage groups (being split into modules)."""

from .primary import *  # noqa: F401,F403
from .primary import errors  # noqa: F401
