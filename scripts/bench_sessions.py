"""The sessions suite of scripts/bench.py, all in one run.

Two `clonectl serve` on Unix sockets: A serves the Source (a file of random
data), B serves the destination LU of the same size; the session ships A's
Source to B's LU.

1. Bytes sent by an update after 1%, 10% and 100% of the extents changed
   (one 4 KiB write of random data inside each changed extent), against
   changed extents x granularity: they must be equal (zero extents would go
   as write-zeroes and are counted apart).
2. Transfer throughput of a full copy (`session transfer --full`, marked),
   against `nbdcopy` of the same bytes between the same two servers
   (target >= 0.9), alternately; with where the engine's time went
   (reading the Source, waiting for the destination).  `--only "session
   full transfer"` runs just this row.
3. Host 4 KiB random write IOPS (fio nbd engine, QD16) on the Source:
   session unmarked (tracking only), marked (every first write to an extent
   still to send saves its old data: copy on first write) and marked while
   a transfer runs, each against unmarked.
4. 4K randwrite QD16 first writes to a freshly marked Source: the same fio
   run right after `session mark --export` (every extent's first write
   saves its old data) against unmarked, alternately, under nbdkit's
   default thread model (requests of one connection one at a time: the
   sessions' layer defers the first writes, which then share the save
   area's flushes) and `parallel` (fio's 16 requests at once), or the
   models --thread-models names, in turn within each repeat; and each
   over the --connections counts (the same 16 requests spread over N
   connections, as a multi-conn host does), unmarked and marked in the
   same shape, the counts in turn within each model.  `--only "first
   writes"` runs only this part.
"""

import json
import os
import random
import statistics
import subprocess
import time

GRANULARITY = 64 << 10
FULL_TRANSFER = "session full transfer"


def _serve(bench, state, sock, thread_model="default"):
    bench.clonectl(state, "serve", "--socket", sock, "--detach",
                   *bench.thread_model_args(thread_model))


def _status(bench, state):
    return json.loads(bench.clonectl(state, "session", "status", "s",
                                     "--json", capture=True))


def _change_extents(uri, size, fraction, seed):
    """One 4 KiB write of random data inside fraction of the extents."""
    import nbd
    extents = size // GRANULARITY
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(extents), max(1, round(extents *
                                                            fraction))))
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for x in chosen:
            h.pwrite(os.urandom(4096), x * GRANULARITY +
                     rng.randrange(0, GRANULARITY, 4096))
        h.flush()
    finally:
        h.shutdown()
    return len(chosen)


def _update(bench, state):
    t0 = time.monotonic()
    bench.clonectl(state, "session", "update", "s")
    wall = time.monotonic() - t0
    last = _status(bench, state)["last_transfer"]
    if last["result"] != "completed":
        raise RuntimeError("update failed: {}".format(last))
    return last, wall


def _fio_randwrite(bench, uri, size, runtime, connections=1):
    """bench.run_fio's figures (IOPS, the machine's CPU per write)."""
    return bench.run_fio(uri, "randwrite", "4k", 16, runtime, size,
                         connections)


FIRST_WRITES = "4K randwrite QD16 first writes to a freshly marked Source"
# Thread models of part 4 unless --thread-models says (default: the
# server's own).
FIRST_WRITES_MODELS = "default,parallel"


def _first_writes(bench, args, size, state, sock, uri):
    """4. Unmarked and freshly marked (--export), alternately, per thread
    model and connection count, the models in turn within each repeat
    (the server is restarted with each), the counts in turn within a
    model."""
    models = (args.thread_models or FIRST_WRITES_MODELS).split(",")
    shapes = [(m, n) for m in models for n in args.connections]
    rows = {s: {"unmarked": [], "marked": [], "saves": []} for s in shapes}
    for rep in range(args.repeat):
        for model in bench.rotate(models, rep):
            bench.clonectl(state, "stop")
            _serve(bench, state, sock, model)
            for n in bench.rotate(args.connections, rep):
                row = rows[model, n]
                row["unmarked"].append(_fio_randwrite(bench, uri, size,
                                                      args.runtime, n))
                bench.clonectl(state, "session", "mark", "s", "--export")
                saved = _status(bench, state)["cofw_count"]
                row["marked"].append(_fio_randwrite(bench, uri, size,
                                                    args.runtime, n))
                row["saves"].append(_status(bench, state)["cofw_count"] -
                                    saved)
                bench.clonectl(state, "session", "unmark", "s")
    bench.clonectl(state, "stop")
    _serve(bench, state, sock)
    out = []
    for model, n in shapes:
        row = rows[model, n]
        r = {"model": model, "connections": n,
             "ratio": statistics.median(
                 m["iops"] / u["iops"]
                 for m, u in zip(row["marked"], row["unmarked"])),
             "saves": statistics.median(row["saves"])}
        for k in ("unmarked", "marked"):
            r[k] = statistics.median(run["iops"] for run in row[k])
            for fig in ("cpu_us", "busy"):
                r[k + "_" + fig] = statistics.median(run[fig]
                                                     for run in row[k])
        r["cpu_ceiling"] = bench.cpu_ceiling(r["unmarked"],
                                             r["marked_cpu_us"])
        out.append(r)
    return out


def _wanted(args, part):
    return not args.only or args.only in part


def run(bench, args, size, workdir):
    out = {"bytes": [], "throughput": [], "writes": {}, "first_writes": []}
    a, b = os.path.join(workdir, "A"), os.path.join(workdir, "B")
    image = os.path.join(workdir, "source.img")
    bench.make_image(image, size)
    sock_a, sock_b = os.path.join(workdir, "a.sock"), \
        os.path.join(workdir, "b.sock")
    src_uri = "nbd+unix:///src?socket=" + sock_a
    dst_uri = "nbd+unix:///dst?socket=" + sock_b
    bench.clonectl(a, "lu", "create", "src", "--file", image)
    bench.clonectl(b, "lu", "create", "dst", "--size", str(size))
    _serve(bench, a, sock_a)
    _serve(bench, b, sock_b)
    try:
        bench.clonectl(a, "session", "create", "src", "s", "--dest", dst_uri)
        if _wanted(args, FIRST_WRITES):
            out["first_writes"] = _first_writes(bench, args, size, a, sock_a,
                                                src_uri)
        if not _wanted(args, "full copy, bytes sent, host writes"):
            return out
        # 2. Full copies, ours and nbdcopy's, alternately.
        for rep in range(args.repeat if not args.only or
                         args.only in FULL_TRANSFER else 0):
            t0 = time.monotonic()
            subprocess.run(["nbdcopy", src_uri, dst_uri], check=True)
            nbdcopy_s = time.monotonic() - t0
            t0 = time.monotonic()
            bench.clonectl(a, "session", "transfer", "s", "--full", "--wait")
            wall = time.monotonic() - t0
            last = _status(bench, a)["last_transfer"]
            out["throughput"].append({"nbdcopy_s": nbdcopy_s,
                                      "engine_s": last["seconds"],
                                      "reading_s": last.get("seconds_reading"),
                                      "waiting_s": last.get("seconds_waiting"),
                                      "wall_s": wall,
                                      "bytes": last["bytes_sent"] +
                                      last["bytes_zeroed"]})
        if args.only:
            return out
        # 1. Bytes sent for a fraction of changed extents.
        for i, fraction in enumerate((0.01, 0.1, 1.0)):
            changed = _change_extents(src_uri, size, fraction, seed=i)
            last, wall = _update(bench, a)
            out["bytes"].append({"fraction": fraction, "changed": changed,
                                 "expected": changed * GRANULARITY,
                                 "sent": last["bytes_sent"],
                                 "zeroed": last["bytes_zeroed"],
                                 "seconds": last["seconds"],
                                 "wall_s": wall})
        # 3. Host writes: unmarked, marked, marked and transferring.
        rows = {"unmarked": [], "marked": [], "transferring": []}
        for rep in range(args.repeat):
            rows["unmarked"].append(_fio_randwrite(bench, src_uri, size,
                                                   args.runtime)["iops"])
            _change_extents(src_uri, size, 1.0, seed=100 + rep)
            bench.clonectl(a, "session", "mark", "s")
            rows["marked"].append(_fio_randwrite(bench, src_uri, size,
                                                 args.runtime)["iops"])
            bench.clonectl(a, "session", "unmark", "s")
            _change_extents(src_uri, size, 1.0, seed=200 + rep)
            bench.clonectl(a, "session", "mark", "s")
            bench.clonectl(a, "session", "transfer", "s")
            rows["transferring"].append(_fio_randwrite(bench, src_uri, size,
                                                       args.runtime)["iops"])
            overlapped = _status(bench, a)["transferring"]
            deadline = time.monotonic() + 600
            while _status(bench, a)["transferring"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("transfer did not end")
                time.sleep(0.2)
            out.setdefault("overlap", []).append(overlapped)
        out["writes"] = {k: statistics.median(v) for k, v in rows.items()}
    finally:
        for state in (a, b):
            try:
                bench.clonectl(state, "stop")
            except RuntimeError:
                pass
    return out


def print_tables(res, args):
    print("**Sessions** (`scripts/bench --suite sessions`, {}, {} LU, "
          "granularity 64K)".format(time.strftime("%Y-%m-%d %H:%M UTC",
                                                  time.gmtime()), args.size))
    print()
    if res["first_writes"]:
        base = res["first_writes"][0]
        print("| {} | nbdkit thread model[@thread state] | connections x "
              "QD | unmarked IOPS | marked IOPS | 4 KiB blocks saved (copies on first "
              "write) | marked/unmarked (target >= 0.5; median of the "
              "repeats' ratios) | unmarked / {}, {} x QD{} | machine CPU "
              "µs per write, unmarked / marked | cores busy, unmarked / "
              "marked | CPU ceiling of marked/unmarked "
              "|".format(FIRST_WRITES, base["model"], base["connections"],
                         16 // base["connections"]))
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["first_writes"]:
            print("| {}s fio runs | {} | {} x QD{} | {:.0f} | {:.0f} | "
                  "{:.0f} | {:.2f} | {:.2f} | {:.1f} / {:.1f} | {:.0%} / "
                  "{:.0%} | {:.2f} |".format(
                      args.runtime, r["model"], r["connections"],
                      16 // r["connections"], r["unmarked"], r["marked"],
                      r["saves"], r["ratio"],
                      r["unmarked"] / base["unmarked"],
                      r["unmarked_cpu_us"], r["marked_cpu_us"],
                      r["unmarked_busy"], r["marked_busy"],
                      r["cpu_ceiling"]))
        print()
    if res["bytes"]:
        print("| changed extents | count | expected bytes | bytes sent | "
              "sent/expected | zeroed | transfer s |")
        print("|---|---|---|---|---|---|---|")
        for r in res["bytes"]:
            print("| {:.0%} | {} | {} | {} | {:.3f} | {} | {:.2f} |".format(
                r["fraction"], r["changed"], r["expected"], r["sent"],
                r["sent"] / r["expected"], r["zeroed"], r["seconds"]))
        print()
    tp = res["throughput"]
    if not tp:
        return
    nbdcopy = statistics.median(t["nbdcopy_s"] for t in tp)
    engine = statistics.median(t["engine_s"] for t in tp)
    wall = statistics.median(t["wall_s"] for t in tp)
    nbytes = tp[0]["bytes"]
    print("| row | nbdcopy s | transfer engine s | CLI --wait s | "
          "MB/s engine | ratio nbdcopy/engine (target >= 0.9) |")
    print("|---|---|---|---|---|---|")
    size = args.size[:-1] + " GiB" if args.size.endswith("G") else args.size
    print("| {}, {}, A -> B | {:.2f} | {:.2f} | {:.2f} | {:.0f} | "
          "{:.2f} |".format(FULL_TRANSFER, size, nbdcopy, engine, wall,
                            nbytes / 1e6 / engine, nbdcopy / engine))
    print()
    print("Per run: nbdcopy s / engine s (engine reading the Source s, "
          "waiting for the destination s): {}".format(", ".join(
              "{:.2f}/{:.2f} ({}, {})".format(
                  t["nbdcopy_s"], t["engine_s"], t.get("reading_s"),
                  t.get("waiting_s")) for t in tp)))
    print()
    w = res["writes"]
    if not w:
        return
    print("| 4K randwrite QD16 on the Source | IOPS | vs unmarked |")
    print("|---|---|---|")
    for k, label in (("unmarked", "session unmarked (tracking)"),
                     ("marked", "marked (copy on first write)"),
                     ("transferring", "marked, transfer running")):
        print("| {} | {:.0f} | {:.2f} |".format(label, w[k],
                                               w[k] / w["unmarked"]))
    if res.get("overlap") and not all(res["overlap"]):
        print()
        print("(the transfer ended before fio in {} of {} runs)".format(
            res["overlap"].count(False), len(res["overlap"])))
