"""Servers whose state directory is on scripts/powerfs.py (a disk that
loses every write not fsynced at a power cut), for the replication
power-loss tests: `powerfs_target` makes one, `Link` what the primary and
the secondary of a link share (log, token file, port).  The servers are
scripts/torture.py's Target (`torture` here), started and stopped by the
test.  scripts/torture.py imports nbd: without it, importing this module
skips the test module that does."""

import os

import pytest

from tests.support import scripts

pytest.importorskip("nbd")
torture = scripts.load("torture")
BLOCK, MiB = torture.BLOCK, torture.MiB


def replication_token(tmp_path):
    """The token file tmp_path/token (mode 0600); returns its path."""
    token = tmp_path / "token"
    token.write_text("powerloss-" + "k" * 20 + "\n")
    token.chmod(0o600)
    return token


class Link:
    """What the nodes of one link in tmp_path share: the log they serve
    into (tmp_path/serve.log), the token file and the secondary's
    replication port.  serve_args are the secondary's `serve` arguments,
    link_args the primary's `rsg link` arguments naming the secondary."""

    def __init__(self, tmp_path):
        self.log = open(tmp_path / "serve.log", "ab")
        self.token = replication_token(tmp_path)
        self.port = torture.free_port()
        self.serve_args = ["--replication-port", str(self.port),
                           "--replication-token-file", str(self.token)]
        self.link_args = ["--secondary", "127.0.0.1:{}".format(self.port),
                          "--token-file", str(self.token)]


def powerfs_target(tmp_path, log, seed, name, serve_args=()):
    """A PowerFS disk tmp_path/NAME (seeded with seed, started) and a
    torture.Target with its state directory on it, serving on
    tmp_path/NAME.sock with serve_args; returns (disk, target).  The
    runtime directory (sockets, locks) is tmp_path/run-NAME, off the
    disk."""
    disk = torture.PowerFS(str(tmp_path), seed=seed, log=log, name=name)
    disk.start()
    state = os.path.join(disk.mount, "state")
    os.makedirs(state)
    os.makedirs(tmp_path / ("run-" + name))
    os.symlink(tmp_path / ("run-" + name), os.path.join(state, "run"))
    return disk, torture.Target(state, str(tmp_path / (name + ".sock")),
                                log, serve_args)


def write_then_flush_elsewhere(writer, flusher, new, flushed, unflushed):
    """Multi-conn: the blocks of flushed written (new[b]) on one
    connection and flushed on another, then those of unflushed written
    after that flush; both connections are left open."""
    assert writer.can_multi_conn() and flusher.can_multi_conn()
    for b in flushed:
        writer.pwrite(new[b], b * BLOCK)
    flusher.flush()
    for b in unflushed:
        writer.pwrite(new[b], b * BLOCK)


def lost_blocks(image, new, blocks):
    """The blocks of blocks whose data in image is not new[b]."""
    return [b for b in blocks
            if image[b * BLOCK:(b + 1) * BLOCK] != new[b]]
