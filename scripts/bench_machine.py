"""`scripts/bench --suite machine`: what this machine gives the data path,
with no server in the way, so the other suites' ratios can be read
against it.

1. Memory copy bandwidth of one process, and of two at once (each copying
   1 MiB buffers over a 64 MiB working set): whether a second core adds
   copy bandwidth or shares the first's.
2. 1 MiB writes into the page cache (os.pwrite on a file of the workdir):
   to one file; to two files in turn (a mirrored write done in order); to
   two files from two threads at once (a mirrored write done side by
   side; os.pwrite releases the GIL; a thread wake-up per write
   included).  A write that must land in two places costs one more copy
   of every byte into the page cache, which costs more than the bare
   memory copy of part 1 (page lookup, dirtying, accounting).
3. Saves made durable together: batches of 4, 16 and 64 writes of 4 KiB
   and of 64 KiB at random places of a 1 GiB file, each batch followed by
   one fdatasync (a copy on first write's group commit, with no server in
   the way): how much a flush costs by the bytes it writes back.
"""

import multiprocessing
import os
import random
import statistics
import threading
import time

MiB = 1 << 20
COPY_SPAN_S = 1.5
COPY_BUFFERS = 64
WRITES = 512


def _copier(seconds, results):
    src = bytearray(os.urandom(MiB))
    dsts = [bytearray(MiB) for _ in range(COPY_BUFFERS)]
    copied = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for dst in dsts:
            dst[:] = src
            copied += MiB
    results.put(copied / (time.monotonic() - start))


def copy_bandwidth(processes):
    """Bytes per second each of that many processes copies, at once."""
    results = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_copier,
                                     args=(COPY_SPAN_S, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        rates = [results.get(timeout=COPY_SPAN_S + 30) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return rates


class _Files:
    def __init__(self, workdir):
        self.paths = [os.path.join(workdir, n) for n in ("a.raw", "b.raw")]
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
                    for p in self.paths]
        self.buf = os.urandom(MiB)
        # Allocated and in the page cache before any timing.
        for fd in self.fds:
            for i in range(WRITES):
                os.pwrite(fd, self.buf, i * MiB)

    def close(self):
        for fd in self.fds:
            os.close(fd)
        for p in self.paths:
            os.unlink(p)


def _one(files):
    for i in range(WRITES):
        os.pwrite(files.fds[0], files.buf, i * MiB)


def _in_turn(files):
    for i in range(WRITES):
        os.pwrite(files.fds[0], files.buf, i * MiB)
        os.pwrite(files.fds[1], files.buf, i * MiB)


def _side_by_side(files):
    # A second thread writes the other file while this one writes its own,
    # request by request, as a mirror written in parallel would.
    go = [threading.Event() for _ in range(WRITES)]
    done = [threading.Event() for _ in range(WRITES)]

    def mirror():
        for i in range(WRITES):
            go[i].wait()
            os.pwrite(files.fds[1], files.buf, i * MiB)
            done[i].set()

    # A daemon: a Ctrl-C between two writes leaves it waiting for ever.
    t = threading.Thread(target=mirror, daemon=True)
    t.start()
    for i in range(WRITES):
        go[i].set()
        os.pwrite(files.fds[0], files.buf, i * MiB)
        done[i].wait()
    t.join()


SAVE_SIZES = (4 << 10, 64 << 10)
SAVE_BATCHES = (4, 16, 64)
SAVE_SPAN_S = 1.0
SAVE_FILE = 1 << 30


def saves_per_second(workdir, size, batch):
    """Writes of size bytes a second, batch of them per fdatasync, at
    random size-aligned places of a SAVE_FILE file (made sparse, so the
    first batches allocate as a new save area's do)."""
    path = os.path.join(workdir, "saves.raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, SAVE_FILE)
        buf = os.urandom(size)
        rng = random.Random(size * batch)
        n = 0
        start = time.monotonic()
        while time.monotonic() - start < SAVE_SPAN_S:
            for _ in range(batch):
                os.pwrite(fd, buf, rng.randrange(SAVE_FILE // size) * size)
            os.fdatasync(fd)
            n += batch
        return n / (time.monotonic() - start)
    finally:
        os.close(fd)
        os.unlink(path)


WRITE_WAYS = (("one file", _one), ("two files, in turn", _in_turn),
              ("two files, side by side (two threads)", _side_by_side))


def run(bench, args, size, workdir):
    out = {"copy": {}, "writes": {}}
    for n in (1, 2):
        rates = [copy_bandwidth(n) for _ in range(args.repeat)]
        out["copy"][n] = {
            "each": statistics.median(statistics.mean(r) for r in rates),
            "total": statistics.median(sum(r) for r in rates)}
    files = _Files(workdir)
    try:
        samples = {name: [] for name, _ in WRITE_WAYS}
        for rep in range(args.repeat):
            for name, way in bench.rotate(list(WRITE_WAYS), rep):
                t0 = time.monotonic()
                way(files)
                samples[name].append((time.monotonic() - t0) / WRITES)
        out["writes"] = {name: statistics.median(s)
                         for name, s in samples.items()}
    finally:
        files.close()
    # Keyed "SIZExBATCH": the report is JSON too.
    out["saves"] = {"{}x{}".format(save, batch): statistics.median(
        saves_per_second(workdir, save, batch) for _ in range(args.repeat))
        for batch in SAVE_BATCHES for save in SAVE_SIZES}
    return out


def print_tables(res, args):
    print("**Machine** (`scripts/bench --suite machine`, {}, {} cores, "
          "medians of {})".format(time.strftime("%Y-%m-%d %H:%M UTC",
                                                time.gmtime()),
                                  os.cpu_count(), args.repeat))
    print()
    one = res["copy"][1]["total"]
    print("| memory copy, 1 MiB buffers | MB/s each | MB/s in all | "
          "in all / one process |")
    print("|---|---|---|---|")
    for n, r in res["copy"].items():
        print("| {} process{} at once | {:.0f} | {:.0f} | {:.2f} |".format(
            n, "" if n == 1 else "es", r["each"] / 1e6, r["total"] / 1e6,
            r["total"] / one))
    print()
    base = res["writes"]["one file"]
    print("| 1 MiB page-cache writes (os.pwrite) | µs per write | vs one "
          "file |")
    print("|---|---|---|")
    for name, s in res["writes"].items():
        print("| {} | {:.0f} | {:.2f} |".format(name, s * 1e6, s / base))
    print()
    print("| saves flushed together (one fdatasync a batch) | " +
          " | ".join("{} KiB saves a second | MB/s".format(save >> 10)
                     for save in SAVE_SIZES) + " |")
    print("|---|" + "---|---|" * len(SAVE_SIZES))
    for batch in SAVE_BATCHES:
        print("| {} a batch | ".format(batch) + " | ".join(
            "{:.0f} | {:.0f}".format(
                res["saves"]["{}x{}".format(save, batch)],
                res["saves"]["{}x{}".format(save, batch)] * save / 1e6)
            for save in SAVE_SIZES) + " |")
