"""`rsg link/attach --wait` and `--rate` through the CLI of two `clonectl
serve` in their own network namespaces (netlib.py): the wait returns once
the link replicates (exit 0) or when it is detached (exit 1, with the
link's state); the rate throttles the replay and shows in `rsg status`."""

import json
import os
import subprocess
import time

from tests.support.netlib import CLONECTL, wait_caught_up, wait_link

MiB = 1 << 20
G = "g"


def _pair(cluster, size):
    p = cluster.node("p", lus=[("v1", str(size))])
    s = cluster.node("s", lus=[("v1", str(size))])
    h = p.connect("v1")
    data = os.urandom(size)
    for off in range(0, size, MiB):
        h.pwrite(data[off:off + MiB], off)
    h.flush()
    p.cli("rsg", "create", G, "--volume", "v1", "--srl-size", "2M")
    return p, s, h


def test_link_wait_with_rate(cluster):
    size, rate = 4 * MiB, 8 * MiB
    p, s, h = _pair(cluster, size)
    bad = p.cli("rsg", "link", G, "--secondary", s.addr, "--token-file",
                cluster.token, "--rate", "fast", "--wait", check=False)
    assert bad.returncode == 1 and "invalid size 'fast'" in bad.stderr, bad
    assert "Traceback" not in bad.stderr
    assert p.rsg(G)["links"] == []
    t0 = time.monotonic()
    out = p.cli("rsg", "link", G, "--secondary", s.addr, "--token-file",
                cluster.token, "--rate", "8M", "--wait").stdout
    took = time.monotonic() - t0
    assert "replay" in out and "is replicating" in out, out
    # Throttled: 4 MiB at 8 MiB/s.
    assert took >= size / rate, (took, out)
    st = p.rsg(G)
    link = st["links"][0]
    assert link["state"] == "replicating", st
    assert link["replay_rate_limit"] == rate
    assert link["replay"]["bytes_done"] == size
    assert link["replay"]["elapsed"] >= size / rate
    text = p.cli("rsg", "status", G).stdout
    assert "replay rate 8MiB/s" in text, text
    # Host writes after the wait are streamed.
    h.pwrite(b"\x5a" * 4096, 0)
    h.flush()
    wait_caught_up(cluster, p, G, s)
    assert p.read_all("v1", size) == s.read_all("v1", size)


def test_attach_wait_fails_when_detached(cluster):
    size = 8 * MiB
    p, s, _ = _pair(cluster, size)
    p.cli("rsg", "link", G, "--secondary", s.addr, "--token-file",
          cluster.token, "--rate", "1M")
    wait_link(cluster, p, G, s, "dcm-replay")
    env = dict(os.environ)
    env.pop("CLONECTL_STATE", None)
    # attach --wait (the replay resumes, still at 1 MiB/s: 8 s), detached
    # meanwhile from another command.
    waiting = subprocess.Popen(
        [CLONECTL, "--state-dir", str(p.state_dir), "rsg", "attach", G,
         "--secondary", s.addr, "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=env)
    try:
        time.sleep(1.5)
        assert waiting.poll() is None, waiting.communicate()
        p.cli("rsg", "detach", G, "--secondary", s.addr)
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 1, (out, err)
    error = json.loads(out)["error"]
    assert "link to {} is detached".format(s.addr) in error["message"], error
    assert "Traceback" not in err
    # Attached again without a limit: the wait ends replicating.
    out = p.cli("rsg", "attach", G, "--secondary", s.addr, "--rate", "0",
                "--wait", "--json").stdout
    st = json.loads(out)
    assert st["links"][0]["state"] == "replicating", st
    assert st["links"][0]["replay_rate_limit"] is None
    assert p.read_all("v1", size) == s.read_all("v1", size)


def test_replay_resumes_after_kill9_of_the_primary(cluster):
    """A replay half way when the primary is killed (SIGKILL) goes on
    after the restart from what the secondary acknowledged: the restarted
    primary sends what was left plus at most what was not acknowledged
    (REPLAY_SYNCS_AHEAD + 1 syncs, one chunk).  Under a rate of 4M a sync
    goes every second (before REPLAY_SYNC_BYTES): 4 MiB each."""
    size = 32 * MiB
    p, s, h = _pair(cluster, size)
    p.cli("rsg", "link", G, "--secondary", s.addr, "--token-file",
          cluster.token, "--rate", "4M")
    link = wait_link(cluster, p, G, s, "dcm-replay", pred=lambda l: (
        l["replay"] or {}).get("bytes_done", 0) >= size // 2)
    done = link["replay"]["bytes_done"]
    p.kill9()
    p.start()
    p.cli("rsg", "attach", G, "--secondary", s.addr, "--rate", "0",
          "--wait")
    # What the restarted primary sent, over its replays (the attach
    # reconnects the link: the replay resumes again).
    sent = p.link(G, s)["bytes_sent"]
    overlap = 3 * 4 * MiB + MiB
    assert sent <= size - done + overlap, (done, sent)
    assert p.read_all("v1", size) == s.read_all("v1", size)
