"""The iscsi suite of scripts/bench.py.

One `clonectl serve --iscsi-portal` serves an LU filled with data; the same
workloads run, alternately within each repeat, against:

- nbd: the LU over NBD (our nbdkit, Unix socket);
- iscsi: the same LU through the gateway (tgtd -> nbdfuse -> our NBD);
- iscsi-old: the gateway's own nbdfuse file served by a tgtd with glibc's
  default malloc settings (the gateway before iscsi.TGTD_MALLOC_TUNABLES),
  O_DIRECT as the gateway opens it: old and new alternate in one run;
- tgtd-raw: a second, private tgtd serving the LU's file directly
  (rdwr backing store, page cache: how tgtd is usually set up);
- tgtd-raw-direct: the same with O_DIRECT (`--bsoflags direct`, as the
  gateway opens its FUSE file).
The three reference targets (iscsi-old, tgtd-raw, tgtd-raw-direct) are one
private tgtd started as tgtd usually is (no malloc tunables).

One client for all: `qemu-img bench` (QEMU's NBD and iSCSI block drivers,
libiscsi), reads only, QD16 unless named: 4 KiB reads with a stride of
1 MiB + 4 KiB (every request in a different MiB; fio has no libiscsi engine
here, and qemu-img bench has no random mode), and 1 MiB sequential reads.
The page cache is warm, so these measure the path, not the disk.
"""

import os
import socket
import statistics
import subprocess
import time

WORKLOADS = [
    # name, request size, step, depth, count (full), count (--quick)
    ("4K strided read QD16", 4096, (1 << 20) + 4096, 16, 40000, 10000),
    ("4K strided read QD1", 4096, (1 << 20) + 4096, 1, 10000, 3000),
    ("1M seq read QD16", 1 << 20, 1 << 20, 16, 3000, 800),
]
VARIANTS = ["nbd", "iscsi", "iscsi-old", "tgtd-raw", "tgtd-raw-direct"]
IQN_PREFIX = "iqn.2026-11.org.clonectl.bench:"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill(path, size):
    block = os.urandom(1 << 20)
    with open(path, "r+b") as f:
        for off in range(0, size, 1 << 20):
            f.write(block[:min(1 << 20, size - off)])
        f.flush()
        os.fsync(f.fileno())


def _qemu_bench(url, req, step, depth, count):
    cmd = ["qemu-img", "bench", "-f", "raw", "-d", str(depth), "-s",
           str(req), "-S", str(step), "-c", str(count), url]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.monotonic() - t0


def _wait_mounted(path, timeout=30):
    """Wait for the gateway's nbdfuse file of the LU (the manager adds it
    within its poll interval of the start)."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not mount " + path)
        time.sleep(0.1)


class RawTgtd:
    """A private tgtd serving the LU's file directly (the reference), and the
    gateway's FUSE file (the gateway's old tgtd configuration)."""

    TARGETS = (("raw", "lu", []), ("raw-direct", "lu", ["--bsoflags", "direct"]),
               ("gateway-old", "fuse", ["--bsoflags", "direct"]))

    def __init__(self, paths, log):
        self.port = _free_port()
        # tgtd takes -C 0..32767; the gateway picks from 2000-21999.
        self.ctl = 22000 + os.getpid() % 10000
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.ctl), "--iscsi",
             "portal=127.0.0.1:{}".format(self.port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while subprocess.run(self._adm("--op", "show", "--mode", "sys"),
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("reference tgtd did not start")
            time.sleep(0.05)
        for tid, (name, path, flags) in enumerate(self.TARGETS, 1):
            for args in (["--op", "new", "--mode", "target", "--tid", tid,
                          "--targetname", IQN_PREFIX + name],
                         ["--op", "new", "--mode", "logicalunit", "--tid",
                          tid, "--lun", 1, "--backing-store", paths[path]]
                         + flags,
                         ["--op", "bind", "--mode", "target", "--tid", tid,
                          "--initiator-address", "127.0.0.1"]):
                subprocess.run(self._adm(*args), check=True,
                               capture_output=True)

    def _adm(self, *args):
        return ["tgtadm", "-C", str(self.ctl), "--lld", "iscsi"] + \
            [str(a) for a in args]

    def url(self, name):
        return "iscsi://127.0.0.1:{}/{}{}/1".format(self.port, IQN_PREFIX,
                                                    name)

    def stop(self):
        for tid in range(1, len(self.TARGETS) + 1):
            subprocess.run(self._adm("--op", "delete", "--mode", "target",
                                     "--tid", tid, "--force"),
                           capture_output=True)
        subprocess.run(self._adm("--op", "delete", "--mode", "system"),
                       capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for suffix in ("", ".lock"):
            try:
                os.unlink("/var/run/tgtd/socket.{}{}".format(self.ctl,
                                                             suffix))
            except FileNotFoundError:
                pass


def run(bench, args, size, workdir):
    state = os.path.join(workdir, "state")
    sock = os.path.join(workdir, "nbd.sock")
    bench.clonectl(state, "lu", "create", "d1", "--size", str(size))
    lu_file = os.path.join(state, "lus", "d1.img")
    _fill(lu_file, size)
    port = _free_port()
    bench.clonectl(state, "serve", "--socket", sock, "--iscsi-portal",
                   "127.0.0.1:{}".format(port), "--iqn-prefix", IQN_PREFIX,
                   "--detach")
    log = open(os.path.join(workdir, "tgtd-raw.log"), "ab")
    raw = None
    try:
        fuse_file = os.path.join(state, "run", "iscsi", "mnt", "d1", "disk")
        _wait_mounted(fuse_file)
        raw = RawTgtd({"lu": lu_file, "fuse": fuse_file}, log)
        urls = {"nbd": "nbd+unix:///d1?socket=" + sock,
                "iscsi": "iscsi://127.0.0.1:{}/{}d1/1".format(port,
                                                               IQN_PREFIX),
                "iscsi-old": raw.url("gateway-old"),
                "tgtd-raw": raw.url("raw"),
                "tgtd-raw-direct": raw.url("raw-direct")}
        results = {}
        for name, req, step, depth, count, quick in WORKLOADS:
            if args.only and args.only not in name:
                continue
            n = quick if args.quick else count
            times = {v: [] for v in VARIANTS}
            for _ in range(args.repeat):
                for v in VARIANTS:
                    times[v].append(_qemu_bench(urls[v], req, step, depth, n))
            results[name] = {
                v: {"seconds": statistics.median(t), "iops":
                    n / statistics.median(t), "mbs":
                    n * req / 1e6 / statistics.median(t), "all": t}
                for v, t in times.items()}
        return {"results": results}
    finally:
        if raw is not None:
            raw.stop()
        log.close()
        bench.clonectl(state, "stop")


def print_tables(res, args):
    print("iSCSI gateway benchmark, {}, image {}, qemu-img bench, {} runs, "
          "medians".format(time.strftime("%Y-%m-%d"), args.size, args.repeat))
    print()
    header = ["workload"]
    for v in VARIANTS:
        header += ["{} IOPS".format(v), "MB/s"]
    header += ["iscsi/nbd", "iscsi-old/nbd", "iscsi/iscsi-old",
               "iscsi/tgtd-raw", "iscsi/tgtd-raw-direct"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in res["results"].items():
        cells = [name]
        for v in VARIANTS:
            cells += ["{:.0f}".format(row[v]["iops"]),
                      "{:.0f}".format(row[v]["mbs"])]
        for top, base in (("iscsi", "nbd"), ("iscsi-old", "nbd"),
                          ("iscsi", "iscsi-old"), ("iscsi", "tgtd-raw"),
                          ("iscsi", "tgtd-raw-direct")):
            cells.append("{:.2f}".format(row[top]["iops"] /
                                         row[base]["iops"]))
        print("| " + " | ".join(cells) + " |")
    print()
    print("Per pass (old and new alternate within a pass), iscsi/nbd and "
          "iscsi-old/nbd:")
    for name, row in res["results"].items():
        print("- {}: {}".format(name, ", ".join(
            "{:.2f} / {:.2f}".format(n / i, n / o) for n, i, o in zip(
                row["nbd"]["all"], row["iscsi"]["all"],
                row["iscsi-old"]["all"]))))
