"""The transfer engine with its real NBD client (libnbd, which shares a
write's buffer and sends it when the socket takes it) to a real nbdkit:
a run goes out as several requests, the client's window fills in the
middle of a run, and while the engine waits the server answers all it
has (the engine's thread was slow to come back: another thread held the
GIL).  The rest of the run must still go out with the run's data.

Timing-dependent: whether libnbd still holds unsent bytes of the run's
last write when the engine reads the next run depends on the server's
scheduling (here it failed in most runs, not all)."""

import os
import tempfile
import time

import pytest

from target import sessions
from target.sessions import transfer

from tests.support.sessionfakes import marked_session
from tests.support.sessionlib import NbdProcess

pytest.importorskip("nbd")

G = 64 << 10
CHUNK = 2 << 20                 # a run: its last request takes many sends
RUN = CHUNK // G                # extents a run
RUNS = 24
N = RUN * RUNS


def image():
    """Each run: a data extent, a zero one, then data: three requests,
    the last one many times a socket buffer."""
    out = bytearray(os.urandom(N * G))
    for r in range(RUNS):
        x = r * RUN + 1
        out[x * G:(x + 1) * G] = bytes(G)
    return bytes(out)


def test_the_rest_of_a_run_goes_out_with_its_own_data(dests, tmp_path,
                                                      monkeypatch):
    dfile = dests.make_file(tmp_path / "dest.img", N * G)
    sock, log = dests._next("nbdkit")
    p = NbdProcess(["nbdkit", "-f", "-U", sock, "--filter=multi-conn", "file",
                    "file=" + str(dfile), "multi-conn-mode=disable"],
                   sock, "", log, dests.guard)
    dests.procs.append(p)
    server = p.start()

    s, frozen = marked_session(image(), G, [server.uri],
                               map_dir=tempfile.mkdtemp(dir=tmp_path))

    real_pump = transfer.pump

    def slow_pump(clients, timeout):
        if timeout:
            time.sleep(0.05)    # the server catches up meanwhile
        real_pump(clients, timeout)
    monkeypatch.setattr(transfer, "pump", slow_pump)
    monkeypatch.setattr(transfer, "CHUNK", CHUNK)
    # One connection, a window of 2 requests: it fills in the middle of
    # every run.
    dest = sessions.NbdDestination(server.uri, in_flight=2)
    assert not dest.multi_conn
    engine = s.start_transfer({0: dest}, run=False)
    engine.advance()
    dest.close()
    assert engine.result == "completed", engine.result
    with open(dfile, "rb") as f:
        got = f.read()
    wrong = [x for x in range(N) if got[x * G:(x + 1) * G] !=
             frozen[x * G:(x + 1) * G]]
    assert not wrong, "the transfer completed, the destination is recorded " \
        "{}, but extents {} hold other data than the frozen image's".format(
            s.dests[0].consistency, wrong)
