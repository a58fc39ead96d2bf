"""End-to-end replication tests: a primary and secondaries, each `clonectl
serve` in its own network namespace (see netlib.py).

Host I/O goes to the primary over NBD/TCP from the root namespace; the
secondaries are read the same way (read-only exports).  Every write of the
workloads carries a sequence number in its block, so the content of a
secondary tells which prefix of the write order it holds.
"""

import re
import time


from tests.support.netlib import (BLOCK, wait_caught_up, wait_link,
                                  wait_secondary_settled, WriteLog, Writer)

MiB = 1 << 20
VOLS = [("v1", 8 * MiB), ("v2", 4 * MiB)]
G = "g"


def _pair(cluster, mode="async", srl="2M", vols=VOLS, secondaries=1):
    lus = [(n, str(size)) for n, size in vols]
    p = cluster.node("p", lus=lus)
    ss = [cluster.node("s{}".format(i), lus=lus) for i in range(secondaries)]
    args = ["rsg", "create", G]
    for n, _ in vols:
        args += ["--volume", n]
    p.cli(*args, "--srl-size", srl)
    for s in ss:
        p.cli("rsg", "link", G, "--secondary", s.addr, "--mode", mode,
              "--token-file", cluster.token)
    for s in ss:
        wait_caught_up(cluster, p, G, s)
    return p, ss


def _images(node, vols=VOLS):
    return [node.read_all(n, size) for n, size in vols]


def _refused(node, export, size):
    import nbd
    try:
        node.read_all(export, size)
    except nbd.Error as e:
        return str(e)
    return None


def check_secondary(c, s, wlog, what):
    """The secondary, once settled, is either inconsistent (and refuses
    reads) or holds exactly a prefix of the write order.  Return S."""
    st = wait_secondary_settled(c, s, G)
    if not st.get("consistent"):
        for name, size in wlog.vols:
            err = _refused(s, name, size)
            assert err, "{}: secondary reports inconsistent ({}) but serves " \
                "reads of {}\n{}".format(what, st, name, c.describe(G))
        print("{}: secondary inconsistent ({})".format(what, st["reason"]))
        return None
    try:
        top = wlog.check_prefix(_images(s, wlog.vols))
    except AssertionError as e:
        raise AssertionError("{}: {}\n{}".format(what, e, c.describe(G)))
    print("{}: secondary = prefix up to seq {} of {} written".format(
        what, top, wlog.seq))
    return top


def check_equal(c, p, s, vols=VOLS, what="final"):
    for name, size in vols:
        a, b = p.read_all(name, size), s.read_all(name, size)
        if a != b:
            diff = [i for i in range(0, size, BLOCK)
                    if a[i:i + BLOCK] != b[i:i + BLOCK]]
            raise AssertionError(
                "{}: {} differs between {} and {} in {} block(s), first at "
                "{}\n{}".format(what, name, p.name, s.name, len(diff),
                                diff[:5], c.describe(G)))


# ---------------------------------------------------------------- 1

def test_write_order_fidelity(cluster):
    c = cluster
    p, (s,) = _pair(c, srl="1M")
    wlog = WriteLog(VOLS)
    w = Writer(p, wlog, seed=1, flush_every=16, interval=0.002)
    tops = []
    try:
        # a) A cut of the link mid-stream (writes go on meanwhile).
        w.run_for(0.5)
        c.cut_between(p, s)
        time.sleep(0.4)
        w.pause()
        tops.append(check_secondary(c, s, wlog, "link cut"))
        c.heal_between(p, s)
        w.run_for(0.5)
        w.pause()
        wait_caught_up(c, p, G, s)
        tops.append(check_secondary(c, s, wlog, "after the cut"))
        assert wlog.check_prefix(_images(s)) == wlog.seq

        # b) kill -9 of the secondary mid-stream, restarted while cut off.
        w.resume()
        time.sleep(0.4)
        s.kill9()
        time.sleep(0.3)
        w.pause()
        c.cut_between(p, s)
        s.start()
        tops.append(check_secondary(c, s, wlog, "secondary kill -9"))
        c.heal_between(p, s)
        w.run_for(0.5)
        w.pause()
        wait_caught_up(c, p, G, s)
        tops.append(check_secondary(c, s, wlog, "after the kill"))

        # c) SRL overflow (1M) during a cut, then DCM replay; the
        # secondary is checked while the replay runs, too.
        c.cut_between(p, s)
        w.interval = 0
        w.run_for(1.0)
        w.pause()
        link = p.link(G, s)
        assert link["dcm_logging"], "no SRL overflow after a 1 s burst " \
            "with a 1M SRL: {}\n{}".format(link, c.describe(G))
        tops.append(check_secondary(c, s, wlog, "overflow, cut"))
        # A slower replay, to look at the secondary while it runs.
        print("shaping:", s.delay(5))
        c.heal_between(p, s)
        deadline = time.monotonic() + 10
        seen_replay = False
        while time.monotonic() < deadline:
            st = s.rsg(G)
            if st.get("consistent") is False:
                err = _refused(s, "v1", VOLS[0][1])
                if not err:
                    # Served: only right if the replay ended meanwhile.
                    assert s.rsg(G).get("consistent"), \
                        "secondary inconsistent but serves v1:\n" + \
                        c.describe(G)
                if not seen_replay and st.get("protected"):
                    # Its last consistent image stays readable: the
                    # prefix it held before the replay.
                    import nbd
                    try:
                        imgs = [s.read_all("{0}@consistent-{0}".format(n),
                                           size) for n, size in VOLS]
                    except nbd.Error as e:
                        print("last consistent image unreadable (replay over? "
                              "consistent={}): {}".format(
                                  s.rsg(G).get("consistent"), e))
                    else:
                        if not s.rsg(G).get("consistent"):
                            top = wlog.check_prefix(imgs)
                            print("last consistent image during the replay: "
                                  "prefix", top)
                            assert top == tops[-1], (top, tops)
                seen_replay = True
            l = p.link(G, s)
            if l["state"] == "replicating" and not l["lag_updates"]:
                break
            time.sleep(0.05)
        print("replay seen inconsistent on the secondary:", seen_replay)
        w.interval = 0.002
        w.run_for(0.5)
        w.pause()
        wait_caught_up(c, p, G, s)
        tops.append(check_secondary(c, s, wlog, "after the replay"))
        assert p.link(G, s)["replays"] >= 2, p.link(G, s)
    finally:
        w.stop()
        c.heal_between(p, s)
    w.flush()
    wait_caught_up(c, p, G, s)
    assert wlog.check_prefix(_images(s)) == wlog.seq, \
        "the caught-up secondary is missing writes\n" + c.describe(G)
    check_equal(c, p, s)
    print("prefixes seen:", tops, "writes:", wlog.seq)


# ---------------------------------------------------------------- 2

def test_sync_mode_primary_killed(cluster):
    c = cluster
    p, (s,) = _pair(c, mode="sync")
    wlog = WriteLog(VOLS)
    w = Writer(p, wlog, seed=2, flush_every=5)
    w.run_for(1.5)
    p.kill9()               # manager and nbdkit, mid-stream
    w.stop()
    acked = wlog.acked
    assert acked > 50, "too few writes acknowledged in 1.5 s: {}".format(
        acked)
    st = wait_secondary_settled(c, s, G)
    assert st.get("consistent"), "secondary of a killed sync primary is " \
        "not consistent\n" + c.describe(G)
    top = wlog.check_prefix(_images(s))
    print("acknowledged {} (issued {}), secondary holds prefix {}".format(
        acked, wlog.seq, top))
    assert top >= acked, "sync link: writes {}..{} were acknowledged to " \
        "the host but are not on the secondary\n{}".format(
            top + 1, acked, c.describe(G))
    time.sleep(1)
    assert s.rsg(G).get("consistent"), c.describe(G)


# ---------------------------------------------------------------- 3

def test_overflow_replay_converges_under_load(cluster):
    c = cluster
    p, (s,) = _pair(c, srl="1M")
    shaping = s.delay(3)
    print("link shaping:", shaping)
    wlog = WriteLog(VOLS)
    # ~300 writes/s of 4 KiB: ~1.2 MB/s, well under the link's bandwidth.
    w = Writer(p, wlog, seed=3, flush_every=32, interval=0.003)
    t_start = time.monotonic()
    w.resume()
    try:
        time.sleep(1.0)
        c.cut_between(p, s)
        wait_link(c, p, G, s, ("dcm-logging", "connecting", "failed"),
                  pred=lambda l: l["dcm_logging"], timeout=20)
        time.sleep(0.5)
        c.heal_between(p, s)
        t0 = time.monotonic()
        seq0 = wlog.seq
        wait_link(c, p, G, s, "replicating",
                  pred=lambda l: not l["dcm_logging"] and
                  l["replays"] >= 2, timeout=30)
        took = time.monotonic() - t0
        written = wlog.seq - seq0
        assert w.thread.is_alive() and not w.error, w.error
        print("replay converged under load in {:.2f} s ({} writes meanwhile,"
              " {:.0f} writes/s)".format(took, written, written / took
                                          if took else 0))
        assert written > 0, "the writer stalled during the replay"
        left = 8.0 - (time.monotonic() - t_start)
        if left > 0:
            time.sleep(left)
        assert p.link(G, s)["state"] == "replicating", c.describe(G)
        w.pause()
    finally:
        w.stop()
        c.heal_between(p, s)
    w.flush()
    wait_caught_up(c, p, G, s)
    assert wlog.check_prefix(_images(s)) == wlog.seq, c.describe(G)
    check_equal(c, p, s)


# ---------------------------------------------------------------- 4

def _write_extents(node, lu, extents, seed, ext=64 << 10):
    import random
    rnd = random.Random(seed)
    h = node.connect(lu)
    for e in extents:
        h.pwrite(bytes(rnd.getrandbits(8) for _ in range(16)) * (ext // 16),
                 e * ext)
    h.flush()
    h.shutdown()
    node.handles.remove(h)


def test_protected_restore_propagates_only_changed_regions(cluster):
    c = cluster
    vols = [("v1", 8 * MiB)]
    p, (s,) = _pair(c, vols=vols, srl="4M")
    _write_extents(p, "v1", range(0, 128, 3), seed=40)
    wait_caught_up(c, p, G, s)
    p.cli("clone", "add", "v1", "c1")
    p.cli("clone", "sync", "c1", "--wait")
    p.cli("clone", "fracture", "c1")
    changed = [5, 17, 18, 40, 77, 100, 127]
    _write_extents(p, "v1", changed, seed=41)
    wait_caught_up(c, p, G, s)
    replays0 = p.link(G, s)["replays"]
    p.cli("clone", "restore", "c1", "--wait")
    l = wait_link(c, p, G, s, "replicating",
                  pred=lambda l: l["replays"] > replays0 and
                  not l["dcm_logging"])
    wait_caught_up(c, p, G, s)
    print("restore replay:", {k: l[k] for k in ("replays", "replay_total",
                                                "replay_done")})
    assert l["replay_total"] == len(changed), \
        "the restore changed {} extents but the replay copied {}\n{}".format(
            len(changed), l["replay_total"], c.describe(G))
    restored = p.read_all("v1", 8 * MiB)
    assert restored == p.read_all("c1", 8 * MiB), \
        "primary's v1 is not the clone's image after the restore"
    check_equal(c, p, s, vols, "after the restore")


# ---------------------------------------------------------------- 5

def _link_refused(c, p, group, s, token, words, states=("failed",
                                                        "diverged")):
    """rsg link either fails at once or the link ends in states; the
    message must contain every one of words.  Return the message."""
    proc = p.cli("rsg", "link", group, "--secondary", s.addr, "--mode",
                 "async", "--token-file", token, check=False)
    if proc.returncode != 0:
        msg = proc.stdout + proc.stderr
    else:
        l = wait_link(c, p, group, s, states, timeout=15,
                      pred=lambda l: l["error"] or l["stopped_error"])
        msg = "{} {}".format(l["error"], l["stopped_error"])
    for word in words:
        assert word.lower() in msg.lower(), \
            "refusal of {} does not mention {!r}: {}\n{}".format(
                group, word, msg, c.describe(group))
    return msg


def _zeros(node, lu):
    data = node.lu_file(lu).read_bytes()
    return data.count(0) == len(data)


def test_bad_input(cluster):
    c = cluster
    p = c.node("p", lus=[("m1", "8M"), ("n1", "4M"), ("t1", "4M"),
                         ("q1", "4M")])
    s = c.node("s", lus=[("m1", "4M"), ("t1", "4M"), ("q1", "4M")])
    for lu in ("m1", "n1", "t1", "q1"):
        _write_extents(p, lu, [0, 3, 9], seed=hash(lu) & 0xff)
    s.cli("rsg", "create", "gq", "--volume", "q1", "--srl-size", "1M")
    for g, lu in (("gs", "m1"), ("gn", "n1"), ("gt", "t1"), ("gq", "q1")):
        p.cli("rsg", "create", g, "--volume", lu, "--srl-size", "1M")

    msgs = {}
    msgs["size"] = _link_refused(c, p, "gs", s, c.token,
                                 ["m1", "8388608", "4194304"])
    msgs["no LU"] = _link_refused(c, p, "gn", s, c.token, ["n1"])
    msgs["token"] = _link_refused(c, p, "gt", s, c.bad_token, ["token"])
    msgs["two primaries"] = _link_refused(c, p, "gq", s, c.token,
                                          ["two primaries"])
    for k, m in msgs.items():
        print("{}: {}".format(k, m.strip()))
    time.sleep(1.5)   # retries (if any) must not change anything either
    for lu in ("m1", "t1", "q1"):
        assert _zeros(s, lu), "secondary LU {} was written by a refused " \
            "link\n{}".format(lu, c.describe())
    for g in ("gs", "gn", "gt"):
        st = s.rsg(g)
        assert st.get("role") is None, \
            "a refused link left group {} on the secondary: {}".format(g, st)
    assert s.rsg("gq")["role"] == "primary"
    for g in ("gs", "gn", "gt", "gq"):
        l = p.link(g, s)
        assert l["state"] in ("failed", "diverged"), (g, l)


SRL_ENTRY = __import__("struct").Struct("<4sQIBQII")


def _srl_entries(path):
    """[(file offset, seq, vol, kind, off, len)] of the SRL entries."""
    data = path.read_bytes()
    out = []
    for pos in range(4096, len(data) - SRL_ENTRY.size, 512):
        if data[pos:pos + 4] == b"SRLE":
            magic, seq, vol, kind, off, length, crc = \
                SRL_ENTRY.unpack_from(data, pos)
            out.append((pos, seq, vol, kind, off, length))
    return out


def test_corrupt_srl_entry(cluster):
    c = cluster
    vols = [("v1", 8 * MiB)]
    p, (s,) = _pair(c, vols=vols, srl="4M")
    wlog = WriteLog(vols)
    w = Writer(p, wlog, seed=5, flush_every=4)
    w.write_n(100)
    w.flush()
    wait_caught_up(c, p, G, s)
    applied0 = s.rsg(G)["applied_seq"]
    c.cut_between(p, s)
    w.write_n(200)          # 200 entries of 4.5K: well within the 4M SRL
    w.flush()
    w.stop()
    n_after = wlog.seq
    p.cli("stop")
    p.proc.wait(30)
    p.server._log.close()
    p.handles.clear()
    # The first entry the restarted primary will send: the saved tail.
    import json
    tail = json.loads((p.state_dir / "rsg" / (G + ".json")).read_text()
                      )["tail"]["seq"]
    entries = [e for e in _srl_entries(p.state_dir / "rsg" / (G + ".srl"))
               if e[1] >= tail and e[3] == 0]
    assert len(entries) > 20, "too few unsent entries: {}".format(
        len(entries))
    entries.sort(key=lambda e: e[1])
    target = entries[10]
    raw = bytearray((p.state_dir / "rsg" / (G + ".srl")).read_bytes())
    dpos = target[0] + SRL_ENTRY.size
    wseq = __import__("struct").unpack_from("<Q", raw, dpos + 8)[0]
    raw[dpos + 100:dpos + 108] = bytes(b ^ 0xFF for b in
                                       raw[dpos + 100:dpos + 108])
    (p.state_dir / "rsg" / (G + ".srl")).write_bytes(raw)
    print("corrupted SRL entry seq {} (workload seq {}); secondary had {}, "
          "saved tail {}".format(target[1], wseq, applied0, tail))
    p.start()
    c.heal_between(p, s)
    l = wait_link(c, p, G, s, "failed", pred=lambda l: "checksum" in
                  "{} {}".format(l["error"], l["stopped_error"]).lower(),
                  timeout=15)
    print("link:", l["error"] or l["stopped_error"])
    st = wait_secondary_settled(c, s, G)
    assert st["applied_seq"] < target[1], \
        "the secondary applied the corrupt entry {} or later (applied {})" \
        "\n{}".format(target[1], st["applied_seq"], c.describe(G))
    if st.get("consistent"):
        top = wlog.check_prefix(_images(s, vols))
        assert top < wseq, (top, wseq)
    time.sleep(1.5)
    assert s.rsg(G)["applied_seq"] == st["applied_seq"], c.describe(G)
    assert p.link(G, s)["state"] == "failed", c.describe(G)
    assert n_after > wseq


# ---------------------------------------------------------------- 6

def test_promote_after_silent_cut(cluster):
    """A dead link (no FIN, no RST) must not keep the secondary from being
    promoted: the primary is unreachable."""
    c = cluster
    vols = [("v1", 4 * MiB)]
    a, (b,) = _pair(c, vols=vols, srl="1M")
    c.cut_between(a, b)
    _write_extents(a, "v1", [1], seed=7)   # traffic into the dead link
    # The secondary drops a primary silent for IDLE_TIMEOUT (10 s).
    deadline = time.monotonic() + 20
    while True:
        proc = b.cli("rsg", "promote", G, "--force", check=False)
        if proc.returncode == 0:
            break
        assert time.monotonic() < deadline, \
            "promote still refused 20 s after the link died: {}\n{}".format(
                proc.stderr.strip(), c.describe(G))
        time.sleep(0.5)
    assert b.rsg(G)["role"] == "primary"


def test_promote_demote_split_brain(cluster):
    c = cluster
    vols = [("v1", 8 * MiB)]
    a, (b,) = _pair(c, vols=vols, srl="4M")
    _write_extents(a, "v1", range(0, 128, 2), seed=60)
    wait_caught_up(c, a, G, b)
    # The old primary lets go of the link before the cut, so the secondary
    # sees the connection end (after a silent cut alone it would not).
    a.cli("rsg", "detach", G, "--secondary", b.addr)
    c.cut_between(a, b)
    c.wait(lambda: not b.rsg(G).get("connected"), "secondary disconnected",
           G, timeout=10)
    b.cli("rsg", "promote", G)
    assert b.rsg(G)["role"] == "primary", c.describe(G)
    _wait_logged(b, r"INFO clonectl\.target: replicated group {} promoted: "
                 r"generation \S+$".format(G))
    _write_extents(b, "v1", [1, 3, 5], seed=61)      # new primary writes
    _write_extents(a, "v1", [7, 9], seed=62)         # old one too: diverged
    a.cli("rsg", "demote", G)
    assert a.rsg(G)["role"] == "secondary", c.describe(G)
    _wait_logged(a, r"INFO clonectl\.target: replicated group {} demoted: "
                 r"secondary from sequence \d+, \d+ regions not "
                 r"acknowledged by a secondary$".format(G))
    c.heal_between(a, b)
    b.cli("rsg", "link", G, "--secondary", a.addr, "--mode", "async",
          "--token-file", c.token)
    l = wait_link(c, b, G, a, "diverged", pred=lambda l: l["error"])
    print("diverged:", l["error"])
    assert "split brain" in l["error"] or "diverg" in l["error"], l
    time.sleep(0.5)
    assert b.link(G, a)["state"] == "diverged", c.describe(G)
    assert a.read_all("v1", 8 * MiB) != b.read_all("v1", 8 * MiB), \
        "the diverged link sent data before the admin chose"
    b.cli("rsg", "attach", G, "--secondary", a.addr,
          "--discard-secondary-changes")
    wait_caught_up(c, b, G, a)
    l = b.link(G, a)
    print("resync:", {k: l[k] for k in ("replays", "replay_total")})
    check_equal(c, b, a, vols, "after the resync")
    assert l["replay_total"] == 5, \
        "resync of 5 diverged extents copied {} of 128\n{}".format(
            l["replay_total"], c.describe(G))
    _wait_logged(b, r"INFO clonectl\.replication: group {}: replay to \S+ "
                 r"completed: 5 extents in [\d.]+ s$".format(G))
    _wait_logged(a, r"INFO clonectl\.replication: group {}: replay from the "
                 r"primary completed: consistent at sequence \d+$".format(G))


def _wait_logged(node, pattern, timeout=10.0):
    """The line matching pattern in node's run/serve.log (the target's
    lines reach it through the manager, a moment later)."""
    log = node.state_dir / "run" / "serve.log"
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace"),
                        re.MULTILINE):
        assert time.monotonic() < deadline, "no {!r} in:\n{}".format(
            pattern, node.log_tail())
        time.sleep(0.05)


def test_diverged_resync_sends_only_the_changed_extents(cluster):
    """As an admin would: detach, promote the secondary, write 64 extents
    there, demote it, attach --discard-secondary-changes on the primary
    (never promoted).  bytes_sent grows by exactly those 64 extents of
    64 KiB (4 MiB), not the 32 MiB volume; then the policy
    discard-secondary (rsg set) resolves the next split brain on its own,
    again copying only what changed."""
    c = cluster
    size = 32 * MiB
    vols = [("v1", size)]
    a, (b,) = _pair(c, vols=vols, srl="4M")
    _write_extents(a, "v1", range(0, 512, 7), seed=70)
    wait_caught_up(c, a, G, b)

    def split(b_extents, a_extents, seed):
        a.cli("rsg", "detach", G, "--secondary", b.addr)
        c.wait(lambda: not b.rsg(G).get("connected"), "secondary "
               "disconnected", G, timeout=10)
        b.cli("rsg", "promote", G)
        _write_extents(b, "v1", b_extents, seed=seed)
        _write_extents(a, "v1", a_extents, seed=seed + 1)
        b.cli("rsg", "demote", G)
        return a.link(G, b)["bytes_sent"]

    b_extents = list(range(100, 164))
    sent0 = split(b_extents, [], 71)
    a.cli("rsg", "attach", G, "--secondary", b.addr)
    l = wait_link(c, a, G, b, "diverged", pred=lambda l: l["split_brain"])
    assert l["split_brain"]["secondary"] == \
        {"extents": 64, "bytes": 64 * 65536}, l
    assert l["split_brain"]["primary"]["extents"] == 0, l
    assert "split brain" in l["error"], l
    a.cli("rsg", "attach", G, "--secondary", b.addr,
          "--discard-secondary-changes")
    wait_caught_up(c, a, G, b)
    check_equal(c, a, b, vols, "after the resync")
    sent = a.link(G, b)["bytes_sent"] - sent0
    assert sent == 64 * 65536, \
        "the resync of 64 changed extents sent {} bytes (the volume is {})" \
        .format(sent, size)

    a.cli("rsg", "set", G, "--after-split-brain", "discard-secondary")
    assert a.rsg(G)["after_split_brain"] == "discard-secondary"
    sent0 = split([200, 201, 202], [202, 300], 73)
    a.cli("rsg", "attach", G, "--secondary", b.addr)
    wait_caught_up(c, a, G, b)
    check_equal(c, a, b, vols, "after the automatic resync")
    assert a.link(G, b)["bytes_sent"] - sent0 == 4 * 65536
