"""A full filesystem under an LU: ENOSPC reaches the client, nothing else
breaks."""

import errno
import json
import subprocess

import pytest

from tests.support.cli import MiB, run_clonectl, status_json
from tests.support.servers import read_file_range

nbd = pytest.importorskip("nbd")


@pytest.fixture
def small_fs(tmp_path):
    """A 2M tmpfs, unmounted at teardown (after the server has stopped:
    request this fixture before server_factory/nbd_connect)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + proc.stderr.strip())
    try:
        yield mnt
    finally:
        for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
            if subprocess.run(args, capture_output=True).returncode == 0:
                break


def test_enospc_reaches_client_and_server_keeps_serving(
        small_fs, clonectl, server_factory, nbd_connect, state_dir):
    backing = small_fs / "lu.img"
    subprocess.run(["truncate", "-s", "16M", str(backing)], check=True)
    clonectl("lu", "create", "full", "--file", backing)
    clonectl("lu", "create", "other", "--size", "4M")
    srv = server_factory()
    h = nbd_connect(srv.socket, "full")
    assert h.get_size() == 16 * MiB

    chunk = 64 * 1024
    written = []
    error = None
    for i in range(16 * MiB // chunk):
        data = bytes([i % 251 + 1]) * chunk
        try:
            h.pwrite(data, i * chunk)
        except nbd.Error as e:
            error = e
            break
        written.append(data)
    assert error is not None, "16M fitted on a 2M filesystem?"
    assert error.errno == "ENOSPC", error
    # The tmpfs holds 2M: we got close to that before the error.
    assert MiB <= len(written) * chunk <= 2 * MiB

    # The server is alive and the same connection still reads what it wrote.
    assert srv.running()
    for i in (0, len(written) // 2, len(written) - 1):
        assert h.pread(chunk, i * chunk) == written[i]
        assert read_file_range(backing, i * chunk, chunk) == written[i]
    # Writes that need no new space still work (overwrite in place).
    h.pwrite(b"\xee" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"\xee" * 4096
    # Freeing space makes room again: trim then write.
    h.trim(4 * chunk, 0)
    h.pwrite(b"\x11" * chunk, len(written) * chunk)
    assert h.pread(chunk, len(written) * chunk) == b"\x11" * chunk

    # Another LU on another filesystem is unaffected.
    h2 = nbd_connect(srv.socket, "other")
    h2.pwrite(b"other lu", 12345)
    h2.flush()
    assert h2.pread(8, 12345) == b"other lu"
    # And new connections and the control socket still work.
    h3 = nbd_connect(srv.socket, "full")
    assert h3.pread(chunk, 5 * chunk) == written[5]
    lus = {lu["name"]: lu for lu in status_json(state_dir)["lus"]}
    assert lus["full"]["served"] and lus["full"]["connections"] == 2
    assert srv.refresh()["nbdkit_pid"] == srv.nbdkit_pid, "no restart"


def test_zero_on_full_filesystem(small_fs, clonectl, server_factory,
                                 nbd_connect):
    backing = small_fs / "lu.img"
    subprocess.run(["truncate", "-s", "8M", str(backing)], check=True)
    clonectl("lu", "create", "full", "--file", backing)
    srv = server_factory()
    h = nbd_connect(srv.socket, "full")
    # Fill the filesystem.
    with pytest.raises(nbd.Error) as info:
        for i in range(8):
            h.pwrite(b"\x99" * MiB, i * MiB)
    assert info.value.errno == "ENOSPC"
    # Zeroing with may-trim frees space (punch hole), it must succeed and
    # read back as zeroes.
    h.zero(MiB, 0)
    assert h.pread(MiB, 0) == bytes(MiB)
    assert read_file_range(backing, 0, MiB) == bytes(MiB)
    # Zeroing without punching needs space: success or ENOSPC, but never
    # garbage.
    try:
        h.zero(MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
    except nbd.Error as e:
        assert e.errno == "ENOSPC", e
    else:
        assert h.pread(MiB, 4 * MiB) == bytes(MiB)
    assert srv.running()


def _fill(directory):
    """Fill directory's filesystem; return the filler's path."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_fracture_on_full_state_dir_changes_nothing(
        small_fs, tmp_path, server_factory, nbd_connect):
    """The fractured state cannot be saved: the clone stays synchronized
    (in the target as in state.json) and mirrored; with space again the
    fracture succeeds at the Source's image of that moment."""
    state = small_fs / "state"
    src, c1 = tmp_path / "src.img", tmp_path / "c1.img"
    for path in (src, c1):
        subprocess.run(["truncate", "-s", "4M", str(path)], check=True)
    run_clonectl(state, "lu", "create", "src", "--file", src)
    run_clonectl(state, "clone", "add", "src", "c1", "--file", c1)
    srv = server_factory(state_dir=state)
    run_clonectl(state, "clone", "sync", "c1", "--wait")
    h = nbd_connect(srv.socket, "src")
    h.pwrite(b"A" * MiB, 0)
    h.flush()

    filler = _fill(small_fs)
    proc = run_clonectl(state, "clone", "fracture", "c1", check=False)
    assert proc.returncode == 1, proc
    st = json.loads(run_clonectl(state, "clone", "status", "c1",
                                 "--json").stdout)
    assert st["state"] == "synchronized" and not st["exported"], st
    assert "No space left on device" in proc.stderr, proc.stderr
    assert str(state / "state.json") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    doc = json.loads((state / "state.json").read_text())
    assert doc["lus"]["src"]["clones"]["c1"]["state"] == "synchronized"
    # Still mirrored: a Source write reaches the clone.
    h.pwrite(b"B" * 65536, 2 * MiB)
    assert read_file_range(c1, 2 * MiB, 65536) == b"B" * 65536

    filler.unlink()
    at_fracture = src.read_bytes()
    proc = run_clonectl(state, "clone", "fracture", "c1")
    assert "fractured" in proc.stdout
    h.pwrite(b"C" * 65536, 0)
    h.flush()
    assert c1.read_bytes() == at_fracture
    hc = nbd_connect(srv.socket, "c1")
    assert hc.pread(65536, 2 * MiB) == b"B" * 65536
    assert hc.pread(65536, 0) == b"A" * 65536
