"""Plugin: libnbd handles that are closed at teardown (`nbd_connect`)."""

import pytest


@pytest.fixture
def nbd_connect(server_factory):
    """nbd_connect(socket_or_uri, export="", meta=False, strict=True) -> handle.

    Handles are shut down and released at teardown, before the servers of
    server_factory are stopped (it is set up first, so torn down last):
    nbdkit does not exit on SIGTERM while an idle client stays connected."""
    nbd = pytest.importorskip("nbd")
    handles = []

    def connect(target, export="", meta=False, strict=True):
        h = nbd.NBD()
        handles.append(h)
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if not strict:
            h.set_strict_mode(0)
        if str(target).startswith("nbd"):
            h.connect_uri(str(target))
        else:
            h.set_export_name(export)
            h.connect_unix(str(target))
        return h

    yield connect

    for h in handles:
        try:
            h.shutdown()
        except Exception:
            pass
    handles.clear()  # the last reference: libnbd frees the handle
