"""The scale suite of scripts/bench.py: several clients at once.

Aggregate 4 KiB random read and write IOPS (QD16 each) of 1, 2 and 4 fio
clients (jobs of one fio process, each with its own NBD connection), the
clients on separate LUs (lu0, lu1, ...) or all on lu0 (several connections
to one LU), as a ratio to one client of the same server.  Every server
serves the same files from one process (a clonectl variant after the
first serves copies of them: clonectl locks the files it serves):

    nbdkit-file         nbdkit's C file plugin, dir= (each file an export)
    python[:MODEL]      a bare Python plugin of nbdkit's python plugin:
                        os.preadv/os.pwrite on the export's file, nothing
                        else (the ceiling of any Python plugin), with
                        thread model MODEL (default serialize_requests)
    clonectl[:MODEL[:THREADS]]
                        `clonectl serve` with one LU per file
    clonectl-per-lu     one `clonectl serve` (its own state directory,
                        nbdkit and interpreter) per LU: what one worker
                        process per consistency domain would give
                        (docs/performance.md, "Using every core"); two
                        clients on one LU share one process

A variant of python or clonectl ending in @request or @connection sets the
plugin parameter thread_state= (plugins/clonectl_plugin.py): how long an
nbdkit connection thread's Python thread state lives.  nbdkit's own
behaviour is @request (a thread state made and deleted around every
callback); the bare plugin does that unless told @connection, clonectl
serve does @connection.  A clonectl@... variant runs nbdkit with the plugin
directly (as `clonectl serve` does, without the manager) to pass it.

With 2 cores, fio's clients and the server share the CPU: 4 clients cannot
scale past 2, and the rows with 4 say how each server degrades.
"""

import os
import statistics
import sys
import time

WORKLOADS = [
    # name, rw, bs, iodepth
    ("4K randread QD16", "randread", "4k", 16),
    ("4K randwrite QD16", "randwrite", "4k", 16),
]

# (clients, on separate LUs)
LAYOUTS = [(1, True), (2, True), (4, True), (2, False), (4, False)]
MAX_CLIENTS = 4
RAMP = 1    # seconds of fio's ramp before it measures

BARE_PLUGIN = '''\
import errno
import os

import nbdkit

API_VERSION = 2
_config = {"thread_model": "serialize_requests", "thread_state": "request"}
_held = {}


def config(key, value):
    _config[key] = value


def thread_model():
    return getattr(nbdkit, "THREAD_MODEL_" + _config["thread_model"].upper())


def list_exports(readonly, is_tls):
    return sorted(os.listdir(_config["dir"]))


def default_export(readonly, is_tls):
    return "lu0"


def open(readonly):
    fd = os.open(os.path.join(_config["dir"], nbdkit.export_name()),
                 os.O_RDWR)
    if _config["thread_state"] == "connection":
        import ctypes
        _held[fd] = ctypes.pythonapi.PyGILState_Ensure()
    return fd


def close(h):
    if h in _held:
        import ctypes
        ctypes.pythonapi.PyGILState_Release(_held.pop(h))
    os.close(h)


def get_size(h):
    return os.lseek(h, 0, os.SEEK_END)


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    os.preadv(h, [buf], offset)


def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)


def flush(h, flags):
    os.fdatasync(h)
'''


def _file_name(variant):
    return variant.replace(":", "-").replace("@", "-")


def layout_name(clients, separate):
    if clients == 1:
        return "1 client"
    return "{} clients, {}".format(
        clients, "separate LUs" if separate else "one LU")


class ScaleServers:
    """Every variant serving the files lu0..lu3 of datadir (clonectl
    variants after the first on copies: Servers.own_file); stops them by
    PID through bench.Servers' exit stack."""

    def __init__(self, bench, servers, workdir, datadir):
        self.bench = bench
        self.servers = servers
        self.workdir = workdir
        self.datadir = datadir
        self.sockets = {}
        self.pids = {}

    def cpu_seconds(self, variant):
        """CPU time used so far by the variant's processes (the server,
        and for clonectl serve its nbdkit)."""
        return sum(_cpu_seconds(pid) for pid in self.pids[variant])

    def _lu_files(self, state, lus, variant):
        """LUs lu<i> of state on the data files of lus (indexes), or on
        copies of them (Servers.own_file)."""
        for i in lus:
            self.bench.clonectl(state, "lu", "create", "lu%d" % i, "--file",
                                self.servers.own_file(os.path.join(
                                    self.datadir, "lu%d" % i), variant))

    def _clonectl(self, state, sock, lus, model, threads, variant):
        """`clonectl serve` of lus (indexes of the data files) on sock;
        its process."""
        self._lu_files(state, lus, variant)
        cmd = [self.bench.CLONECTL, "--state-dir", state, "serve",
               "--socket", sock]
        if model:
            cmd += ["--thread-model", model]
        if threads:
            cmd += ["--threads", threads]
        proc = self.servers._popen(cmd, os.path.basename(state) + ".log")
        self.bench.wait_socket(sock, proc)
        return proc

    def start(self, variants):
        plugin = os.path.join(self.workdir, "bare_plugin.py")
        with open(plugin, "w") as f:
            f.write(BARE_PLUGIN)
        for variant in variants:
            sock = os.path.join(self.workdir, _file_name(variant) + ".sock")
            spec, _, thread_state = variant.partition("@")
            kind, model, threads = (spec.split(":") + ["", ""])[:3]
            log = _file_name(variant) + ".log"
            if kind == "clonectl-per-lu":
                state = os.path.join(self.workdir, _file_name(variant))
                procs = [self._clonectl("{}.{}".format(state, i),
                                        "{}.{}".format(sock, i), [i],
                                        model, threads, variant)
                         for i in range(MAX_CLIENTS)]
                self.sockets[variant] = ["{}.{}".format(sock, i)
                                         for i in range(MAX_CLIENTS)]
                self.pids[variant] = [p.pid for p in procs]
                continue
            if kind == "nbdkit-file":
                proc = self.servers._popen(
                    ["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                     "file", "dir=" + self.datadir], log)
            elif kind == "python":
                cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock]
                if threads:
                    cmd += ["--threads", threads]
                cmd += ["python", plugin, "dir=" + self.datadir]
                if thread_state:
                    cmd.append("thread_state=" + thread_state)
                if model:
                    cmd.append("thread_model=" + model)
                proc = self.servers._popen(cmd, log)
            elif kind == "clonectl" and not thread_state:
                proc = self._clonectl(
                    os.path.join(self.workdir, _file_name(variant)), sock,
                    range(MAX_CLIENTS), model, threads, variant)
            elif kind == "clonectl":
                # nbdkit with the plugin directly, to pass thread_state.
                state = os.path.join(self.workdir, _file_name(variant))
                self._lu_files(state, range(MAX_CLIENTS), variant)
                cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", sock]
                if threads:
                    cmd += ["--threads", threads]
                cmd += ["python", os.path.join(self.bench.REPO, "plugins",
                                               "clonectl_plugin.py"),
                        "statedir=" + state,
                        "pythonpath=" + self.bench.REPO,
                        "thread_state=" + thread_state]
                if model:
                    cmd.append("thread_model=" + model)
                proc = self.servers._popen(cmd, log)
            else:
                raise SystemExit("unknown server variant " + variant)
            self.bench.wait_socket(sock, proc)
            self.sockets[variant] = [sock] * MAX_CLIENTS
            self.pids[variant] = [proc.pid]

    def uris(self, variant, clients, separate):
        lus = range(clients) if separate else [0] * clients
        return ["nbd+unix:///lu{}?socket={}".format(
            i, self.sockets[variant][i]) for i in lus]


def _cpu_seconds(pid):
    """utime + stime of pid and its descendants, in seconds."""
    total = 0
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            fields = f.read().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK")
        for tid in os.listdir("/proc/{}/task".format(pid)):
            with open("/proc/{}/task/{}/children".format(pid, tid)) as f:
                total += sum(_cpu_seconds(int(c)) for c in f.read().split())
    except FileNotFoundError:
        pass
    return total


def run_fio_clients(bench, uris, rw, bs, iodepth, runtime, size):
    """One fio process, one job (and NBD connection) per URI, started
    together; the sum of the jobs' IOPS."""
    jobs = bench.run_fio_command(bench.fio_command(
        uris, rw, bs, iodepth, size, runtime, ramp=RAMP))
    side = "read" if "read" in rw else "write"
    return sum(job[side]["iops"] for job in jobs)


def run(bench, args, size, workdir):
    variants = args.servers.split(",") if args.servers_given else \
        ["nbdkit-file", "python", "clonectl"]
    workloads = [w for w in WORKLOADS if not args.only or args.only in w[0]]
    datadir = os.path.join(workdir, "data")
    os.mkdir(datadir)
    for i in range(MAX_CLIENTS):
        bench.make_image(os.path.join(datadir, "lu%d" % i), size)
    results = {}
    with bench.Servers(workdir, None, []) as servers:
        scale = ScaleServers(bench, servers, workdir, datadir)
        scale.start(variants)
        for name, rw, bs, qd in workloads:
            # Every layout once per repeat, one after the other: the
            # machine's load drifts over minutes, so N clients are
            # compared with the one client measured beside them (a ratio
            # per repeat, then the median).
            samples = {row: {v: [] for v in variants} for row in LAYOUTS}
            cpu = {row: {v: [] for v in variants} for row in LAYOUTS}
            busy = {row: {v: [] for v in variants} for row in LAYOUTS}
            for rep in range(args.repeat):
                for clients, separate in LAYOUTS:
                    for v in bench.rotate(variants, rep):
                        c0 = scale.cpu_seconds(v)
                        with bench.MachineCpu() as machine:
                            iops = run_fio_clients(
                                bench, scale.uris(v, clients, separate), rw,
                                bs, qd, args.runtime, size)
                        c1 = scale.cpu_seconds(v)
                        busy[clients, separate][v].append(machine.busy)
                        samples[clients, separate][v].append(iops)
                        # Server CPU per request over the whole fio run:
                        # its ramp ran at about the measured rate.
                        cpu[clients, separate][v].append(
                            (c1 - c0) * 1e6 / (iops * (args.runtime + RAMP)))
            for layout in LAYOUTS:
                one = samples[LAYOUTS[0]]
                cell = {v: {"iops": statistics.median(samples[layout][v]),
                            "n_over_1": statistics.median(
                                n / o for n, o in zip(samples[layout][v],
                                                      one[v])),
                            "cpu_us": statistics.median(cpu[layout][v]),
                            "busy": statistics.median(busy[layout][v])}
                        for v in variants}
                row = layout_name(*layout)
                results.setdefault(name, {})[row] = cell
                print("{:<20} {:<26} {}".format(
                    name, row, "  ".join(
                        "{}={:.0f} ({:.2f}, {:.1f} us)".format(
                            v, cell[v]["iops"], cell[v]["n_over_1"],
                            cell[v]["cpu_us"])
                        for v in variants)),
                      file=sys.stderr, flush=True)
    return {"variants": variants, "results": results}


def print_tables(report, args):
    variants = report["variants"]
    base = "nbdkit-file" if "nbdkit-file" in variants else variants[0]
    print("clonectl scale benchmark, {} ({} cores), {} per LU, fio nbd "
          "engine, {} s x {} runs, medians; aggregate IOPS of N clients, "
          "N / 1 client of the same server (per run, the median of the "
          "runs' ratios), server CPU us per request (all its threads), "
          "busy: the machine's cores busy during the run (every "
          "process)".format(
              time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              os.cpu_count(), args.size, args.runtime, args.repeat))
    for name, rows in report["results"].items():
        print()
        header = [name]
        for v in variants:
            header += ["{} IOPS".format(v), "N/1", "CPU us", "busy"]
        header += ["{}/{}".format(v, base) for v in variants if v != base]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row, cell in rows.items():
            cells = [row]
            for v in variants:
                iops = cell[v]["iops"]
                cells += ["{:.0f}".format(iops),
                          "{:.2f}".format(cell[v]["n_over_1"]),
                          "{:.1f}".format(cell[v]["cpu_us"]),
                          "{:.0%}".format(cell[v]["busy"])]
            cells += ["{:.2f}".format(cell[v]["iops"] / cell[base]["iops"])
                      for v in variants if v != base]
            print("| " + " | ".join(cells) + " |")
