"""Benchmarks of clonectl, measured with fio's nbd engine.

--suite nbd (the default): clonectl against nbdkit's file plugin and
qemu-nbd, serving the same file.

--suite clones: the cost and speed of clones, all in one run:
  1. 1 MiB sequential and 4 KiB random writes (QD16) to a Source with one
     synchronized clone, as a ratio to the same kind of LU without a clone;
  2. sync and reverse sync of an LU with 10% and 100% of its extents dirty
     (written through the fractured clone's export, spread over the LU),
     against the time `cp` (100%) or `dd` (10%, contiguous) takes to copy
     the same bytes on the same disk, fsync included on both sides;
  3. 4 KiB random read latency (p99, QD1) on the Source while a sync or a
     reverse sync runs, against idle;
  4. "clone of an empty LU": the first sync of a new clone of an empty
     (all holes) LU against that of an LU full of data, and the clone
     file's allocated size (targets: < 0.1 of the time, < 1% of the size).
     `--only "empty"` runs just this row.

--suite restore: protected restore, all in one run:
  1. a 4 KiB read of the Source that needs a copy on demand (COD): p50/p99
     of random 4 KiB reads at QD1, each in a different extent not restored
     yet (a replayed fio iolog over the second half of the LU, while a
     `restore --full --rate 1M` crawls through the first), against the same
     reads of an idle Source and against one 64 KiB copy (the granularity:
     pread of the clone + pwrite, in this process, on the same disk);
  2. restore throughput of the whole LU (`restore --full`, no host I/O)
     against `cp` of the same bytes, fsync included (target >= 0.8);
  3. restore throughput while fio runs randrw 4 KiB QD16 on the Source, and
     fio's IOPS during the restore against an idle Source.

--suite sessions: incremental copy sessions: bytes sent for 1%,
10% and 100% changed extents, full-transfer throughput against nbdcopy,
host writes while marked and transferring; see scripts/bench_sessions.py.

--suite iscsi: the iSCSI gateway: 4 KiB and 1 MiB reads through
iSCSI (tgtd -> nbdfuse -> our NBD) against the same LU over NBD, against
the gateway's FUSE file served by a tgtd started as before (no malloc
tunables) and against tgtd serving the file directly; see
scripts/bench_iscsi.py (not in "all").

--suite replication: replicated storage groups: host 1 MiB and
4 KiB writes with no replication, an async and a sync link to a secondary in
a network namespace (veth, netem delay); DCM replay throughput against
nbdcopy over the same link; time to converge under half the link's
bandwidth from an overflowed SRL; see scripts/bench_replication.py (needs
root: network namespaces of scripts/netns.py, pyroute2; not in "all").

--suite scale: several clients at once: aggregate 4 KiB random read and
write IOPS (QD16) of 1, 2 and 4 clients on separate LUs and on one LU, as a
ratio to one client, for nbdkit's file plugin, a bare Python plugin and
clonectl serving the same files (`--servers ...,clonectl-per-lu`: one
clonectl serve per LU); see scripts/bench_scale.py (not in "all").

--suite machine: what the machine itself gives, no server: memory copy
bandwidth of one and of two processes at once, and 1 MiB page-cache
writes to one file, to two in turn and to two side by side; see
scripts/bench_machine.py.

Rows that compare a variant with its baseline (clones, sessions' first
writes, replication) also print the whole machine's CPU per request
(every process: fio, the servers, a secondary; /proc/stat), the share of
the cores kept busy, and the CPU ceiling of the ratio: what the variant
would reach if it kept every core busy at its CPU per request.  A ratio
far below its ceiling waits (one request at a time, a round trip, a
flush); a target above the ceiling needs less CPU per request.

--suite jobs: every job file of scripts/fio (the workloads the guest test
and the Vagrant host run: randrw-4k, seq-1m, verify) through fio's nbd
engine against the --servers variants; IOPS and MB/s per job.

--suite all runs all but jobs, iscsi, replication and scale.

Variants are measured alternately within each row and each row is
repeated; the tables show medians.  This machine is noisy (±20-30% run to
run), which is why nothing here is a pass/fail test.
"""

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_iscsi  # noqa: E402
import bench_machine  # noqa: E402
import bench_replication  # noqa: E402
import bench_scale  # noqa: E402
import bench_sessions  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONECTL = os.path.join(REPO, ".venv", "bin", "clonectl")

WORKLOADS = [
    # name, rw, bs, iodepth
    ("4K randread QD1", "randread", "4k", 1),
    ("4K randread QD16", "randread", "4k", 16),
    ("4K randwrite QD1", "randwrite", "4k", 1),
    ("4K randwrite QD16", "randwrite", "4k", 16),
    ("1M read QD1", "read", "1m", 1),
    ("1M read QD16", "read", "1m", 16),
    ("1M write QD1", "write", "1m", 1),
    ("1M write QD16", "write", "1m", 16),
]


def wait_socket(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited: {}".format(proc.args))
        if os.path.exists(path):
            r = subprocess.run(["nbdinfo", "--list", "nbd+unix://?socket=" + path],
                               capture_output=True)
            if r.returncode == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("server on {} did not start".format(path))


class Servers(contextlib.ExitStack):
    """Start every server to compare on the same file (clonectl variants
    after the first on copies: own_file); stop them by PID.

    images: {variant: path} for variants that must not share the image.
    Variant "clonectl+clone" is clonectl serving LU "bench" with one clone
    "c1", synchronized before start() returns.
    """

    def __init__(self, workdir, image, variants, images=None):
        super().__init__()
        self.workdir = workdir
        self.image = image
        self.images = images or {}
        self.variants = variants
        self.uris = {}
        self.states = {}
        self.sockets = {}
        self._claimed = set()

    def own_file(self, path, variant):
        """The file a clonectl variant serves in place of path.  clonectl
        locks what it serves against other writers (target/filelocks.py),
        so two clonectl variants of one run cannot serve one file: the
        first serves path, each later one a sparse copy of it (removed at
        exit).  The other servers take no lock on it (qemu-nbd is told
        locking=off)."""
        if path not in self._claimed:
            self._claimed.add(path)
            return path
        copy = "{}.{}".format(path, variant.replace(":", "-").replace(
            "@", "-"))
        subprocess.run(["cp", "--sparse=always", path, copy], check=True)
        self.callback(os.unlink, copy)
        return copy

    def _popen(self, cmd, log):
        f = open(os.path.join(self.workdir, log), "wb")
        proc = subprocess.Popen(cmd, stdout=f, stderr=f,
                                start_new_session=True)
        self.callback(self._stop, proc, f)
        return proc

    @staticmethod
    def _stop(proc, f):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        f.close()

    def start(self):
        for variant in self.variants:
            sock = os.path.join(self.workdir, variant.replace(":", "-") + ".sock")
            if variant == "nbdkit-file":
                proc = self._popen(["nbdkit", "-f", "--exit-with-parent", "-U",
                                    sock, "file", self.image], variant + ".log")
                uri = "nbd+unix:///?socket=" + sock
            elif variant == "qemu-nbd":
                proc = self._popen(
                    ["qemu-nbd", "--persistent", "--shared=16", "--socket",
                     sock, "--image-opts",
                     "driver=raw,file.driver=file,file.locking=off,"
                     "file.filename=" + self.image], variant + ".log")
                uri = "nbd+unix:///?socket=" + sock
            elif variant.startswith("clonectl"):
                spec, _, thread_state = variant.partition("@")
                _, model, threads = (spec.split(":") + ["", ""])[:3]
                state = os.path.join(self.workdir, variant.replace(":", "-"))
                subprocess.run([CLONECTL, "--state-dir", state, "lu", "create",
                                "bench", "--file",
                                self.images.get(variant) or self.own_file(
                                    self.image, variant)],
                               check=True, stdout=subprocess.DEVNULL)
                if variant.startswith("clonectl+clone"):
                    clonectl(state, "clone", "add", "bench", "c1")
                self.states[variant] = state
                cmd = [CLONECTL, "--state-dir", state, "serve", "--socket", sock]
                if model:
                    cmd += ["--thread-model", model]
                if threads:
                    cmd += ["--threads", threads]
                if thread_state:
                    cmd += ["--thread-state", thread_state]
                proc = self._popen(cmd, variant.replace(":", "-") + ".log")
                uri = "nbd+unix:///bench?socket=" + sock
            else:
                raise SystemExit("unknown server variant " + variant)
            wait_socket(sock, proc)
            self.uris[variant] = uri
            self.sockets[variant] = sock
            if variant.startswith("clonectl+clone"):
                clonectl(self.states[variant], "clone", "sync", "c1", "--wait")


def fio_command(uris, rw, bs, iodepth, size, runtime, ramp=1, extra=()):
    """fio's nbd engine for runtime seconds (after ramp seconds not
    measured), JSON output: one job, with its own NBD connection, per URI,
    all started together; extra: more options for every job."""
    cmd = ["fio", "--ioengine=nbd", "--rw=" + rw, "--bs=" + bs,
           "--iodepth=" + str(iodepth), "--size=" + str(size),
           "--time_based", "--runtime=" + str(runtime),
           "--ramp_time=" + str(ramp), "--randrepeat=0", "--norandommap",
           "--output-format=json", *extra]
    for i, uri in enumerate(uris):
        cmd += ["--name=c{}".format(i), "--uri=" + uri]
    return cmd


def fio_jobs(out):
    """The jobs of fio's JSON output (it prints "fio: connected to NBD
    server" before it)."""
    return json.loads(out[out.index("{"):])["jobs"]


def run_fio_command(cmd, cwd=None):
    """Run a fio_command; its jobs."""
    return fio_jobs(subprocess.run(cmd, capture_output=True, text=True,
                                   check=True, cwd=cwd).stdout)


def connections_args(connections):
    """fio's options that spread a job over that many NBD connections, as
    a multi-conn host (nbd-client -C, qemu) spreads one queue: as many
    jobs (fio's nbd engine opens one connection per job), reported as
    one.  The caller divides the queue depth among them."""
    if connections == 1:
        return ()
    return ("--numjobs={}".format(connections), "--group_reporting")


def machine_busy_seconds():
    """CPU seconds the machine's cores have been busy since boot, all
    processes and the kernel's work for them (/proc/stat: user, nice,
    system, irq, softirq; idle, iowait and steal left out)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = \
            (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class MachineCpu:
    """The whole machine's CPU over a span (a with block): what a row's
    requests cost every process together (fio, the server, a secondary on
    the same machine), so a ratio can be read against its CPU ceiling
    (cpu_ceiling)."""

    def __enter__(self):
        self._t0 = time.monotonic()
        self._c0 = machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.monotonic() - self._t0
        self.cpu_s = machine_busy_seconds() - self._c0
        return False

    @property
    def busy(self):
        """The share of every core's time spent busy, 0 to 1."""
        return self.cpu_s / (self.wall_s * os.cpu_count())

    def us_per_request(self, iops, seconds):
        """CPU µs per request for iops over seconds of I/O in the span."""
        return self.cpu_s * 1e6 / max(iops * seconds, 1)


def cpu_ceiling(base_iops, variant_us):
    """The ratio variant/base the variant would reach if it kept every core
    busy at its CPU per request.  A ratio far below it waits (one request
    at a time, a round trip, a flush): less waiting would raise it.  A
    target above it needs less CPU per request, whatever the waiting."""
    if not base_iops or not variant_us:
        return float("nan")
    return os.cpu_count() * 1e6 / variant_us / base_iops


def run_fio(uri, rw, bs, iodepth, runtime, size, connections=1, ramp=1):
    """iodepth in all, over connections NBD connections.  cpu_us: the
    machine's CPU per request over the run (ramp included, at the same
    load); busy: its share of every core."""
    with MachineCpu() as cpu:
        job = run_fio_command(fio_command(
            [uri], rw, bs, iodepth // connections, size, runtime, ramp=ramp,
            extra=connections_args(connections)))[0]
    side = job["read"] if "read" in rw else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p99_us": pct.get("99.000000", 0) / 1000.0,
            "cpu_us": cpu.us_per_request(side["iops"], runtime + ramp),
            "busy": cpu.busy}


def make_image(path, size):
    """A fully allocated file of random data, so reads are not holes."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main():
    # Stopped by SIGTERM (timeout(1), a CI job's end) as by Ctrl-C: the
    # suites' cleanup then stops the servers they started.
    signal.signal(signal.SIGTERM, _interrupted)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("nbd", "clones", "restore", "sessions",
                                       "jobs", "iscsi", "replication",
                                       "scale", "machine", "all"),
                   default="nbd",
                   help="nbd: servers side by side; clones: clone overhead, "
                        "sync speed and latency; restore: protected restore "
                        "COD latency and throughput; sessions: incremental "
                        "transfers; replication: replicated storage groups "
                        "(root); scale: several clients at once; machine: "
                        "copy bandwidth and page-cache writes, no server; "
                        "all: "
                        "every suite but jobs, iscsi, replication and "
                        "scale "
                        "(default nbd)")
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--runtime", type=int, default=5,
                   help="seconds per fio run (default 5)")
    p.add_argument("--repeat", type=int, default=3,
                   help="repeats per row; medians are shown (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="runtime 2 s, 1 repeat, 256M image")
    p.add_argument("--servers",
                   help="nbd suite: comma-separated variants: nbdkit-file, "
                        "qemu-nbd, clonectl[:THREAD_MODEL[:THREADS]]"
                        "[@THREAD_STATE] "
                        "(default nbdkit-file,qemu-nbd,clonectl); scale "
                        "suite: nbdkit-file, python[:THREAD_MODEL[:THREADS]],"
                        " clonectl[:THREAD_MODEL[:THREADS]] (default "
                        "nbdkit-file,python,clonectl)")
    p.add_argument("--thread-models", metavar="MODEL[@STATE],...",
                   help="sessions suite (first writes) and replication "
                        "suite (host writes, the primary): thread models of "
                        "`serve --thread-model` to measure alternately, each "
                        "with an optional @THREAD_STATE of `serve "
                        "--thread-state`; 'default' is the server's own "
                        "(default: sessions default,parallel; replication "
                        "default)")
    p.add_argument("--connections", metavar="N,...", default="1,4",
                   help="sessions suite (first writes) and replication "
                        "suite (4K randwrite): the same total queue depth "
                        "over N NBD connections (fio jobs), a row for each "
                        "N, the peer measured in the same shape "
                        "(default 1,4)")
    p.add_argument("--only", help="run only workloads whose name contains "
                   "this (replication suite: writes, replay or converge)")
    p.add_argument("--json", metavar="FILE", help="also write results as JSON")
    p.add_argument("--workdir", help="where to put the image (default: a "
                   "temporary directory under /var/tmp)")
    args = p.parse_args()
    args.servers_given = args.servers is not None
    if args.servers is None:
        args.servers = "nbdkit-file,qemu-nbd,clonectl"
    if args.quick:
        args.runtime, args.repeat, args.size = 2, 1, "256M"
    args.connections = [int(n) for n in args.connections.split(",")]
    size = int(subprocess.check_output(
        ["numfmt", "--from=iec", args.size]).decode())

    workdir = tempfile.mkdtemp(prefix="clonectl-bench-",
                               dir=args.workdir or "/var/tmp")
    report = {}
    try:
        for suite, run in (("nbd", run_nbd_suite),
                           ("clones", run_clones_suite),
                           ("restore", run_restore_suite),
                           ("sessions", run_sessions_suite),
                           ("jobs", run_jobs_suite),
                           ("iscsi", run_iscsi_suite),
                           ("replication", run_replication_suite),
                           ("scale", run_scale_suite),
                           ("machine", run_machine_suite)):
            if args.suite == suite or (args.suite == "all" and
                                       suite not in ("jobs", "iscsi",
                                                     "replication", "scale")):
                os.mkdir(os.path.join(workdir, suite))
                report[suite] = run(args, size, os.path.join(workdir, suite))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if "nbd" in report:
        print_table(report["nbd"]["results"], report["nbd"]["variants"],
                    report["nbd"]["base"], args)
    if "clones" in report:
        if "nbd" in report:
            print()
        print_clones_tables(report["clones"], args)
    if "restore" in report:
        if len(report) > 1:
            print()
        print_restore_tables(report["restore"], args)
    if "sessions" in report:
        if len(report) > 1:
            print()
        bench_sessions.print_tables(report["sessions"], args)
    if "jobs" in report:
        print_jobs_table(report["jobs"], args)
    if "iscsi" in report:
        bench_iscsi.print_tables(report["iscsi"], args)
    if "replication" in report:
        if len(report) > 1:
            print()
        bench_replication.print_tables(report["replication"], args)
    if "scale" in report:
        if len(report) > 1:
            print()
        bench_scale.print_tables(report["scale"], args)
    if "machine" in report:
        if len(report) > 1:
            print()
        bench_machine.print_tables(report["machine"], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(args),
                       "results": report}, f, indent=2)


def run_iscsi_suite(args, size, workdir):
    return bench_iscsi.run(sys.modules[__name__], args, size, workdir)


def run_replication_suite(args, size, workdir):
    return bench_replication.run(sys.modules[__name__], args, size, workdir)


def run_scale_suite(args, size, workdir):
    return bench_scale.run(sys.modules[__name__], args, size, workdir)


def run_machine_suite(args, size, workdir):
    return bench_machine.run(sys.modules[__name__], args, size, workdir)


def run_sessions_suite(args, size, workdir):
    return bench_sessions.run(sys.modules[__name__], args, size, workdir)


def run_nbd_suite(args, size, workdir):
    variants = args.servers.split(",")
    base = "nbdkit-file" if "nbdkit-file" in variants else variants[0]
    workloads = [w for w in WORKLOADS if not args.only or args.only in w[0]]
    results = {}
    image = os.path.join(workdir, "image.raw")
    make_image(image, size)
    try:
        with Servers(workdir, image, variants) as servers:
            servers.start()
            for name, rw, bs, qd in workloads:
                samples = {v: [] for v in variants}
                for rep in range(args.repeat):
                    for v in rotate(variants, rep):
                        samples[v].append(run_fio(servers.uris[v], rw, bs, qd,
                                                  args.runtime, size))
                results[name] = {
                    v: {k: statistics.median(s[k] for s in samples[v])
                        for k in ("iops", "mbps", "p99_us")}
                    for v in variants}
                print_row(name, results[name], variants, base, file=sys.stderr)
    finally:
        os.unlink(image)
    return {"variants": variants, "base": base, "results": results}


def thread_model_args(spec):
    """`serve`'s options for an entry MODEL[@STATE] of --thread-models."""
    model, _, state = spec.partition("@")
    return ((["--thread-model", model] if model != "default" else []) +
            (["--thread-state", state] if state else []))


def rotate(items, n):
    """items, starting at index n modulo their number (alternate orders)."""
    n %= len(items)
    return list(items[n:]) + list(items[:n])


# ---------------------------------------------------------------- clones

CLONE_WRITES = [
    # name, rw, bs, iodepth, target ratio from the issue
    ("1M write QD16", "write", "1m", 16, 0.8),
    ("4K randwrite QD16", "randwrite", "4k", 16, 0.7),
]
GRANULARITY = 64 << 10
FRACTIONS = (0.1, 1.0)


def clonectl(state, *args, capture=False):
    proc = subprocess.run([CLONECTL, "--state-dir", state] + list(args),
                          stdout=subprocess.PIPE if capture
                          else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError("clonectl {} failed: {}".format(
            " ".join(args), proc.stderr.strip()))
    return proc.stdout


def clone_status(state, name="c1"):
    return json.loads(clonectl(state, "clone", "status", name, "--json",
                               capture=True))


def dirty_clone(uri, size, fraction):
    """Write fraction of the extents of a fractured clone's export: every
    extent for 1.0, else one extent in every 1/fraction, spread over it."""
    if fraction >= 1:
        rw, bs = "write", "1m"
    else:
        skip = GRANULARITY * (round(1 / fraction) - 1)
        rw, bs = "write:{}".format(skip), str(GRANULARITY)
    subprocess.run(["fio", "--name=dirty", "--ioengine=nbd", "--uri=" + uri,
                    "--rw=" + rw, "--bs=" + bs, "--iodepth=16",
                    "--size=" + str(size), "--output-format=json"],
                   check=True, stdout=subprocess.DEVNULL)


def prepare_dirty(state, clone_uri, size, fraction):
    """From a synchronized clone: fracture it and dirty fraction of it."""
    clonectl(state, "clone", "fracture", "c1")
    dirty_clone(clone_uri, size, fraction)
    return clone_status(state)["extents_dirty"]


def wait_clone(state, timeout=3600):
    """Wait until the running operation of c1 ends; it must succeed."""
    deadline = time.monotonic() + timeout
    while True:
        st = clone_status(state)
        if not (st["operation"] or {}).get("running"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("operation still running: {}".format(st))
        time.sleep(0.2)
    if st["state"] != "synchronized":
        raise RuntimeError("operation failed: {}".format(st))
    return st


def timed_operation(state, op):
    """Run `clonectl clone OP c1 --wait`; return (engine s, CLI wall s)."""
    t0 = time.monotonic()
    clonectl(state, "clone", op, "c1", "--wait")
    wall = time.monotonic() - t0
    st = clone_status(state)
    if st["state"] != "synchronized" or st["extents_dirty"]:
        raise RuntimeError("{} did not complete: {}".format(op, st))
    return st["operation"]["elapsed"], wall, st["operation"]["bytes_copied"]


def timed_copy(image, dst, nbytes):
    """The reference: cp (whole file) or dd (a part), fsync included."""
    t0 = time.monotonic()
    if nbytes >= os.path.getsize(image):
        subprocess.run(["cp", "--sparse=never", image, dst], check=True)
        subprocess.run(["sync", dst], check=True)
    else:
        subprocess.run(["dd", "if=" + image, "of=" + dst, "bs=1M",
                        "count={}".format(max(1, nbytes >> 20)),
                        "conv=notrunc,fsync", "status=none"], check=True)
    elapsed = time.monotonic() - t0
    os.unlink(dst)
    return elapsed


EMPTY_CLONE = "clone of an empty LU"
# The --only name of parts 2 and 3 of the clones suite.
CLONE_COPIES = "copies: sync, reverse-sync and host reads meanwhile"


def first_sync(workdir, name, size, image=None):
    """A new LU (sparse, or on image), a new clone of it, its first sync.
    Returns (engine s, the clone file's allocated bytes)."""
    state = os.path.join(workdir, name)
    lu = ["--file", image] if image else ["--size", str(size)]
    clonectl(state, "lu", "create", "bench", *lu)
    clonectl(state, "clone", "add", "bench", "c1")
    with Servers(workdir, None, []) as servers:
        sock = os.path.join(workdir, name + ".sock")
        proc = servers._popen([CLONECTL, "--state-dir", state, "serve",
                               "--socket", sock], name + ".log")
        wait_socket(sock, proc)
        engine, _, _ = timed_operation(state, "sync")
    allocated = os.stat(os.path.join(state, "lus", "c1.img")).st_blocks * 512
    shutil.rmtree(state)
    return engine, allocated


def run_empty_clone(args, size, workdir):
    full = os.path.join(workdir, "full.raw")
    make_image(full, size)
    samples = {"empty": [], "full": []}
    try:
        for rep in range(args.repeat):
            for kind in rotate(["empty", "full"], rep):
                samples[kind].append(first_sync(
                    workdir, "{}-{}".format(kind, rep), size,
                    full if kind == "full" else None))
            print("{}, repeat {}: empty {:.2f}s {}, full {:.2f}s {}".format(
                EMPTY_CLONE, rep + 1, samples["empty"][-1][0],
                fmt_bytes(samples["empty"][-1][1]), samples["full"][-1][0],
                fmt_bytes(samples["full"][-1][1])), file=sys.stderr,
                flush=True)
    finally:
        os.unlink(full)
    row = {kind: {"sync_s": statistics.median(x[0] for x in v),
                  "allocated": statistics.median(x[1] for x in v)}
           for kind, v in samples.items()}
    row["size"] = size
    return row


def run_clones_suite(args, size, workdir):
    out = {"writes": {}, "copies": {}, "latency": {}}
    if not args.only or args.only in EMPTY_CLONE:
        out["empty"] = run_empty_clone(args, size, workdir)
        if args.only:
            return out
    plain = os.path.join(workdir, "plain.raw")
    source = os.path.join(workdir, "source.raw")
    make_image(plain, size)
    make_image(source, size)
    variants = ["clonectl", "clonectl+clone"]
    try:
        with Servers(workdir, plain, variants,
                     images={"clonectl+clone": source}) as servers:
            servers.start()
            state = servers.states["clonectl+clone"]
            sock = servers.sockets["clonectl+clone"]
            clone_uri = "nbd+unix:///c1?socket=" + sock
            src_uri = servers.uris["clonectl+clone"]

            # 1. Writes with one synchronized clone against none.
            for name, rw, bs, qd, target in CLONE_WRITES:
                if args.only and args.only not in name:
                    continue
                samples = {v: [] for v in variants}
                for rep in range(args.repeat):
                    for v in rotate(variants, rep):
                        samples[v].append(run_fio(servers.uris[v], rw, bs, qd,
                                                  args.runtime, size))
                    if clone_status(state)["state"] != "synchronized":
                        raise RuntimeError("the clone fell out of sync")
                row = {v: {k: statistics.median(s[k] for s in samples[v])
                           for k in ("iops", "mbps", "p99_us", "cpu_us",
                                     "busy")}
                       for v in variants}
                row["ratio"] = row["clonectl+clone"]["iops"] / \
                    row["clonectl"]["iops"]
                row["cpu_ceiling"] = cpu_ceiling(
                    row["clonectl"]["iops"], row["clonectl+clone"]["cpu_us"])
                row["target"] = target
                out["writes"][name] = row
                print("{:<20} no clone {:.0f} IOPS, one clone {:.0f} IOPS, "
                      "ratio {:.2f}".format(name, row["clonectl"]["iops"],
                                            row["clonectl+clone"]["iops"],
                                            row["ratio"]),
                      file=sys.stderr, flush=True)

            # 2. Sync and reverse sync of 10% / 100% dirty extents, and the
            # copy of as many bytes by cp/dd on the same disk.
            if args.only and args.only not in CLONE_COPIES:
                return out
            dst = os.path.join(workdir, "copy.raw")
            samples = {(op, f): [] for op in ("sync", "reverse-sync", "cp")
                       for f in FRACTIONS}
            for rep in range(args.repeat):
                for f in rotate(FRACTIONS, rep):
                    for op in rotate(["sync", "reverse-sync", "cp"], rep):
                        if op == "cp":
                            t = timed_copy(source, dst, int(size * f))
                            samples[(op, f)].append(
                                {"engine": t, "wall": t,
                                 "bytes": int(size * f), "dirty": None})
                            continue
                        dirty = prepare_dirty(state, clone_uri, size, f)
                        engine, wall, nbytes = timed_operation(state, op)
                        samples[(op, f)].append(
                            {"engine": engine, "wall": wall,
                             "bytes": nbytes, "dirty": dirty})
                print("copies, repeat {}: {}".format(rep + 1, ", ".join(
                    "{} {:.0f}% {:.2f}s".format(op, f * 100, s[-1]["engine"])
                    for (op, f), s in sorted(samples.items()))),
                    file=sys.stderr, flush=True)
            for (op, f), s in samples.items():
                out["copies"]["{} {:.0f}%".format(op, f * 100)] = {
                    "op": op, "fraction": f,
                    "engine_s": statistics.median(x["engine"] for x in s),
                    "wall_s": statistics.median(x["wall"] for x in s),
                    "bytes": statistics.median(x["bytes"] for x in s),
                    "dirty_extents": s[0]["dirty"]}

            # 3. Host read latency on the Source while the engine copies.
            rate = int(size / (args.runtime + 3))
            kinds = ["idle", "sync", "reverse-sync"]
            samples = {k: [] for k in kinds}
            overlap = {k: True for k in kinds}
            for rep in range(args.repeat):
                for k in rotate(kinds, rep):
                    if k != "idle":
                        prepare_dirty(state, clone_uri, size, 1.0)
                        clonectl(state, "clone", k, "c1", "--rate", str(rate))
                    samples[k].append(run_fio(src_uri, "randread", "4k", 1,
                                              args.runtime, size))
                    if k != "idle":
                        st = clone_status(state)
                        overlap[k] &= bool(st["operation"]["running"])
                        wait_clone(state)
                print("latency, repeat {}: {}".format(rep + 1, ", ".join(
                    "{} p99 {:.0f} us".format(k, samples[k][-1]["p99_us"])
                    for k in kinds)), file=sys.stderr, flush=True)
            for k in kinds:
                out["latency"][k] = {
                    key: statistics.median(x[key] for x in samples[k])
                    for key in ("iops", "p99_us")}
                out["latency"][k]["overlap"] = overlap[k]
            out["latency_rate"] = rate
    finally:
        for path in (plain, source):
            os.unlink(path)
    return out


def print_clones_tables(res, args):
    print("clonectl clones benchmark, {} ({} cores, {}), LU {}, fio nbd "
          "engine, {} s x {} runs, medians".format(
              time.strftime("%Y-%m-%d"), os.cpu_count(), platform.machine(),
              args.size, args.runtime, args.repeat))
    empty = res.get("empty")
    if empty:
        print()
        print("| first sync of a new clone | sync s | clone file allocated | "
              "time vs full LU (target < 0.1) | allocated vs LU size (target "
              "< 1%) |")
        print("|---|---|---|---|---|")
        for kind, label in (("full", "LU full of data"),
                            ("empty", EMPTY_CLONE)):
            r = empty[kind]
            print("| {} | {:.3f} | {} | {:.3f} | {:.2%} |".format(
                label, r["sync_s"], fmt_bytes(r["allocated"]),
                r["sync_s"] / empty["full"]["sync_s"],
                r["allocated"] / empty["size"]))
    if res["writes"]:
        print()
        print("| writes to the Source | no clone IOPS | one synchronized clone "
              "IOPS | ratio | target | machine CPU µs per write, no clone / "
              "one clone | cores busy, no clone / one clone | CPU ceiling "
              "of the ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for name, row in res["writes"].items():
            plain, clone = row["clonectl"], row["clonectl+clone"]
            print("| {} | {:.0f} | {:.0f} | {:.2f} | >= {} | {:.1f} / {:.1f} "
                  "| {:.0%} / {:.0%} | {:.2f} |".format(
                      name, plain["iops"], clone["iops"], row["ratio"],
                      row["target"], plain["cpu_us"], clone["cpu_us"],
                      plain["busy"], clone["busy"], row["cpu_ceiling"]))
    copies = res["copies"]
    if copies:
        print()
        print("| copy | dirty extents | bytes | engine s | CLI --wait s | "
              "cp/dd s | ratio cp/engine | time vs 100% |")
        print("|---|---|---|---|---|---|---|---|")
        for op in ("sync", "reverse-sync"):
            for f in FRACTIONS:
                key = "{} {:.0f}%".format(op, f * 100)
                ref = copies["cp {:.0f}%".format(f * 100)]
                full = copies["{} 100%".format(op)]
                row = copies[key]
                print("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | "
                      "{:.2f} |".format(
                          key, row["dirty_extents"], fmt_bytes(row["bytes"]),
                          row["engine_s"], row["wall_s"], ref["engine_s"],
                          ref["engine_s"] / row["engine_s"],
                          row["engine_s"] / full["engine_s"]))
        print()
        print("engine s: the operation's own elapsed time (clone status); CLI "
              "--wait s adds the CLI's 0.5 s polling. cp/dd: `cp` of the whole "
              "file (100%) or `dd bs=1M` of a contiguous part (10%), fsync "
              "included. Targets: ratio >= 0.8 at 100%, time proportional to "
              "the dirty fraction.")
    lat = res["latency"]
    if lat:
        print()
        print("| 4K randread QD1 on the Source | IOPS | p99 us | p99 vs idle |")
        print("|---|---|---|---|")
        for k in ("idle", "sync", "reverse-sync"):
            label = "idle" if k == "idle" else "during {} (--rate {}/s){}" \
                .format(k, fmt_bytes(res["latency_rate"]),
                        "" if lat[k]["overlap"] else ", ended early")
            print("| {} | {:.0f} | {:.0f} | {:.2f} |".format(
                label, lat[k]["iops"], lat[k]["p99_us"],
                lat[k]["p99_us"] / lat["idle"]["p99_us"]
                if lat["idle"]["p99_us"] else 0))


# ---------------------------------------------------------------- restore

RESTORE_COD_RATE = "1M"  # the engine crawls; the reads do the copying


def write_replay_log(path, offsets, bs=4096):
    """A fio iolog (v2) reading bs bytes at each offset, in this order."""
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nnbd add\nnbd open\n")
        for off in offsets:
            f.write("nbd read {} {}\n".format(off, bs))
        f.write("nbd close\n")


def _lat(side):
    pct = side["clat_ns"].get("percentile", {})
    return {"ios": side["total_ios"], "iops": side["iops"],
            "p50_us": pct.get("50.000000", 0) / 1000.0,
            "p99_us": pct.get("99.000000", 0) / 1000.0}


def run_fio_replay(uri, log, workdir):
    """Replay a read iolog at QD1 as fast as possible; read latencies."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri,
           "--read_iolog=" + log, "--replay_no_stall=1", "--iodepth=1",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=workdir).stdout
    return _lat(fio_jobs(out)[0]["read"])


def copy_latency(src, dst, offsets, length=GRANULARITY):
    """Per-copy times (us) of length bytes src -> dst at each offset, the
    way a COD copies (os.preadv into a buffer, os.pwrite), then fsync."""
    buf = bytearray(length)
    times = []
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            os.preadv(sfd, [buf], off)
            os.pwrite(dfd, buf, off)
            times.append((time.perf_counter() - t0) * 1e6)
        os.fsync(dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    times.sort()
    return {"ios": len(times), "p50_us": times[len(times) // 2],
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))]}


def wait_restore(state, timeout=3600):
    """Wait until the restore of c1 completes; return the last status with
    a restore object (COD counters) and the final status."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        st = clone_status(state)
        if st.get("restore"):
            last = st
        elif not (st["operation"] or {}).get("running"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("restore still running: {}".format(st))
        time.sleep(0.1)
    if st["state"] != "fractured" or st.get("error"):
        raise RuntimeError("restore failed: {}".format(st))
    return last, st


def fio_iops_between(log_prefix, t0, t1):
    """Mean read+write IOPS of fio's averaged iops log within [t0, t1] ms."""
    sums = {0: [], 1: []}
    for name in os.listdir(os.path.dirname(log_prefix)):
        if not name.startswith(os.path.basename(log_prefix) + "_iops"):
            continue
        with open(os.path.join(os.path.dirname(log_prefix), name)) as f:
            for line in f:
                fields = [x.strip() for x in line.split(",")]
                t, value, direction = int(fields[0]), int(fields[1]), \
                    int(fields[2])
                if t0 <= t <= t1 and direction in sums:
                    sums[direction].append(value)
    return sum(statistics.mean(v) for v in sums.values() if v)


def restore_under_fio(state, src_uri, size, workdir, rep, rw="randrw"):
    """restore --full while fio (rw, 4k, QD16) runs on the Source."""
    prefix = os.path.join(workdir, "fio{}".format(rep))
    cmd = fio_command([src_uri], rw, "4k", 16, size, 3600, ramp=0,
                      extra=("--write_iops_log=" + prefix,
                             "--log_avg_msec=100"))
    fio_started = time.monotonic()
    fio = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=workdir)
    try:
        time.sleep(1.0)  # connected and at speed
        if fio.poll() is not None:
            raise RuntimeError("fio exited: " + fio.stderr.read())
        clonectl(state, "clone", "restore", "c1", "--full")
        started = time.monotonic()  # the restore started just before
        last, st = wait_restore(state)
        fio.send_signal(signal.SIGINT)
        fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    op = st["operation"]
    # fio's log times count from its start (a little after fio_started):
    # the restore ran over [started - elapsed'ish, started + elapsed].
    t0 = (started - fio_started) * 1000
    t1 = t0 + op["elapsed"] * 1000
    iops = fio_iops_between(prefix, t0, max(t1, t0 + 100))
    return {"elapsed_s": op["elapsed"], "engine_bytes": op["bytes_copied"],
            "rate": size / op["elapsed"], "fio_iops": iops,
            "cod_extents": (last or {}).get("restore", {}).get(
                "cod_extents", 0)}


def idle_randrw_iops(src_uri, size, runtime, workdir):
    job = run_fio_command(fio_command([src_uri], "randrw", "4k", 16, size,
                                      runtime), cwd=workdir)[0]
    return job["read"]["iops"] + job["write"]["iops"]


def run_restore_suite(args, size, workdir):
    out = {"latency": {}, "throughput": {}}
    source = os.path.join(workdir, "source.raw")
    scratch = os.path.join(workdir, "scratch.raw")
    dst = os.path.join(workdir, "copy.raw")
    make_image(source, size)
    with open(scratch, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    extents = size // GRANULARITY
    # Reads in the second half, each in its own extent, in random order:
    # the engine (start to end at RESTORE_COD_RATE) never gets there first.
    half = [e * GRANULARITY for e in range(extents // 2, extents)]
    random.shuffle(half)
    half = half[:8192]
    replay = os.path.join(workdir, "reads.iolog")
    write_replay_log(replay, half)
    try:
        with Servers(workdir, source, ["clonectl+clone"]) as servers:
            servers.start()  # c1 synchronized
            state = servers.states["clonectl+clone"]
            src_uri = servers.uris["clonectl+clone"]
            clone_img = os.path.join(state, "lus", "c1.img")
            clonectl(state, "clone", "fracture", "c1")

            lat = {k: [] for k in ("plain", "cod", "copy")}
            thr = {k: [] for k in ("restore", "cp", "restore+fio",
                                   "fio idle")}
            for rep in range(args.repeat):
                # 1. A read that needs a COD.
                for k in rotate(["plain", "cod", "copy"], rep):
                    if k == "plain":
                        lat[k].append(run_fio_replay(src_uri, replay,
                                                     workdir))
                    elif k == "copy":
                        lat[k].append(copy_latency(clone_img, scratch, half))
                    else:
                        clonectl(state, "clone", "restore", "c1", "--full",
                                 "--rate", RESTORE_COD_RATE)
                        before = clone_status(state)["restore"]
                        r = run_fio_replay(src_uri, replay, workdir)
                        st = clone_status(state)
                        if not st.get("restore"):
                            raise RuntimeError("the restore ended during "
                                               "the reads: {}".format(st))
                        after = st["restore"]
                        r["cod_fraction"] = (after["cod_requests"] -
                                             before["cod_requests"]) / r["ios"]
                        r["server_p50_ms"] = after["cod_wait_p50_ms"]
                        r["server_p99_ms"] = after["cod_wait_p99_ms"]
                        lat[k].append(r)
                        # Reading everything copies the rest on demand.
                        subprocess.run(["nbdcopy", src_uri, "null:"],
                                       check=True)
                        wait_restore(state)
                print("COD latency, repeat {}: {}".format(rep + 1, ", ".join(
                    "{} p50 {:.0f} us p99 {:.0f} us".format(
                        k, lat[k][-1]["p50_us"], lat[k][-1]["p99_us"])
                    for k in ("plain", "cod", "copy"))),
                    file=sys.stderr, flush=True)

                # 2. Restore of the whole LU against cp, no host I/O.
                for k in rotate(["restore", "cp"], rep):
                    if k == "cp":
                        thr[k].append({"elapsed_s": timed_copy(source, dst,
                                                               size)})
                        continue
                    clonectl(state, "clone", "restore", "c1", "--full",
                             "--wait")
                    op = clone_status(state)["operation"]
                    if op["bytes_copied"] != size:
                        raise RuntimeError("restore copied {} bytes, not {}"
                                           .format(op["bytes_copied"], size))
                    thr[k].append({"elapsed_s": op["elapsed"],
                                   "engine_bytes": op["bytes_copied"]})

                # 3. Restore with fio randrw QD16 on the Source.
                for k in rotate(["restore+fio", "fio idle"], rep):
                    if k == "fio idle":
                        thr[k].append({"fio_iops": idle_randrw_iops(
                            src_uri, size, args.runtime, workdir)})
                    else:
                        thr[k].append(restore_under_fio(state, src_uri, size,
                                                        workdir, rep))
                print("restore, repeat {}: alone {:.2f}s, cp {:.2f}s, with "
                      "fio {:.2f}s ({:.0f} IOPS; idle {:.0f} IOPS)".format(
                          rep + 1, thr["restore"][-1]["elapsed_s"],
                          thr["cp"][-1]["elapsed_s"],
                          thr["restore+fio"][-1]["elapsed_s"],
                          thr["restore+fio"][-1]["fio_iops"],
                          thr["fio idle"][-1]["fio_iops"]),
                      file=sys.stderr, flush=True)

            for k, s in lat.items():
                out["latency"][k] = {key: statistics.median(x[key] for x in s)
                                     for key in s[0]}
            for k, s in thr.items():
                out["throughput"][k] = {
                    key: statistics.median(x[key] for x in s)
                    for key in s[0]}
            out["throughput"]["bytes"] = size
    finally:
        for path in (source, scratch, dst):
            if os.path.exists(path):
                os.unlink(path)
    return out


def print_restore_tables(res, args):
    print("clonectl protected restore benchmark, {} ({} cores, {}), LU {}, "
          "fio nbd engine, {} runs, medians".format(
              time.strftime("%Y-%m-%d"), os.cpu_count(), platform.machine(),
              args.size, args.repeat))
    lat = res["latency"]
    print()
    print("| 4 KiB read, QD1, each in its own extent | reads | p50 us | "
          "p99 us | p50 vs plain |")
    print("|---|---|---|---|---|")
    labels = {"plain": "plain (idle Source)",
              "cod": "needing a COD (restore --rate {}); {:.0%} COD, server "
                     "COD wait p50 {} ms p99 {} ms".format(
                         RESTORE_COD_RATE, lat["cod"]["cod_fraction"],
                         lat["cod"]["server_p50_ms"],
                         lat["cod"]["server_p99_ms"]),
              "copy": "one 64 KiB copy clone -> file (pread + pwrite, "
                      "in process)"}
    for k in ("plain", "cod", "copy"):
        print("| {} | {} | {:.0f} | {:.0f} | {:.2f} |".format(
            labels[k], lat[k]["ios"], lat[k]["p50_us"], lat[k]["p99_us"],
            lat[k]["p50_us"] / lat["plain"]["p50_us"]
            if lat["plain"]["p50_us"] else 0))
    thr = res["throughput"]
    size = thr["bytes"]
    print()
    print("| restore of the whole LU ({}) | seconds | MB/s | vs cp | "
          "fio randrw 4K QD16 IOPS |".format(fmt_bytes(size)))
    print("|---|---|---|---|---|")
    cp = thr["cp"]["elapsed_s"]
    print("| cp --sparse=never + sync (reference) | {:.2f} | {:.0f} | 1.00 "
          "| - |".format(cp, size / cp / 1e6))
    r = thr["restore"]["elapsed_s"]
    print("| restore --full, no host I/O (target >= 0.8 of cp) | {:.2f} | "
          "{:.0f} | {:.2f} | - |".format(r, size / r / 1e6, cp / r))
    f = thr["restore+fio"]
    print("| restore --full, fio on the Source | {:.2f} | {:.0f} | {:.2f} | "
          "{:.0f} (idle {:.0f}) |".format(
              f["elapsed_s"], size / f["elapsed_s"] / 1e6,
              cp / f["elapsed_s"], f["fio_iops"], thr["fio idle"]["fio_iops"]))
    print()
    print("seconds: the restore's own elapsed time (clone status), commit "
          "included; cp: fsync included. With fio, the Source's extents "
          "written by fio are protected (not copied); fio's IOPS are taken "
          "from its 100 ms log over the restore's duration; idle: the same "
          "fio on a Source that is not restoring.")


def fmt_bytes(n):
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return "{:.0f}{}".format(n / factor, unit)
    return str(int(n))


def print_row(name, row, variants, base, file):
    parts = ["{}={:.0f} IOPS".format(v, row[v]["iops"]) for v in variants]
    print("{:<20} {}".format(name, "  ".join(parts)), file=file, flush=True)


def print_table(results, variants, base, args):
    print("clonectl benchmark, {} ({} cores, {}), image {}, fio nbd engine, "
          "{} s x {} runs, medians".format(
              time.strftime("%Y-%m-%d"), os.cpu_count(), platform.machine(),
              args.size, args.runtime, args.repeat))
    print()
    header = ["workload"]
    for v in variants:
        header += ["{} IOPS".format(v), "MB/s", "p99 us"]
    header += ["{}/{}".format(v, base) for v in variants if v != base]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in results.items():
        cells = [name]
        for v in variants:
            cells += ["{:.0f}".format(row[v]["iops"]),
                      "{:.0f}".format(row[v]["mbps"]),
                      "{:.0f}".format(row[v]["p99_us"])]
        for v in variants:
            if v != base:
                cells.append("{:.2f}".format(row[v]["iops"] / row[base]["iops"]))
        print("| " + " | ".join(cells) + " |")


FIO_JOBS = os.path.join(REPO, "scripts", "fio")


def run_fio_jobfile(uri, jobfile, size, runtime):
    """One scripts/fio job file through fio's nbd engine: the job files
    take their engine, target, size and runtime from the environment."""
    env = dict(os.environ, FIO_ENGINE="nbd", FIO_DEV="nbd", FIO_SIZE=str(size),
               FIO_RUNTIME=str(runtime))
    cmd = ["fio", "--ioengine=nbd", "--uri=" + uri, "--output-format=json",
           jobfile]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=env).stdout
    doc = json.loads(out[out.index("{"):])
    iops = sum(j[d]["iops"] for j in doc["jobs"] for d in ("read", "write"))
    mbps = sum(j[d]["bw_bytes"] for j in doc["jobs"]
               for d in ("read", "write")) / 1e6
    return {"iops": iops, "mbps": mbps}


def run_jobs_suite(args, size, workdir):
    variants = args.servers.split(",")
    jobfiles = sorted(f for f in os.listdir(FIO_JOBS) if f.endswith(".fio"))
    jobfiles = [f for f in jobfiles if not args.only or args.only in f]
    results = {}
    image = os.path.join(workdir, "image.raw")
    make_image(image, size)
    try:
        with Servers(workdir, image, variants) as servers:
            servers.start()
            for jobfile in jobfiles:
                samples = {v: [] for v in variants}
                for rep in range(args.repeat):
                    for v in rotate(variants, rep):
                        samples[v].append(run_fio_jobfile(
                            servers.uris[v], os.path.join(FIO_JOBS, jobfile),
                            size, args.runtime))
                results[jobfile] = {
                    v: {k: statistics.median(s[k] for s in samples[v])
                        for k in ("iops", "mbps")} for v in variants}
                print(jobfile, results[jobfile], file=sys.stderr)
    finally:
        os.unlink(image)
    return {"variants": variants, "results": results}


def print_jobs_table(report, args):
    variants = report["variants"]
    print("scripts/fio job files through fio's nbd engine, {} cores, image "
          "{}, runtime {} s, median of {}".format(
              os.cpu_count(), args.size, args.runtime, args.repeat))
    print()
    print("| job file | " + " | ".join("{} IOPS | MB/s".format(v)
                                       for v in variants) + " |")
    print("|---|" + "---|---|" * len(variants))
    for jobfile, row in report["results"].items():
        print("| {} | ".format(jobfile) + " | ".join(
            "{:.0f} | {:.0f}".format(row[v]["iops"], row[v]["mbps"])
            for v in variants) + " |")


if __name__ == "__main__":
    main()
