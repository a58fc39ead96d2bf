"""The manager side of `clonectl serve`: start, supervise and stop nbdkit.

One server per state directory, guarded by an flock on run/serve.lock held
for the server's whole life (a stale lock cannot outlive its process).
run/serve.json records what a running server listens on, for `status`,
`stop` and clients.  A command that works on the directory without a server
holds the same lock meanwhile (served_or_exclusive), so a server and such a
command never overlap, neither while the server starts nor while it stops.

nbdkit runs in the foreground as our child, so a kill -9 of the manager
takes nbdkit with it even while clients stay connected: PR_SET_PDEATHSIG=
SIGKILL, and since that was measured not to fire on this kernel once nbdkit
has connection threads, a watchdog thread in the target that exits when its
parent changes (--exit-with-parent would start a graceful shutdown, which
waits for idle clients).  If nbdkit itself dies unexpectedly the manager restarts
it (recovery then runs inside the new target), at most RESTART_LIMIT times
in RESTART_WINDOW seconds.

Stopping: the target is asked to stop its engines and commit its maps
(prepare_stop on the control socket), then nbdkit gets SIGTERM and, since it
waits for connected clients to leave, SIGKILL after STOP_GRACE seconds.
Nothing is lost by the SIGKILL: completed writes are in the page cache and
the activity map covers the writes that arrive after the commit.

A server that fails to start (another one runs, the socket is in use)
removes nothing: only what this process created is cleaned up.

nbdkit does not remove its Unix socket on exit; we remove the sockets we
configured, and only after checking that nothing answers on them.  A socket
path holding anything but a socket (a mistyped --socket naming state.json
or an image) is never removed: the server refuses to start instead.
"""

import contextlib
import datetime
import fcntl
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

from . import access, control, errors, fsutil, limits, operations, procutil

log = logging.getLogger("clonectl.serve")

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "plugins", "clonectl_plugin.py")
PYTHONPATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
STOP_TIMEOUT = 30.0
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
# How long a command (or a second server) waits for a server that is
# starting or stopping, or for another command, to release run/serve.lock.
LOCK_PATIENCE = 10.0
ISCSI_POLL = 1.0  # seconds between checks of the exports for the iSCSI side


class Listen:
    """Where the NBD server listens: a Unix socket or a TCP address, with
    TLS (pre-shared keys or X.509 certificates, optionally verifying client
    certificates), a server-wide allow-list of client addresses and
    per-export ones (target/access.py) as options."""

    def __init__(self, socket_path=None, port=None, bind=None, tls_psk=None,
                 tls_certificates=None, allow=(), tls_verify_peer=False,
                 allow_export=(), max_connections=None, max_per_address=None):
        if socket_path and port is not None:
            raise errors.InvalidArgument(
                reason="--socket and --port are exclusive: choose one")
        if bind and port is None:
            raise errors.InvalidArgument(reason="--bind needs --port")
        if tls_psk and tls_certificates:
            raise errors.InvalidArgument(
                reason="--tls-psk and --tls-certificates are exclusive: "
                       "choose one")
        if tls_verify_peer and not tls_certificates:
            raise errors.InvalidArgument(
                reason="--tls-verify-peer needs --tls-certificates: only "
                       "X.509 clients have certificates to verify")
        for given, option in ((allow, "--allow"),
                              (allow_export, "--allow-export")):
            if given and port is None:
                raise errors.InvalidArgument(
                    reason="{} needs --port: client addresses exist only "
                           "over TCP".format(option))
        self.socket_path = fsutil.unix_socket_path(socket_path) \
            if socket_path else None
        self.port = port
        self.bind = bind or ("127.0.0.1" if port is not None else None)
        self.tls_psk = _check_psk_file(tls_psk) if tls_psk else None
        self.tls_certificates = _check_certificates_dir(tls_certificates) \
            if tls_certificates else None
        self.tls_verify_peer = bool(tls_verify_peer)
        self.allow = [access.parse(a) for a in allow]
        self.allow_export = access.parse_export_rules(allow_export)
        # None: the defaults, settled by resolve_limits() when serving.
        self.max_connections = max_connections
        self.max_per_address = max_per_address

    def resolve_limits(self, nofile, fds_per_connection=1):
        """Fill in the connection limits not given, for an open-file limit
        of nofile (target/limits.py)."""
        if self.max_connections is None:
            self.max_connections = limits.default_max_connections(
                nofile, fds_per_connection)
        if self.max_per_address is None:
            self.max_per_address = limits.DEFAULT_MAX_PER_ADDRESS

    @property
    def tls(self):
        if self.tls_psk:
            return "psk"
        return "certificates" if self.tls_certificates else None

    def nbdkit_args(self):
        """nbdkit options (before the plugin name)."""
        if self.tls_psk:
            args = ["--tls=require", "--tls-psk=" + self.tls_psk]
        elif self.tls_certificates:
            args = ["--tls=require",
                    "--tls-certificates=" + self.tls_certificates]
            if self.tls_verify_peer:
                args.append("--tls-verify-peer")
        else:
            args = []
        if self.socket_path:
            return ["--unix", self.socket_path] + args
        return ["--port", str(self.port), "--ipaddr", self.bind] + args

    def nbdkit_params(self):
        """Plugin parameters (after the plugin name): the plugin refuses
        clients from other addresses before the handshake (allow=) and
        clients opening an export from an address its rules do not list
        (allow_export=EXPORT=NET,..., one per export); target/access.py says
        why this is not nbdkit's ip filter."""
        params = ["allow=" + access.to_param(self.allow)] if self.allow \
            else []
        if self.max_connections is not None:
            params.append("max_connections={}".format(self.max_connections))
        if self.max_per_address is not None:
            params.append("max_per_address={}".format(self.max_per_address))
        return params + ["allow_export={}={}".format(name, access.to_param(
            nets)) for name, nets in sorted(self.allow_export.items())]

    def uri(self, export=""):
        scheme = "nbds" if self.tls else "nbd"
        if self.socket_path:
            return "{}+unix:///{}?socket={}".format(scheme, export,
                                                   self.socket_path)
        host = "[{}]".format(self.bind) if ":" in self.bind else self.bind
        return "{}://{}:{}/{}".format(scheme, host, self.port, export)

    def to_dict(self):
        return {"socket": self.socket_path, "port": self.port,
                "bind": self.bind, "uri": self.uri("EXPORT"),
                "tls": self.tls,
                "tls_verify_peer": self.tls_verify_peer,
                "allow": [access.show(n) for n in self.allow] or None,
                "allow_export": {name: [access.show(n) for n in nets]
                                 for name, nets in
                                 sorted(self.allow_export.items())} or None,
                "max_connections": self.max_connections,
                "max_connections_per_address": self.max_per_address}


CERTIFICATE_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def _check_certificates_dir(path):
    """nbdkit --tls-certificates=DIR reads ca-cert.pem, server-cert.pem and
    server-key.pem from DIR; the key must not be readable by others."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise errors.TLSCertificatesUnusable(
            path=path, reason="it does not exist" if not os.path.exists(path)
            else "it is not a directory")
    for name in CERTIFICATE_FILES:
        f = os.path.join(path, name)
        try:
            st = os.stat(f)
        except OSError as e:
            raise errors.TLSCertificatesUnusable(
                path=path, reason="{}: {}".format(name, e.strerror))
        if not stat.S_ISREG(st.st_mode):
            raise errors.TLSCertificatesUnusable(
                path=path, reason="{} is not a regular file".format(name))
    key = os.path.join(path, "server-key.pem")
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        raise errors.TLSCertificatesUnusable(
            path=path, reason="server-key.pem is readable by others (mode "
            "{:o}): chmod 600 {}".format(mode, key))
    return path


def _check_psk_file(path):
    """The PSK file (nbdkit --tls-psk: lines of username:hexkey) must
    exist and be private: its keys are the only credential."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.InvalidArgument(reason="TLS PSK file {}: {}".format(
            path, e.strerror))
    if not stat.S_ISREG(st.st_mode):
        raise errors.InvalidArgument(
            reason="TLS PSK file {} is not a regular file".format(path))
    if st.st_mode & 0o077:
        raise errors.InvalidArgument(
            reason="TLS PSK file {} is readable by others (mode {:o}): "
                   "chmod 600 it".format(path, stat.S_IMODE(st.st_mode)))
    return path


NBD_MAGIC = b"NBDMAGIC"
NBD_OPTS_MAGIC = b"IHAVEOPT"
NBD_REP_MAGIC = 0x3e889045565a9
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
NBD_OPT_ABORT = 2


def nbd_handshake_answers(sock):
    """Whether the NBD server on the connected sock completes the start of
    a fixed-newstyle handshake: its greeting, our flags, NBD_OPT_ABORT and
    its acknowledgement.  A bare connect-and-close makes nbdkit log an
    error (a broken pipe sending its greeting); this makes it log nothing.
    libnbd could do the same, but the manager must not depend on it."""
    def recv_exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed during the handshake")
            data += chunk
        return data

    try:
        greeting = recv_exactly(18)
        if greeting[:16] != NBD_MAGIC + NBD_OPTS_MAGIC:
            return False
        sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE |
                                 NBD_FLAG_NO_ZEROES) + NBD_OPTS_MAGIC +
                     struct.pack(">II", NBD_OPT_ABORT, 0))
        # The ACK (magic, option, type, length): read it before closing,
        # or nbdkit would be writing to a closed socket.
        magic = struct.unpack(">QIII", recv_exactly(20))[0]
        return magic == NBD_REP_MAGIC
    except OSError:
        return False


def _local_source(bind):
    """The source address of our own connection to bind."""
    address = ipaddress.ip_address(bind)
    if address.is_unspecified:
        return ipaddress.ip_address("::1" if address.version == 6
                                    else "127.0.0.1")
    return address


def _socket_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _remove_stale_socket(path):
    if not fsutil.is_socket(path):
        return
    if _socket_answers(path):
        raise errors.InvalidArgument(
            reason="{} is in use by another server".format(path))
    os.unlink(path)


def read_serve_info(state_dir):
    """Return serve.json of a running server, or None if none runs."""
    info = _read_info_file(state_dir)
    if info is None or not _lock_held(state_dir):
        return None  # left behind by a server that was killed
    return info


def _read_info_file(state_dir):
    try:
        with open(state_dir.serve_info_file) as f:
            info = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _take_serve_lock(state_dir, patience=LOCK_PATIENCE):
    """Return (fd, None) holding run/serve.lock, or (None, serve.json) if a
    published server holds it.

    A holder without serve.json is a server starting or stopping, or a
    command working on the directory itself: wait up to patience seconds
    for it to publish or let go, then refuse (StateDirBusy).
    """
    state_dir.ensure()
    deadline = time.monotonic() + patience
    while True:
        fd = os.open(state_dir.serve_lock_file,
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
        else:
            return fd, None
        info = _read_info_file(state_dir)
        if info is not None:
            return None, info
        if time.monotonic() >= deadline:
            raise errors.StateDirBusy(
                state_dir=state_dir.path,
                pid=_lock_holder(state_dir.serve_lock_file) or "unknown")
        time.sleep(0.1)


@contextlib.contextmanager
def served_or_exclusive(state_dir, patience=LOCK_PATIENCE):
    """The way a command reaches a state directory: yields serve.json of
    the running server, whose control socket the command must then use, or
    None while holding run/serve.lock, so that no server starts (or stops
    half-way) while the command works on the directory itself."""
    fd, info = _take_serve_lock(state_dir, patience)
    if fd is None:
        yield info
        return
    try:
        # What a killed server published; no server runs while we hold
        # the lock, and other commands must not take it for one.
        fsutil.remove_durably([state_dir.serve_info_file])
        yield None
    finally:
        os.close(fd)


def _lock_holder(path):
    """The pid holding the flock on path, from /proc/locks, or None."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inode = "{:02x}:{:02x}:{}".format(os.major(st.st_dev),
                                      os.minor(st.st_dev), st.st_ino)
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode \
                and fields[4].isdigit() and fields[4] != "0":
            return int(fields[4])
    return None


def _lock_held(state_dir):
    try:
        fd = os.open(state_dir.serve_lock_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Server:

    def __init__(self, state_dir, listen, thread_model=None, threads=None,
                 thread_state=None, pidfile=None, out=None, peer=None,
                 iscsi=None, replication=None, metrics=None):
        self.state_dir = state_dir
        # (bind, port) of the metrics and status page listener, or None.
        self.metrics = metrics
        self.monitor = None
        # dict(portal=(host, port), iqn_prefix=..., allow={...}) or None.
        self.iscsi = iscsi
        self.gateway = None
        self.gateway_secret = None  # (secret, file) of this start's route
        self._iscsi_polled = 0.0
        # (bind, port, token, TLS certificates directory or None) of the
        # manager-to-manager listener, or None.
        self.peer = peer
        self.peer_server = None
        # (bind, port, token file, TLS certificates directory or None) of
        # the replication listener, or None.
        self.replication = replication
        self.listen = listen
        self.thread_model = thread_model
        self.threads = threads
        self.thread_state = thread_state
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self.out = out or sys.stderr
        self.proc = None
        self.stopping = False
        self._lock_fd = None
        self._acquired = False
        self._published = False
        self._restarts = []
        self._pump = None
        self.reload_requested = False
        self._nofile = None
        self.detached = False   # our stderr is run/serve.log already
        # Called with the server on SIGHUP before the inventory is read
        # again: the CLI re-reads the configuration file (target/config.py)
        # and applies what can change while serving (set_access).
        self.on_reload = None

    def say(self, msg, level=None):
        """Log msg as the manager (clonectl.serve); "error: ..." and
        "warning: ..." messages at their level, others at INFO."""
        limits.install_log_limit(self.out)
        if level is None:
            level = logging.ERROR if msg.startswith("error") else \
                logging.WARNING if msg.startswith("warning") else logging.INFO
        log.log(level, "%s", msg)

    # Start-up.

    def acquire(self):
        self.state_dir.ensure()
        fd, info = _take_serve_lock(self.state_dir)
        if fd is None:
            raise errors.ServerRunning(state_dir=self.state_dir.path,
                                       pid=info.get("pid", "unknown"))
        try:
            # What a killed server published: while this one starts,
            # nobody may take it for the running server (`stop` would
            # signal a pid that may belong to another process by now).
            fsutil.remove_durably([self.state_dir.serve_info_file])
            # Under the lock, so no command changes them meanwhile: refuse
            # a corrupt or missing inventory before listening.
            self.state_dir.load()
            self.state_dir.check_inventory_present()
            if self.listen.socket_path:
                _remove_stale_socket(self.listen.socket_path)
            _remove_stale_socket(self.state_dir.control_socket)
            # What a crashed server recorded (tgtd, nbdfuse mounts); always,
            # even if this server does not serve iSCSI.
            from . import iscsi
            iscsi.cleanup_stale(self.state_dir.iscsi_record, self.say)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._acquired = True

    def nbdkit_command(self):
        cmd = ["nbdkit", "--foreground",
               "--pidfile", self.state_dir.nbdkit_pid_file]
        cmd += self.listen.nbdkit_args()
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        cmd += ["python", PLUGIN, "statedir=" + self.state_dir.path,
                "pythonpath=" + PYTHONPATH, "parent={}".format(os.getpid())]
        if self.thread_model:
            cmd.append("thread_model=" + self.thread_model)
        if self.thread_state:
            cmd.append("thread_state=" + self.thread_state)
        if self.replication is not None:
            bind, port, token_file, tls_dir = self.replication
            cmd += ["replication={}:{}".format(bind, port),
                    "replication_token=" + os.path.abspath(token_file)]
            if tls_dir:
                cmd.append("replication_tls=" + os.path.abspath(tls_dir))
        if self.gateway_secret is not None:
            # A file, not the secret: command lines are readable by all.
            cmd.append("gateway_secret=" + self.gateway_secret[1])
        return cmd + self.listen.nbdkit_params()

    def spawn(self):
        """Start nbdkit; its output reaches run/serve.log through a
        LineLimiter (a client can make nbdkit and the plugin print a
        message per connection)."""
        log = os.open(self.state_dir.serve_log_file,
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                      0o600)
        try:
            os.write(log, limits.stamp_line(b"starting nbdkit\n",
                                            b"clonectl.serve"))
            self.proc = subprocess.Popen(
                self.nbdkit_command(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                close_fds=True, preexec_fn=procutil.die_with_parent)
        except BaseException:
            os.close(log)
            raise
        self._pump = threading.Thread(target=procutil.pump_log,
                                      args=(self.proc.stdout, log),
                                      name="nbdkit-log", daemon=True)
        self._pump.start()
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._pump.join(5)  # its last words, for log_tail()
                raise errors.ServerFailed(
                    reason="nbdkit exited with status {}:\n{}".format(
                        self.proc.returncode, self.log_tail()))
            if control.try_call(self.state_dir.control_socket, "ping",
                                reply_timeout=2) is not None and self._nbd_ready():
                return
            time.sleep(0.05)
        self._kill()
        raise errors.ServerFailed(
            reason="nbdkit did not answer within {:.0f} s:\n{}".format(
                READY_TIMEOUT, self.log_tail()))

    def _nbd_ready(self):
        """Whether an NBD client can reach the export list: a handshake,
        so that nbdkit logs nothing.  With an --allow list that would
        refuse this host, only the control socket's answer counts (nbdkit
        listens before the plugin's after_fork starts the control socket),
        so that the check does not log a refusal."""
        try:
            if self.listen.socket_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(2)
                try:
                    sock.connect(self.listen.socket_path)
                except OSError:
                    sock.close()
                    raise
            elif self.listen.allow and not access.AllowList(
                    access.to_param(self.listen.allow)).permits(
                        _local_source(self.listen.bind)):
                return True
            else:
                sock = socket.create_connection(
                    (self.listen.bind, self.listen.port), timeout=2)
        except OSError:
            return False
        with sock:
            return nbd_handshake_answers(sock)

    def log_tail(self, lines=15):
        try:
            with open(self.state_dir.serve_log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def publish(self):
        info = {"pid": os.getpid(), "nbdkit_pid": self.proc.pid,
                "control_socket": self.state_dir.control_socket,
                "started": _now()}
        info.update(self.listen.to_dict())
        if self.peer is not None:
            info["peer"] = "{}:{}".format(self.peer[0], self.peer[1])
        if self.replication is not None:
            info["replication"] = "{}:{}".format(*self.replication[:2])
        if self.monitor is not None:
            info["metrics"] = self.monitor.address
        if self.gateway is not None:
            info["iscsi"] = {
                "portal": "{}:{}".format(*self.gateway.portal),
                "iqn_prefix": self.gateway.iqn_prefix,
                "control_port": self.gateway.control_port,
                "tgtd_pid": self.gateway.tgtd.pid,
                "chap": "mutual" if self.gateway.chap_mutual else
                "one-way" if self.gateway.chap else None}
        fsutil.write_json_atomic(self.state_dir.serve_info_file, info)
        self._published = True
        if self.pidfile:
            fsutil.write_atomic(self.pidfile, "{}\n".format(os.getpid())
                                .encode(), mode=0o644)
        return info

    # Running.

    def run(self, ready=None):
        """Serve until SIGTERM/SIGINT; ready(info) is called once serving."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        # A signal, and a child's exit, wake the supervision at once
        # (_wait_nbdkit) rather than at its next look.
        self._wakeup, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        limits.install_log_limit(self.out)
        # nbdkit inherits the raised limit; the default connection cap is
        # what it leaves after the engines' reserve.
        nofile = self._nofile = limits.raise_nofile_limit()
        per_connection = 3 if self.thread_model == "parallel" else 1
        if self.thread_model == "parallel":
            self.say("warning: thread model parallel is for benchmarks: "
                     "nbdkit 1.32 aborts under it when a client goes away "
                     "with requests in flight, dropping every connection")
        given = self.listen.max_connections
        self.listen.resolve_limits(nofile, per_connection)
        room = limits.connection_room(nofile, per_connection)
        if given is not None and room is not None and given > room:
            self.say("warning: --max-connections {} leaves less than the "
                     "reserve of the open-file limit {} for the engines"
                     .format(given, nofile))
        try:
            self.acquire()
            if self.metrics is not None:
                # Bound before nbdkit starts: a port in use fails the start
                # at once.
                from .monitor import Monitor
                self.monitor = Monitor(self.metrics[0], self.metrics[1],
                                       self.state_dir.control_socket)
            if not self.detached:
                # The whole story in one file, stderr (the journal) too.
                limits.add_log_file(self.state_dir.serve_log_file)
            if self.iscsi is not None:
                from . import iscsi
                self.gateway_secret = iscsi.make_secret(
                    self.state_dir.run_dir)
            self.spawn()
            if self.peer is not None:
                from . import channel
                from .peer import PeerServer
                bind, port, token, tls_dir = self.peer
                tls = channel.server_context(
                    tls_dir, "--peer-tls-certificates") if tls_dir else None
                self.peer_server = PeerServer(
                    bind, port, token, self.state_dir.control_socket,
                    operations.PEER_OPERATIONS,
                    check=operations.check_arguments, tls=tls)
                self.peer_server.start()
            if self.iscsi is not None:
                self._start_gateway()
            if self.monitor is not None:
                self.monitor.start()
            info = self.publish()
            if ready:
                ready(info)
            sd_notify("READY=1", "STATUS=serving on " + (
                info["socket"] or "{}:{}".format(info["bind"], info["port"])))
            self._supervise()
        finally:
            sd_notify("STOPPING=1")
            try:
                self._cleanup()
            finally:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(signal.set_wakeup_fd(-1))
                os.close(self._wakeup)

    def _start_gateway(self):
        from . import iscsi
        self.gateway = iscsi.Gateway(
            self.state_dir.run_dir, self.listen.uri, self.iscsi["portal"],
            self.gateway_secret[0], iqn_prefix=self.iscsi.get("iqn_prefix"),
            allow=self.iscsi.get("allow"), chap=self.iscsi.get("chap"),
            chap_mutual=self.iscsi.get("chap_mutual"),
            log_path=self.state_dir.serve_log_file,
            preexec_fn=procutil.die_with_parent, say=self.say)
        self.gateway.start()
        self._sync_gateway()

    def _sync_gateway(self):
        """Bring the iSCSI targets in line with the target's exports."""
        self._iscsi_polled = time.monotonic()
        try:
            modes = control.call(self.state_dir.control_socket,
                                 "export_modes", reply_timeout=10)
        except (OSError, errors.Error) as e:
            self.say("iSCSI: cannot list exports: {}".format(e), logging.ERROR)
            return
        try:
            self.gateway.sync(modes)
        except errors.Error as e:
            self.say("iSCSI: {}".format(e), logging.ERROR)

    def _on_signal(self, signum, frame):
        self.stopping = True

    def _on_hangup(self, signum, frame):
        self.reload_requested = True

    def reload(self):
        """SIGHUP (systemctl reload): re-read the configuration file (allow
        lists and connection limits apply at once, the rest at the next
        start; on_reload says which) and the inventory, as `clonectl lu
        create` does while serving: new LUs are exported, removed ones no
        longer; connected clients stay connected."""
        self.reload_requested = False
        sd_notify("RELOADING=1", "MONOTONIC_USEC={}".format(
            time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        try:
            if self.on_reload is not None:
                self.on_reload(self)
            result = control.call(self.state_dir.control_socket, "reload",
                                  reply_timeout=30)
            self.say("reloaded the inventory: {} exports".format(
                len(result.get("exports") or ())))
            if self.gateway is not None:
                self._sync_gateway()
        except (OSError, errors.Error) as e:
            self.say("error: reload failed: {}".format(e))
        finally:
            sd_notify("READY=1")

    LIVE = ("allow", "allow_export", "max_connections", "max_per_address")

    def set_access(self, allow, allow_export, max_connections,
                   max_per_address):
        """Replace the allow lists and connection limits while serving
        (a reload): nbdkit's plugin checks them at each new connection;
        connected clients stay.  Arguments as Listen takes them."""
        new = Listen(self.listen.socket_path, self.listen.port,
                     self.listen.bind if self.listen.port is not None
                     else None, allow=allow, allow_export=allow_export,
                     max_connections=max_connections,
                     max_per_address=max_per_address)
        if self.iscsi is not None and (new.allow or new.allow_export):
            raise errors.InvalidArgument(
                reason="--iscsi-portal cannot be combined with --allow or "
                       "--allow-export yet")
        new.resolve_limits(self._nofile, 3 if self.thread_model ==
                           "parallel" else 1)
        control.call(self.state_dir.control_socket, "set_access",
                     reply_timeout=10, allow=access.to_param(new.allow),
                     allow_export=["{}={}".format(name, access.to_param(nets))
                                   for name, nets in
                                   sorted(new.allow_export.items())],
                     max_connections=new.max_connections,
                     max_per_address=new.max_per_address)
        for name in self.LIVE:
            setattr(self.listen, name, getattr(new, name))
        self.publish()      # for status, and for a restart of nbdkit

    def _supervise(self):
        while True:
            if self.stopping:
                return
            if self.reload_requested:
                self.reload()
            status = self._wait_nbdkit(0.2)
            if status is None:
                if self.gateway is not None and not self.stopping and \
                        time.monotonic() - self._iscsi_polled >= ISCSI_POLL:
                    self._sync_gateway()
                continue
            if self.stopping:
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts
                              if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > RESTART_LIMIT:
                raise errors.ServerFailed(
                    reason="nbdkit died {} times within {:.0f} s; giving up"
                    .format(len(self._restarts), RESTART_WINDOW))
            self.say("nbdkit (pid {}) died with status {}; restarting"
                     .format(self.proc.pid, status), logging.ERROR)
            if self.listen.socket_path:
                _remove_stale_socket(self.listen.socket_path)
            _remove_stale_socket(self.state_dir.control_socket)
            if self.gateway is not None:
                # nbdfuse does not reconnect: rebuild the mounts and targets.
                self.gateway.reset()
            self.spawn()
            self.publish()
            if self.gateway is not None:
                self._sync_gateway()

    def _wait_nbdkit(self, timeout):
        """nbdkit's exit status, or None once timeout has passed or a
        signal came.  A signal caught after the look at nbdkit is still
        seen: its handler has written to the wakeup pipe."""
        status = self.proc.poll()
        if status is None:
            select.select([self._wakeup], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wakeup, 512):
                    pass
            status = self.proc.poll()
        return status

    def _kill(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            control.call(self.state_dir.control_socket, "prepare_stop",
                         reply_timeout=STOP_GRACE * 2)
        except (OSError, errors.Error) as e:
            self.say("could not commit maps before stopping: {}".format(e),
                     logging.ERROR)
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            # nbdkit waits for connected clients to disconnect.
            self.proc.kill()
            self.proc.wait()

    def _cleanup(self):
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.peer_server is not None:
            self.peer_server.stop()
            self.peer_server = None
        if self.gateway is not None:
            # Order: tgtd, then the nbdfuse mounts, then nbdkit.
            try:
                self.gateway.stop()
                self.say("iSCSI gateway stopped (tgtd, then nbdfuse mounts)")
            except Exception as e:
                self.say("error stopping the iSCSI gateway: {}".format(e))
            self.gateway = None
        if self.proc is not None and self.proc.poll() is None:
            self._kill()
            self.say("nbdkit stopped")
        else:
            self._kill()
        if self._pump is not None:
            self._pump.join(5)      # nbdkit's last lines, into the log
        if not self._acquired:
            return
        paths = [self.state_dir.serve_info_file, self.state_dir.control_socket,
                 self.state_dir.nbdkit_pid_file]
        if self.listen.socket_path:
            paths.append(self.listen.socket_path)
        if self.pidfile:
            paths.append(self.pidfile)
        if self.gateway_secret is not None:
            paths.append(self.gateway_secret[1])
        if not self._published:
            paths.remove(self.state_dir.serve_info_file)
        sockets = (self.state_dir.control_socket, self.listen.socket_path)
        for path in paths:
            try:
                if path in sockets and not fsutil.is_socket(path):
                    continue
                os.unlink(path)
            except (FileNotFoundError, errors.Error):
                pass  # gone, or no longer a socket: not ours to remove
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def serve_detached(server):
    """Run server as a daemon; return its info once it serves.

    The daemon reports readiness (or its error) through a pipe, so the
    command that started it exits 0 only when clients can connect.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _become_daemon(server, w)  # never returns
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    if not data:
        raise errors.ServerFailed(reason="the daemon exited before it was "
                                  "ready; see " + server.state_dir.serve_log_file)
    reply = json.loads(data)
    if not reply.get("ok"):
        raise errors.Reported(message=reply.get("error"))
    return reply["info"]


def _become_daemon(server, ready_w):
    status = 1
    try:
        server.state_dir.ensure()
        devnull = os.open(os.devnull, os.O_RDWR)
        logfd = os.open(server.state_dir.serve_log_file,
                        os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(devnull)
        os.close(logfd)
        server.out = sys.stderr
        server.detached = True

        def ready(info):
            os.write(ready_w, json.dumps({"ok": True, "info": info}).encode())
            os.close(ready_w)
            server.say("serving on {} (pid {})".format(
                info["socket"] or "{}:{}".format(info["bind"], info["port"]),
                info["pid"]))

        try:
            server.run(ready=ready)
            status = 0
        except Exception as e:
            msg = str(e) if isinstance(e, errors.Error) else repr(e)
            try:
                os.write(ready_w, json.dumps({"ok": False, "error": msg})
                         .encode())
                os.close(ready_w)
            except OSError:
                pass  # already reported ready: the error goes to the log
            server.say("error: " + msg)
    finally:
        os._exit(status)


def stop(state_dir, timeout=STOP_TIMEOUT, patience=LOCK_PATIENCE):
    """SIGTERM the server of state_dir and wait until it is gone.  A server
    still starting (the lock held, serve.json not written yet) is waited
    for as commands wait (_take_serve_lock), then stopped."""
    fd, info = _take_serve_lock(state_dir, patience)
    if fd is not None:
        os.close(fd)
        raise errors.ServerNotRunning(state_dir=state_dir.path)
    pid = info["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return info
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _lock_held(state_dir):
            return info
        time.sleep(0.05)
    raise errors.StopTimeout(pid=pid, timeout=timeout)


def sd_notify(*states):
    """Tell the service manager (systemd, Type=notify) about this process:
    one datagram of NAME=VALUE lines to the AF_UNIX socket named in
    $NOTIFY_SOCKET ('@' at its start: the abstract namespace); nothing
    without it.  This is all of sd_notify(3) that we need: python3-systemd
    would add a dependency for a dozen lines.  Returns whether it was
    sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(states).encode())
        return True
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"), e.strerror or e)
        return False


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


