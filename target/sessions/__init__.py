"""Incremental copy sessions: one module per concept.

    session.py       Session and its mark lifecycle (TRANSITIONS)
    savearea.py      SaveArea: old data saved by copies on first write
    tracking.py      TrackingMap: extents changed since the last mark
    layer.py         SessionLayer (the Source's I/O stack), FrozenExport
    transfer.py      TransferEngine: frozen image -> destinations
    destinations/    Destination records; one client per file (nbd, memory)
"""

from .destinations import (CONSISTENT, DEFAULT_TIMEOUT, INCONSISTENT, NEW,
                           Destination, DestinationError, MemoryDestination,
                           NbdDestination)
from .destinations import probe as probe_destination
from .layer import FrozenExport, FrozenImageGone, SessionLayer
from .savearea import SaveArea, SaveAreaFull, SaveAreaUnreadable, block_runs
from .session import Session, SessionBusy, SessionError, UnknownSession
from .tracking import TrackingMap
from .transfer import TransferEngine

__all__ = ["CONSISTENT", "DEFAULT_TIMEOUT", "INCONSISTENT", "NEW",
           "Destination", "DestinationError", "MemoryDestination",
           "NbdDestination", "probe_destination", "FrozenExport",
           "FrozenImageGone", "SessionLayer", "SaveArea", "SaveAreaFull",
           "SaveAreaUnreadable", "block_runs",
           "Session", "SessionBusy", "SessionError", "UnknownSession",
           "TrackingMap", "TransferEngine"]
