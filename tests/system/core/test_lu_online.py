"""Deleting and growing LUs while the server serves the others."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.support.cli import CLONECTL, MiB

nbd = pytest.importorskip("nbd")


class Writer(threading.Thread):
    """A host writing to one LU the whole time: a few hundred writes and
    flushes, each checked by reading it back."""

    def __init__(self, handle, count=400):
        super().__init__(daemon=True)
        self.h = handle
        self.count = count
        self.errors = []
        self.done = 0

    def run(self):
        try:
            for i in range(self.count):
                data = i.to_bytes(4, "little") * 1024
                offset = (i % 256) * 4096
                self.h.pwrite(data, offset)
                if i % 8 == 0:
                    self.h.flush()
                if self.h.pread(4096, offset) != data:
                    self.errors.append("read back differs at {}".format(i))
                self.done += 1
            self.h.flush()
        except Exception as e:      # the test reports it
            self.errors.append(repr(e))


def test_delete_and_resize_while_another_lu_is_written(
        clonectl, server_factory, state_dir, nbd_connect):
    clonectl("lu", "create", "busy", "--size", "4M")
    clonectl("lu", "create", "gone", "--size", "1M")
    clonectl("lu", "create", "grow", "--size", "1M")
    srv = server_factory()
    g = nbd_connect(srv.socket, "grow")
    g.pwrite(b"old data kept" * 100, 0)
    g.flush()
    g.shutdown()
    writer = Writer(nbd_connect(srv.socket, "busy"))
    writer.start()
    clonectl("lu", "delete", "gone")
    out = clonectl("lu", "resize", "grow", "--size", "3M").stdout
    assert "from 1MiB to 3MiB" in out
    writer.join(60)
    assert not writer.is_alive()
    assert writer.errors == [] and writer.done == writer.count
    assert not (state_dir / "lus" / "gone.img").exists()
    doc = json.loads((state_dir / "state.json").read_text())
    assert sorted(doc["lus"]) == ["busy", "grow"]
    assert doc["lus"]["grow"]["size"] == 3 * MiB
    h = nbd_connect(srv.socket, "grow")
    assert h.get_size() == 3 * MiB
    assert h.pread(1300, 0) == b"old data kept" * 100
    h.pwrite(b"past the old end", 3 * MiB - 512)
    assert h.pread(16, 3 * MiB - 512) == b"past the old end"
    with pytest.raises(nbd.Error):
        nbd_connect(srv.socket, "gone")
    assert srv.running(), srv.log()


def test_delete_of_a_connected_lu_is_refused(clonectl, server_factory,
                                             state_dir, nbd_connect):
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    h = nbd_connect(srv.socket, "a")
    h.pwrite(b"still here", 0)
    before = (state_dir / "state.json").read_bytes()
    proc = clonectl("lu", "delete", "a", check=False)
    assert proc.returncode == 1
    assert "cannot be deleted" in proc.stderr
    assert "1 host connection" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (state_dir / "state.json").read_bytes() == before
    assert h.pread(10, 0) == b"still here"
    h.shutdown()
    clonectl("lu", "delete", "a")
    assert not (state_dir / "lus" / "a.img").exists()


def test_resize_refusals(clonectl, server_factory, state_dir):
    clonectl("lu", "create", "a", "--size", "2M")
    clonectl("clone", "add", "a", "c")
    proc = clonectl("lu", "resize", "a", "--size", "1M", check=False)
    assert proc.returncode == 1 and "only growing" in proc.stderr
    proc = clonectl("lu", "resize", "a", "--size", "4M", check=False)
    assert proc.returncode == 1 and "it has clones (c)" in proc.stderr
    server_factory()
    proc = clonectl("lu", "resize", "a", "--size", "4M", check=False)
    assert proc.returncode == 1 and "it has clones (c)" in proc.stderr
    assert (state_dir / "lus" / "a.img").stat().st_size == 2 * MiB
    proc = clonectl("lu", "delete", "a", check=False)
    assert proc.returncode == 1 and "it has clones (c)" in proc.stderr


def test_resize_offline(clonectl, state_dir):
    clonectl("lu", "create", "a", "--size", "1M")
    with open(state_dir / "lus" / "a.img", "r+b") as f:
        f.write(b"kept")
    clonectl("lu", "resize", "a", "--size", "2M")
    assert (state_dir / "lus" / "a.img").stat().st_size == 2 * MiB
    assert (state_dir / "lus" / "a.img").read_bytes()[:4] == b"kept"
    rows = json.loads(clonectl("lu", "list", "--json").stdout)
    assert rows[0]["size"] == 2 * MiB


@pytest.mark.parametrize("served", [False, True],
                         ids=["offline", "served"])
def test_resize_over_data_already_in_the_file_asks_what_hosts_see(
        clonectl, server_factory, state_dir, tmp_path, nbd_connect, served):
    """An LU over the first 1 MiB of a 3 MiB --file grows to 2 MiB: its
    new part would show the file's own bytes, where the help promises
    zeroes, so the resize says so and changes nothing unless told
    --file-data zero (the file's bytes there are zeroed) or keep (hosts
    read them).  A file with a hole there grows as before."""
    f = tmp_path / "ext.img"
    f.write_bytes(b"A" * MiB + b"SECRET!!" * (MiB // 8) + b"B" * MiB)
    clonectl("lu", "create", "ext", "--file", f, "--size", "1M")
    srv = server_factory() if served else None
    proc = clonectl("lu", "resize", "ext", "--size", "2M", check=False)
    assert proc.returncode == 1, proc.stdout
    assert "holds data past the LU's size" in proc.stderr
    assert "--file-data" in proc.stderr
    assert json.loads(clonectl("lu", "list", "--json").stdout)[0][
        "size"] == MiB
    clonectl("lu", "resize", "ext", "--size", "2M", "--file-data", "zero")
    clonectl("lu", "resize", "ext", "--size", "3M", "--file-data", "keep")
    expected = b"A" * MiB + bytes(MiB) + b"B" * MiB
    assert f.read_bytes() == expected
    if served:
        h = nbd_connect(srv.socket, "ext")
        assert h.get_size() == 3 * MiB
        assert h.pread(3 * MiB, 0) == expected
    # A hole past the LU's size reads as zeroes already: no question.
    g = tmp_path / "holey.img"
    g.write_bytes(b"C" * MiB)
    os.truncate(g, 2 * MiB)
    clonectl("lu", "create", "holey", "--file", g, "--size", "1M")
    clonectl("lu", "resize", "holey", "--size", "2M")
    assert g.read_bytes() == b"C" * MiB + bytes(MiB)


def test_resize_and_delete_of_a_replicated_volume_are_refused(clonectl,
                                                              state_dir):
    clonectl("lu", "create", "v", "--size", "1M")
    clonectl("rsg", "create", "g", "--volume", "v", "--srl-size", "1M")
    for args, what in ((("lu", "resize", "v", "--size", "2M"), "resized"),
                       (("lu", "delete", "v"), "deleted")):
        proc = clonectl(*args, check=False)
        assert proc.returncode == 1
        assert "cannot be {}".format(what) in proc.stderr
        assert "replicated group g" in proc.stderr
    assert (state_dir / "lus" / "v.img").stat().st_size == MiB


def _blocked_on_a_reply(pid):
    """Whether process pid (the CLI) sleeps with a socket open: it sent
    its request (a small one to a Unix socket goes at once) and waits for
    the reply."""
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            sleeping = f.read().rsplit(")", 1)[1].split()[0] == "S"
        fds = os.listdir("/proc/{}/fd".format(pid))
        return sleeping and any(
            os.readlink("/proc/{}/fd/{}".format(pid, fd)).startswith(
                "socket:") for fd in fds)
    except FileNotFoundError:
        return False


def test_a_change_whose_target_died_before_replying_is_not_sent_again(
        clonectl, server_factory, state_dir, process_guard):
    """The CLI's delete reaches the control socket of a target that then
    dies without a reply: the CLI cannot know whether it was carried out,
    so it says so (exit status 5) and does not send it to the restarted
    target (which would delete the LU, or refuse a delete the first had
    done as "no LU named")."""
    clonectl("lu", "create", "a", "--size", "1M")
    srv = server_factory()
    nbdkit = srv.nbdkit_pid
    os.kill(nbdkit, signal.SIGSTOP)
    try:
        cli = subprocess.Popen(
            [CLONECTL, "--state-dir", str(state_dir), "lu", "delete", "a"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process_guard.add(cli.pid)
        deadline = time.monotonic() + 30
        while not _blocked_on_a_reply(cli.pid):
            assert cli.poll() is None and time.monotonic() < deadline, \
                cli.communicate()
            time.sleep(0.02)
    finally:
        os.kill(nbdkit, signal.SIGKILL)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 5, (out, err)
    assert "whether it was carried out is unknown" in err
    assert "not sent again" in err
    # The target that got the request never read it, and the one the
    # manager started instead was not asked.
    deadline = time.monotonic() + 30
    while srv.refresh()["nbdkit_pid"] == nbdkit:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert [lu["name"] for lu in
            json.loads(clonectl("lu", "list", "--json").stdout)] == ["a"]
