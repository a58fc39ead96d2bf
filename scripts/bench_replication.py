"""The replication suite of scripts/bench.py, all in one run.

A primary `clonectl serve` in the root network namespace (hosts reach it on
a Unix socket) and a secondary `clonectl serve --replication-port` in a
network namespace of its own, reached over a veth pair with netem delay
1ms on both ends (the RTT is measured by TCP connects and printed); the
namespace, the pair and the shaping are scripts/netns.py's, like the
multi-node tests'.

1. Host write throughput (fio nbd engine) for 1 MiB QD8 sequential and
   4 KiB QD16 random writes on three LUs of the same size on the primary:
   no replication, replicated by an async link, by a sync link; measured
   alternately, medians, ratios to no replication (target async >= 0.7);
   for sync the mean completion latency added per write against the RTT.
   The 4 KiB row also over each --connections count N > 1: the same 16
   requests spread over N connections (as a multi-conn host does:
   concurrent sync writes share a round trip to the secondary).
   After every replicated run the suite waits for the link to catch up
   (state replicating, lag 0) and records whether the SRL overflowed
   during the run (a DCM replay happened).
2. DCM replay throughput: detach a link, write REPLAY_MIB MiB of distinct
   64 KiB extents of random data (scattered over the LU), attach, time
   until the link is `replicating` again; against nbdcopy of the same byte
   count from the primary's export to a qemu-nbd file export inside the
   secondary's namespace over the same veth (ratio replay / copy).  The
   attach is timed from the control request `rsg attach` makes, without
   the CLI's own start.  The secondary keeps its last consistent image
   during a replay, whose save area is a new file at the first replay and
   the file the replay before kept at the later ones: rows for the first
   replay and for the later ones apart, besides all.
3. Convergence: the link is limited to LINK_RATE (netem rate), a group
   with a small SRL is overflowed by an unlimited fio burst, then a fio
   writer limited to half the link's bandwidth starts at once; seconds from
   its start until the link is `replicating` again (and stays so).

With --thread-models, section 1 runs under each thread model of the
primary (restarted with each).  `--only writes`, `--only replay` or
`--only converge` runs that part alone.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import time

import netns

GRANULARITY = 64 << 10
DELAY_MS = 1
LINK_RATE_MBIT = 200
REPLAY_MIB = 64
SRL_WRITES = "256M"      # groups of section 1
SRL_CONVERGE = "16M"     # group of section 3 (small: it must overflow)
BURST_S = 2              # unlimited writes that overflow it
STAY_S = 1
CONVERGE_RUNS = 2         # at most this many convergence runs
CONVERGE_LIMIT_S = 90    # give up waiting for convergence after this
CATCHUP_LIMIT_S = 120
FIO_RAMP_S = 1           # fio's warm-up, not in its figures
REGION = 128 << 20       # fio writes at most this much of each LU
REPL_PORT = 7000
COPY_PORT = 10900
TOKEN = "bench-replication-token-0123456789"

WRITES = [
    # name, rw, bs, iodepth
    ("1M write QD8", "write", "1m", 8),
    ("4K randwrite QD16", "randwrite", "4k", 16),
]
VARIANTS = ("none", "async", "sync")
LU_OF = {"none": "v0", "async": "va", "sync": "vs"}
GROUP_OF = {"async": "ga", "sync": "gs"}


def sh(*cmd, where=netns.HOST, capture=False):
    proc = where.run(cmd, timeout=None)
    return proc.stdout if capture else None


class Net:
    """A network namespace for the secondary, a veth pair, netem on both
    ends (scripts/netns.py)."""

    def __init__(self):
        tag = os.getpid() % 250
        self.lab = netns.Lab("rbench")
        self.ns = None
        self.host_ip, self.ns_ip = "10.213.{}.1".format(tag), \
            "10.213.{}.2".format(tag)
        self.ends = ()
        self.netem, self.no_netem = None, None

    def up(self):
        self.ns = self.lab.namespace()
        self.ends = self.lab.veth(netns.HOST, self.ns, self.host_ip + "/24",
                                  self.ns_ip + "/24")
        self.shape()

    def shape(self, rate_mbit=None):
        """netem delay (and rate) on both ends; without sch_netem in the
        kernel no delay, and tbf for the rate."""
        for end in self.ends:
            try:
                end.shape(delay_ms=DELAY_MS, rate_mbit=rate_mbit)
                self.netem = True
            except netns.NoNetem as e:
                self.netem, self.no_netem = False, str(e)
                if rate_mbit:
                    end.shape(rate_mbit=rate_mbit)
                else:
                    end.clear()

    def rtt_ms(self, count=10):
        """TCP connects to the secondary's replication port (a SYN and its
        SYN-ACK, or RST before it listens)."""
        rtts = [t * 1000 for t in netns.tcp_rtt(self.ns_ip, REPL_PORT,
                                                count)]
        return {"min": min(rtts), "avg": statistics.mean(rtts),
                "max": max(rtts)}

    def down(self):
        self.lab.close()


class Node:
    """One `clonectl serve` (in a namespace or not), stopped by its pid."""

    def __init__(self, bench, state, ns=None):
        self.bench, self.state, self.ns = bench, state, ns
        self.info = None
        from target import inventory as st
        self.sd = st.StateDir(state)

    def clonectl(self, *args, capture=False):
        return sh(self.bench.CLONECTL, "--state-dir", self.state, *args,
                  where=self.ns or netns.HOST, capture=capture)

    def serve(self, *args):
        from target import server
        self.clonectl("serve", "--detach", *args)
        self.info = server.read_serve_info(self.sd)

    def call(self, op, **args):
        from target import control
        return control.call(self.sd.control_socket, op, **args)

    def link(self, group):
        return self.call("rsg_status", name=group)["links"][0]

    def stop(self):
        if not self.info:
            return
        pids = [p for p in (self.info.get("pid"),
                            self.info.get("nbdkit_pid")) if p]
        self.info = None
        _kill(pids[0], signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        for p in pids:
            if _alive(p):
                _kill(p, signal.SIGKILL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie child of ours counts as gone
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def fio_cmd(uri, rw, bs, iodepth, runtime, size, rate=None, ramp=True,
            extra=()):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, *extra,
           "--rw=" + rw, "--bs=" + bs, "--iodepth=" + str(iodepth),
           "--size=" + str(size), "--time_based", "--runtime=" + str(runtime),
           "--randrepeat=0", "--norandommap", "--output-format=json"]
    if ramp:
        cmd.append("--ramp_time={}".format(FIO_RAMP_S))
    if rate:
        cmd.append("--rate=" + str(rate))
    return cmd


def fio_result(out):
    # fio prints "fio: connected to NBD server" before its JSON.
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return {"iops": job["iops"], "mbps": job["bw_bytes"] / 1e6,
            "clat_us": job["clat_ns"]["mean"] / 1000.0}


def run_fio(bench, uri, rw, bs, iodepth, runtime, size, connections=1):
    """iodepth in all, over connections NBD connections."""
    out = subprocess.run(fio_cmd(uri, rw, bs, iodepth // connections,
                                 runtime, size,
                                 extra=bench.connections_args(connections)),
                         capture_output=True, text=True, check=True).stdout
    return fio_result(out)


def wait_replicating(node, group, limit, replays_above=None):
    """Seconds until the group's link is replicating with lag 0 (and, if
    given, has done more than replays_above replays); None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        s = node.link(group)
        if s["state"] == "replicating" and s["lag_updates"] == 0 and \
                (replays_above is None or s["replays"] > replays_above):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def write_extents(uri, size, nbytes, seed):
    """nbytes of random data in distinct 64 KiB extents spread over the
    LU (a random sample: some adjacent, most not)."""
    import nbd
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(size // GRANULARITY),
                               nbytes // GRANULARITY))
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for x in chosen:
            h.pwrite(os.urandom(GRANULARITY), x * GRANULARITY)
        h.flush()
    finally:
        h.shutdown()
    return len(chosen)


def run(bench, args, size, workdir):
    out = {"size": size, "writes": {}, "overflow": {}, "replay": [],
           "converge": [], "errors": {}}
    region = min(size, REGION)
    p_state, s_state = os.path.join(workdir, "P"), os.path.join(workdir, "S")
    token = os.path.join(workdir, "token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(TOKEN)
    copy_img = os.path.join(workdir, "copy-dst.img")
    copy_src = os.path.join(workdir, "copy-src.img")
    net = Net()
    prim = Node(bench, p_state)
    sec = Node(bench, s_state)
    p_sock = os.path.join(workdir, "p.sock")
    s_sock = os.path.join(workdir, "s.sock")

    def uri(lu):
        return "nbd+unix:///{}?socket={}".format(lu, p_sock)

    secondary = "{}:{}".format(net.ns_ip, REPL_PORT)
    try:
        net.up()
        sec.ns = net.ns
        out["rtt_ms"] = net.rtt_ms()
        out["netem"], out["no_netem"] = net.netem, net.no_netem
        out["kernel"] = os.uname().release
        bench.make_image(copy_src, REPLAY_MIB << 20)
        for lu in ("v0", "va", "vs", "vd", "vc"):
            prim.clonectl("lu", "create", lu, "--size", str(size))
        prim.clonectl("lu", "create", "cpsrc", "--file", copy_src)
        for lu in ("va", "vs", "vd", "vc"):
            sec.clonectl("lu", "create", lu, "--size", str(size))
        sec.serve("--socket", s_sock, "--replication-port", str(REPL_PORT),
                  "--replication-bind", net.ns_ip,
                  "--replication-token-file", token)
        prim.serve("--socket", p_sock)
        for g, lu, srl, mode in (("ga", "va", SRL_WRITES, "async"),
                                 ("gs", "vs", SRL_WRITES, "sync"),
                                 ("gd", "vd", SRL_WRITES, "async"),
                                 ("gc", "vc", SRL_CONVERGE, "async")):
            prim.clonectl("rsg", "create", g, "--volume", lu, "--srl-size",
                          srl)
            prim.clonectl("rsg", "link", g, "--secondary", secondary,
                          "--mode", mode, "--token-file", token)
        for g in ("ga", "gs", "gd", "gc"):
            if wait_replicating(prim, g, CATCHUP_LIMIT_S) is None:
                raise RuntimeError("link of {} never replicated: {}".format(
                    g, prim.link(g)))

        # 1. Host writes, the three variants alternately, per thread model
        # of the primary (restarted with each, in turn within a repeat).
        models = (args.thread_models or "default").split(",")
        serving = "default"
        rows = [(name if n == 1 else "{}, {} connections x QD{}".format(
                    name, n, qd // n), rw, bs, qd, n)
                for name, rw, bs, qd in WRITES
                for n in (args.connections if bs == "4k" else [1])]
        for name, rw, bs, qd, conns in rows if want(args, "writes") else ():
            samples = {m: {v: [] for v in VARIANTS} for m in models}
            overflow = {m: {v: 0 for v in GROUP_OF} for m in models}
            catchup = {m: {v: [] for v in GROUP_OF} for m in models}
            for rep in range(args.repeat):
                for model in bench.rotate(models, rep):
                    if model != serving:
                        prim.stop()
                        prim.serve("--socket", p_sock,
                                   *bench.thread_model_args(model))
                        serving = model
                        for g in ("ga", "gs"):
                            if wait_replicating(prim, g,
                                                CATCHUP_LIMIT_S) is None:
                                raise RuntimeError(
                                    "link of {} never replicated after a "
                                    "restart: {}".format(g, prim.link(g)))
                    for v in bench.rotate(VARIANTS, rep):
                        before = prim.link(GROUP_OF[v])["replays"] \
                            if v in GROUP_OF else None
                        # The machine's CPU until the secondary has every
                        # write: an async link's catching up after fio is
                        # part of what its writes cost.
                        with bench.MachineCpu() as cpu:
                            run = run_fio(bench, uri(LU_OF[v]), rw, bs, qd,
                                          args.runtime, region, conns)
                            took = wait_replicating(
                                prim, GROUP_OF[v], CATCHUP_LIMIT_S) \
                                if v in GROUP_OF else None
                        run["cpu_us"] = cpu.us_per_request(
                            run["iops"], args.runtime + FIO_RAMP_S)
                        run["busy"] = cpu.busy
                        samples[model][v].append(run)
                        if v in GROUP_OF:
                            if took is None:
                                raise RuntimeError("link {} did not catch "
                                                   "up after fio".format(v))
                            catchup[model][v].append(took)
                            if prim.link(GROUP_OF[v])["replays"] > before:
                                overflow[model][v] += 1
            out["writes"][name] = {
                m: {v: {k: statistics.median(s[k] for s in samples[m][v])
                        for k in ("iops", "mbps", "clat_us", "cpu_us",
                                  "busy")}
                    for v in VARIANTS}
                for m in models}
            for w in out["writes"][name].values():
                for v in GROUP_OF:
                    w[v]["cpu_ceiling"] = bench.cpu_ceiling(
                        w["none"]["iops"], w[v]["cpu_us"])
            out["overflow"][name] = {
                m: {v: {"runs": overflow[m][v],
                        "catchup_s": statistics.median(catchup[m][v])}
                    for v in GROUP_OF}
                for m in models}
        if serving != "default":
            prim.stop()
            prim.serve("--socket", p_sock)

        # 2. DCM replay against a plain copy of the same byte count.
        if want(args, "replay"):
            replay(bench, args, net, prim, secondary, size, uri, copy_img,
                   out)

        # 3. Convergence under half the link's bandwidth, from an overflow.
        if want(args, "converge"):
            converge(bench, args, net, prim, region, uri, out)
    finally:
        for node in (prim, sec):
            try:
                node.stop()
            except Exception as e:  # keep cleaning up
                out["errors"]["stop"] = str(e)
        net.down()
    return out


def want(args, part):
    """--only writes|replay|converge runs that part alone."""
    return not args.only or args.only in part


def replay(bench, args, net, prim, secondary, size, uri, copy_img, out):
    open(copy_img, "wb").close()
    os.truncate(copy_img, REPLAY_MIB << 20)
    qemu = net.ns.popen(
        ["qemu-nbd", "-f", "raw", "-x",
         "cp", "-b", net.ns_ip, "-p", str(COPY_PORT), "-t",
         "--cache=writeback", copy_img],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        dst = "nbd://{}:{}/cp".format(net.ns_ip, COPY_PORT)
        deadline = time.monotonic() + 10
        while subprocess.run(["nbdinfo", "--size", dst],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or qemu.poll() is not None:
                raise RuntimeError("qemu-nbd in the namespace did not start")
            time.sleep(0.1)
        for rep in range(args.repeat):
            for what in bench.rotate(("replay", "copy"), rep):
                # Both nodes share this machine's file system: an fsync
                # of either would also write back what the run before
                # (or the setup) left dirty (ext4's ordered journal).
                # Each timed run starts with nothing dirty.
                if what == "copy":
                    os.sync()
                    with bench.MachineCpu() as copy_cpu:
                        subprocess.run(["nbdcopy", "--flush", uri("cpsrc"),
                                        dst], check=True)
                    copy_s = copy_cpu.wall_s
                    continue
                prim.clonectl("rsg", "detach", "gd", "--secondary",
                              secondary)
                extents = write_extents(uri("vd"), size, REPLAY_MIB << 20,
                                        seed=rep)
                os.sync()
                before = prim.link("gd")
                with bench.MachineCpu() as replay_cpu:
                    # The request `rsg attach` makes (not the CLI's own
                    # start).
                    prim.call("rsg_attach", name="gd", secondary=secondary,
                              discard_secondary_changes=False, rate=None)
                    took = wait_replicating(prim, "gd", CATCHUP_LIMIT_S,
                                            replays_above=before["replays"])
                if took is None:
                    raise RuntimeError("replay did not finish: {}".format(
                        prim.link("gd")))
                replay_s = replay_cpu.wall_s
                after = prim.link("gd")
            out["replay"].append({
                "extents": extents, "dcm_extents": before["dcm_extents"],
                "replay_total": after["replay_total"],
                "bytes": extents * GRANULARITY, "replay_s": replay_s,
                # The pass alone (RBEG to the last data sent).
                "pass_s": (after["replay"] or {}).get("elapsed"),
                "sent": after["bytes_sent"] - before["bytes_sent"],
                "copy_s": copy_s,
                "replay_cpu_s": replay_cpu.cpu_s, "replay_busy": replay_cpu.busy,
                "copy_cpu_s": copy_cpu.cpu_s, "copy_busy": copy_cpu.busy})
    finally:
        # qemu-nbd entered the namespace itself: this pid is its own.
        qemu.terminate()
        try:
            qemu.wait(10)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()


def converge(bench, args, net, prim, region, uri, out):
    net.shape(rate_mbit=LINK_RATE_MBIT)
    out["rtt_rate_ms"] = net.rtt_ms(5)
    rate = LINK_RATE_MBIT * 1000000 // 8 // 2
    out["rate"] = rate
    for rep in range(min(args.repeat, CONVERGE_RUNS)):
        if wait_replicating(prim, "gc", CATCHUP_LIMIT_S) is None:
            raise RuntimeError("gc not replicating before the burst")
        before = prim.link("gc")
        subprocess.run(fio_cmd(uri("vc"), "write", "1m", 8, BURST_S,
                               region // 4, ramp=False),
                       capture_output=True, check=True)
        writer = subprocess.Popen(
            fio_cmd(uri("vc"), "randwrite", "64k", 4, CONVERGE_LIMIT_S,
                    region // 4, rate=rate, ramp=False),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start = prim.link("gc")
        took = None
        try:
            took = wait_replicating(prim, "gc", CONVERGE_LIMIT_S - 5)
            stayed = None
            if took is not None:
                time.sleep(STAY_S)
                s = prim.link("gc")
                stayed = s["state"] == "replicating"
        finally:
            writer.send_signal(signal.SIGINT)
            fout, _ = writer.communicate(timeout=30)
        end = prim.link("gc")
        try:
            wrote = fio_result(fout)["mbps"]
        except (ValueError, KeyError, IndexError):
            wrote = None
        out["converge"].append({
            "start_state": start["state"],
            "overflowed": start["replays"] > before["replays"] or
            start["state"] != "replicating",
            "start_dcm": start["dcm_extents"],
            "replays": end["replays"] - before["replays"],
            "seconds": took, "stayed": stayed, "writer_mbps": wrote,
            "final_state": end["state"]})
        if took is None:
            break
    net.shape(rate_mbit=None)


def print_tables(res, args):
    rtt = res.get("rtt_ms", {})
    if res.get("netem"):
        link = "netem delay {}ms each way".format(DELAY_MS)
        rate_how = "netem rate"
    else:
        link = ("NO added delay: netem fails on this kernel "
                "({}: \"{}\"), so the link is the bare veth".format(
                    res.get("kernel"), res.get("no_netem")))
        rate_how = "tbf rate (no netem)"
    res["rate_how"] = rate_how
    print("**Replication** (`scripts/bench --suite replication`, {}, {} "
          "LUs (fio over the first {}), secondary in its own netns over a "
          "veth pair, {}; TCP connect RTT min/avg/max {:.3f}/{:.3f}/{:.3f} "
          "ms{}; "
          "{} runs of {} s, medians)".format(
              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              args.size, _fmt(min(res["size"], REGION)), link,
              rtt.get("min", 0), rtt.get("avg", 0), rtt.get("max", 0),
              " ({})".format(rtt["why"]) if rtt.get("why") else "",
              args.repeat, args.runtime))
    print()
    if res["writes"]:
        print("| host writes | primary's thread model[@thread state] | "
              "no replication | async link | async / none "
              "(target >= 0.7) | sync link | sync / none (target >= 0.3) | "
              "sync: latency added "
              "per write (mean clat) | added / RTT | SRL overflowed "
              "(async, sync) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        avg = rtt.get("avg") or float("nan")
        for name, by_model in res["writes"].items():
            unit, key = ("MB/s", "mbps") if name.startswith("1M") \
                else ("IOPS", "iops")
            for model, w in by_model.items():
                n, a, s = w["none"], w["async"], w["sync"]
                added = (s["clat_us"] - n["clat_us"]) / 1000.0
                ov = res["overflow"][name][model]
                print("| {} | {} | {:.0f} {u} | {:.0f} {u} | {:.2f} | "
                      "{:.0f} {u} | {:.2f} | {:.3f} ms ({:.3f} -> {:.3f}) | "
                      "{:.1f} | {}/{}, {}/{} runs |".format(
                          name, model, n[key], a[key], a[key] / n[key],
                          s[key], s[key] / n[key], added,
                          n["clat_us"] / 1000.0, s["clat_us"] / 1000.0,
                          added / avg, ov["async"]["runs"], args.repeat,
                          ov["sync"]["runs"], args.repeat, u=unit))
        print()
        print("The machine's CPU (every process: fio, the primary, the "
              "secondary, the kernel's work for them) from fio's start "
              "until the secondary had every write, per write:")
        print()
        print("| host writes | primary's thread model[@thread state] | CPU "
              "µs per write: none / async / sync | cores busy: none / async "
              "/ sync | CPU ceiling of the ratio: async, sync |")
        print("|---|---|---|---|---|")
        for name, by_model in res["writes"].items():
            for model, w in by_model.items():
                n, a, s = w["none"], w["async"], w["sync"]
                print("| {} | {} | {:.1f} / {:.1f} / {:.1f} | {:.0%} / {:.0%} "
                      "/ {:.0%} | {:.2f}, {:.2f} |".format(
                          name, model, n["cpu_us"], a["cpu_us"], s["cpu_us"],
                          n["busy"], a["busy"], s["busy"],
                          a["cpu_ceiling"], s["cpu_ceiling"]))
        print()
    rp = res["replay"]
    if rp:
        nbytes = rp[0]["bytes"]
        print("| DCM replay of {} in {} distinct 64K extents | replay s "
              "(attach request -> replicating) | MB/s | nbdcopy --flush of "
              "{} to qemu-nbd in the netns, s | MB/s | replay / copy "
              "throughput |".format(_fmt(nbytes), rp[0]["extents"],
                                    _fmt(nbytes)))
        print("|---|---|---|---|---|---|")
        replay = statistics.median(r["replay_s"] for r in rp)
        copy = statistics.median(r["copy_s"] for r in rp)
        sent = statistics.median(r["sent"] for r in rp)
        print("| same veth, no rate limit (DCM {} extents, {:.2f} x bytes "
              "sent) | {:.2f} | {:.0f} | {:.2f} | {:.0f} | {:.2f} |".format(
                  rp[0]["dcm_extents"], sent / nbytes, replay,
                  nbytes / 1e6 / replay, copy, nbytes / 1e6 / copy,
                  copy / replay))
        # The secondary keeps its last consistent image during a replay;
        # the image's save area is a new file at the group's first replay
        # and the file the replay before kept at the later ones.
        if len(rp) > 1:
            for what, runs in (("first replay", rp[:1]),
                               ("later replays", rp[1:])):
                s = statistics.median(r["replay_s"] for r in runs)
                print("| {} ({}) | {:.2f} | {:.0f} | {:.2f} | {:.0f} | "
                      "{:.2f} |".format(what, " ".join(
                          "{:.2f}".format(r["replay_s"]) for r in runs), s,
                          nbytes / 1e6 / s, copy, nbytes / 1e6 / copy,
                          copy / s))
        med = {k: statistics.median(r[k] for r in rp)
               for k in ("replay_cpu_s", "replay_busy", "copy_cpu_s",
                         "copy_busy")}
        print()
        print("| the machine's CPU (every process) | CPU s per GB moved | "
              "cores busy |")
        print("|---|---|---|")
        for what in ("replay", "copy"):
            print("| {} | {:.2f} | {:.0%} |".format(
                what, med[what + "_cpu_s"] / (nbytes / 1e9),
                med[what + "_busy"]))
        # A replay keeping every core busy at its CPU per byte would take
        # its CPU seconds over the cores.
        print("| CPU ceiling of replay / copy | {:.2f} | |".format(
            os.cpu_count() * copy / med["replay_cpu_s"]
            if med["replay_cpu_s"] else float("nan")))
        print()
    cv = res["converge"]
    if cv:
        print("| converge under load (link {} Mbit/s, {}, RTT avg {:.3f} "
              "ms; SRL {}; fio 64K randwrite QD4 limited to {:.1f} MB/s) | "
              "start state (DCM extents) | writer MB/s | replays | seconds to "
              "replicating | stays replicating {} s later |".format(
                  LINK_RATE_MBIT, rate_how,
                  res.get("rtt_rate_ms", {}).get("avg", 0),
                  SRL_CONVERGE, res.get("rate", 0) / 1e6, STAY_S))
        print("|---|---|---|---|---|---|")
        for i, c in enumerate(cv):
            print("| run {}{} | {} ({}) | {} | {} | {} | {} |".format(
                i + 1, "" if c["overflowed"] else " (did NOT overflow)",
                c["start_state"], c["start_dcm"],
                "-" if c["writer_mbps"] is None else
                "{:.1f}".format(c["writer_mbps"]), c["replays"],
                "did not converge in {} s (ended {})".format(
                    CONVERGE_LIMIT_S - 5, c["final_state"])
                if c["seconds"] is None else "{:.2f}".format(c["seconds"]),
                "-" if c["stayed"] is None else
                ("yes" if c["stayed"] else "no")))
        done = [c["seconds"] for c in cv if c["seconds"] is not None]
        if done and len(done) == len(cv):
            print("| median | | | | {:.2f} | |".format(statistics.median(done)))
    if res["errors"]:
        print()
        print("(cleanup: {})".format(res["errors"]))


def _fmt(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "{}{}iB".format(n >> shift, unit)
    return str(n)
