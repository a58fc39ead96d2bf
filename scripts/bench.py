"""Side-by-side NBD benchmarks: clonectl against nbdkit's file plugin and
qemu-nbd, serving the same file, measured with fio's nbd engine.

Servers are measured alternately within each row and each row is repeated;
the table shows medians and our ratio to nbdkit-file.  This machine is noisy
(±20-30% run to run), which is why nothing here is a pass/fail test.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

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
    """Start every server to compare on the same file; stop them by PID."""

    def __init__(self, workdir, image, variants):
        super().__init__()
        self.workdir = workdir
        self.image = image
        self.variants = variants
        self.uris = {}

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
                proc = self._popen(["qemu-nbd", "-f", "raw", "--persistent",
                                    "--shared=16", "--socket", sock,
                                    self.image], variant + ".log")
                uri = "nbd+unix:///?socket=" + sock
            elif variant.startswith("clonectl"):
                _, model, threads = (variant.split(":") + ["", ""])[:3]
                state = os.path.join(self.workdir, variant.replace(":", "-"))
                subprocess.run([CLONECTL, "--state-dir", state, "lu", "create",
                                "bench", "--file", self.image], check=True,
                               stdout=subprocess.DEVNULL)
                cmd = [CLONECTL, "--state-dir", state, "serve", "--socket", sock]
                if model:
                    cmd += ["--thread-model", model]
                if threads:
                    cmd += ["--threads", threads]
                proc = self._popen(cmd, variant.replace(":", "-") + ".log")
                uri = "nbd+unix:///bench?socket=" + sock
            else:
                raise SystemExit("unknown server variant " + variant)
            wait_socket(sock, proc)
            self.uris[variant] = uri


def run_fio(uri, rw, bs, iodepth, runtime, size):
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri,
           "--rw=" + rw, "--bs=" + bs, "--iodepth=" + str(iodepth),
           "--size=" + str(size), "--time_based", "--runtime=" + str(runtime),
           "--ramp_time=1", "--randrepeat=0", "--norandommap",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out[out.index("{"):])
    job = doc["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p99_us": pct.get("99.000000", 0) / 1000.0}


def make_image(path, size):
    """A fully allocated file of random data, so reads are not holes."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="image size (default 1G)")
    p.add_argument("--runtime", type=int, default=5,
                   help="seconds per fio run (default 5)")
    p.add_argument("--repeat", type=int, default=3,
                   help="repeats per row; medians are shown (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="runtime 2 s, 1 repeat, 256M image")
    p.add_argument("--servers", default="nbdkit-file,qemu-nbd,clonectl",
                   help="comma-separated variants: nbdkit-file, qemu-nbd, "
                        "clonectl[:THREAD_MODEL[:THREADS]] (default %(default)s)")
    p.add_argument("--only", help="run only workloads whose name contains this")
    p.add_argument("--json", metavar="FILE", help="also write results as JSON")
    p.add_argument("--workdir", help="where to put the image (default: a "
                   "temporary directory under /var/tmp)")
    args = p.parse_args()
    if args.quick:
        args.runtime, args.repeat, args.size = 2, 1, "256M"
    size = int(subprocess.check_output(
        ["numfmt", "--from=iec", args.size]).decode())
    variants = args.servers.split(",")
    base = "nbdkit-file" if "nbdkit-file" in variants else variants[0]
    workloads = [w for w in WORKLOADS if not args.only or args.only in w[0]]

    workdir = tempfile.mkdtemp(prefix="clonectl-bench-",
                               dir=args.workdir or "/var/tmp")
    results = {}
    try:
        image = os.path.join(workdir, "image.raw")
        make_image(image, size)
        with Servers(workdir, image, variants) as servers:
            servers.start()
            for name, rw, bs, qd in workloads:
                samples = {v: [] for v in variants}
                for rep in range(args.repeat):
                    order = variants[rep % len(variants):] + \
                        variants[:rep % len(variants)]
                    for v in order:
                        samples[v].append(run_fio(servers.uris[v], rw, bs, qd,
                                                  args.runtime, size))
                results[name] = {
                    v: {k: statistics.median(s[k] for s in samples[v])
                        for k in ("iops", "mbps", "p99_us")}
                    for v in variants}
                print_row(name, results[name], variants, base, file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(results, variants, base, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(args),
                       "results": results}, f, indent=2)


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


if __name__ == "__main__":
    main()
