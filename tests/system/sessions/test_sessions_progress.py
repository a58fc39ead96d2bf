"""session transfer --wait shows the transfer's bytes and percentage."""

import re

import pytest

from tests.support.clonelib import MiB

pytest.importorskip("nbd")

PERCENT = re.compile(r"(\d+\.\d)%")


def test_full_transfer_shows_percentage_and_total(session_env, dests,
                                                  tmp_path):
    env = session_env.setup(size=16 * MiB)
    dfile = dests.make_file(tmp_path / "dest.raw", 16 * MiB)
    # A destination at 64 Mbit/s (nbdkit's rate is in bits): the 16 MiB
    # copy takes about 2 s.
    dest = dests.nbdkit(dfile, filters=("rate",), params=("rate=64M",))
    env.create("s1", dest.uri)
    proc = env.cli("session", "transfer", "s1", "--full", "--wait")
    lines = proc.stdout.splitlines()
    shown = [line for line in lines if PERCENT.search(line)]
    assert shown, lines
    assert all("of 16MiB" in line for line in shown), lines
    if len(shown) > 2:
        assert shown[1] != shown[0], "no progress shown: {}".format(lines)
    assert float(PERCENT.search(shown[0]).group(1)) < 100.0 or \
        len(shown) == 1, lines
    assert "100.0%" in shown[-1], lines
    # Started, a line every 5 s, the last, completed.
    assert len(lines) <= 5, lines
    assert lines[-1] == "session s1: transfer completed, 16MiB sent", lines
    out = env.cli("wait", "s1").stdout
    assert "s1: transfer  100.0%  16MiB of 16MiB" in out, out
