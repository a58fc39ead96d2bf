"""iSCSI gateway of `clonectl serve --iscsi-portal`: tgtd over nbdfuse over
our own NBD export.

Route: for each export (LU or fractured clone) the manager mounts our own
NBD export as one file with `nbdfuse` (run/iscsi/mnt/NAME/disk) and a private
`tgtd` (userspace iSCSI target of the `tgt` package, no kernel modules)
serves that file as LUN 1 of target `<prefix><NAME>`.  Every iSCSI read and
write therefore goes through nbdkit and the plugin: one data path, with the
same mirroring, copy on demand and copy on first write as NBD hosts get.
SYNCHRONIZE CACHE and FUA writes become fdatasync in tgtd's rdwr backing
store, which nbdfuse turns into an NBD flush, so flushed writes survive a
kill -9 of nbdkit like they do over NBD.

tgtd opens the FUSE file with O_DIRECT (`--bsoflags direct`): without it
the kernel keeps the file's pages cached for as long as tgtd holds it open,
and a change made on the NBD side (a protected restore, a clone engine, an
NBD host) stays invisible to iSCSI readers (measured: stale bytes after a
restore).  nbdfuse has no direct_io option; O_DIRECT on the open is
coherent and every write reaches nbdkit before tgtd acknowledges it.

Private instance: tgtd's control socket is /var/run/tgtd/socket.N for
`-C N`; we pick an N nobody answers on and talk to it with `tgtadm -C N`.
tgtd ignores SIGTERM while targets exist, so stopping deletes every target
(--force) and then the system.  Stop order: tgtd, then the mounts
(fusermount3 -u), then the manager stops nbdkit.

Everything started is recorded in run/iscsi.json (tgtd pid, command line
and control port; every mount point and nbdfuse pid).  After a crash the
next `clonectl serve` cleans up exactly what that record names: a process
only if its /proc command line is still the recorded one, a mount only if
/proc/self/mountinfo lists the recorded mount point.  Nothing is found by
name patterns.

The gateway's route: nbdfuse opens the export as
`GATEWAY_PREFIX + SECRET + ":" + NAME`.  The manager makes SECRET at each
server start (secrets.token_hex) and hands it to nbdkit in run/gateway.secret
(mode 0600; plugin parameter gateway_secret=FILE, so not on nbdkit's command
line); any other gateway name is an unknown export, and list_exports never
names one (target.Target.connect).  The connection passes the same checks
as a host's (a secondary's volume is read-only and readable only while
consistent; read-only LUs) but is counted apart (`gateway_connections` in
status): clone sync, restore and reverse sync are not refused because of
it, the manager removes the iSCSI target within a poll interval once the
clone is no longer exported (a gap: an initiator writing during that
interval writes through the clone's export object; see docs/known-gaps.md),
and `clone remove` first withdraws the export and waits for the gateway to
let go (gateway.GatewayRoute.withdraw).  nbdfuse 1.14 takes the export
name only inside its URI argument, so SECRET is on nbdfuse's command line
(and in run/iscsi.json, mode 0600): a local user who can read other users'
/proc/PID/cmdline and reach the NBD socket can still use the route.

CHAP (`--iscsi-chap USER:SECRETFILE`, and `--iscsi-chap-mutual` for the
target's own account): tgtd accounts made at each tgtd start and bound to
every target; the secret files must be mode 0600 (no group or other bits)
and are read by the manager; the secrets are in no record or log.

Deliberately ignored: session frozen exports (`SRC@NAME`, '@' is not an IQN
character and they are for backup tools); discovery (SendTargets) CHAP:
target names are not secret; multiple LUNs per target;
iSER; persistent reservations (tgtd keeps them in memory only); names are
used verbatim in the IQN (tgtd and libiscsi accept upper case and '_').
When nbdkit restarts, every iSCSI target is deleted and rebuilt on fresh
mounts (nbdfuse does not reconnect): initiators see their session dropped
and log in again.
"""

import errno
import json
import os
import secrets
import signal
import socket
import subprocess
import time

from . import errors, fsutil, procutil

GATEWAY_PREFIX = "iscsi-gateway:"
SECRET_FILE = "gateway.secret"  # in run/
DEFAULT_IQN_PREFIX = "iqn.2026-11.org.clonectl:"
LUN = 1
TGTD_CONTROL_DIR = "/var/run/tgtd"
CONTROL_PORT_FIRST = 2000  # + pid % 20000, scanned upwards; tgtd takes <= 32767
READY_TIMEOUT = 15.0
LOOPBACK = ("127.0.0.1", "::1")

# tgtd allocates each command's data buffer (the whole transfer: 1 MiB for a
# 1 MiB read) and frees it once the response is sent.  With glibc's
# defaults the freed top of the heap goes back to the kernel (trim) and the
# next command faults in fresh pages, which the kernel zeroes and charges:
# about 40% of tgtd's CPU time on 1 MiB reads (docs/performance.md).  With
# these tgtd keeps up to 64 MiB of freed heap for the next commands, and
# only requests above 4 MiB get their own mapping.
TGTD_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=4194304:"
                        "glibc.malloc.trim_threshold=67108864")


def tgtd_environment(environ):
    """tgtd's environment: environ with TGTD_MALLOC_TUNABLES, any tunable
    the operator set in GLIBC_TUNABLES coming after ours (so it wins)."""
    env = dict(environ)
    own = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = TGTD_MALLOC_TUNABLES + (":" + own if own else "")
    return env


def gateway_route(name):
    """What follows the gateway's prefix in export name ("SECRET:NAME"), or
    None for a host's export name: the format is this module's alone."""
    if not name.startswith(GATEWAY_PREFIX):
        return None
    return name[len(GATEWAY_PREFIX):]


class IscsiFailed(errors.Error):
    msg = "iSCSI gateway: {reason}"
    errno = errno.EIO


def parse_portal(text):
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or \
            not 0 < int(port) < 65536:
        raise errors.InvalidArgument(
            reason="invalid iSCSI portal {!r}: use ADDR:PORT".format(text))
    return host, int(port)


def parse_allow(values):
    """--iscsi-allow [EXPORT=]IQN... -> {export or None: [iqn, ...]}"""
    out = {}
    for v in values:
        name, sep, iqn = v.rpartition("=")
        if not iqn.startswith(("iqn.", "eui.", "naa.")):
            raise errors.InvalidArgument(
                reason="invalid --iscsi-allow {!r}: use [EXPORT=]IQN with an "
                       "iqn./eui./naa. name".format(v))
        out.setdefault(name or None, []).append(iqn)
    return out


# RFC 3720 (8.2.1): CHAP secrets are to be at least 96 bits.
CHAP_SECRET_MIN = 12
CHAP_SECRET_MAX = 255


def parse_chap(value, option):
    """--iscsi-chap USER:SECRETFILE -> (user, path), the file checked."""
    user, sep, path = str(value).partition(":")
    if not sep or not user or not path:
        raise errors.InvalidArgument(
            reason="invalid {} {!r}: use USER:SECRETFILE".format(
                option, value))
    if not user.isprintable() or any(c.isspace() for c in user) or \
            len(user) > 255:
        raise errors.InvalidArgument(
            reason="invalid {} user {!r}: 1-255 printable characters without "
            "spaces".format(option, user))
    path = os.path.abspath(path)
    read_chap_secret(path, option)
    return user, path


def read_chap_secret(path, option="--iscsi-chap"):
    """The CHAP secret in path (one line); refused unless only its owner
    can read it: a secret others can read is no secret."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.InvalidArgument(reason="{} secret file {}: {}".format(
            option, path, e.strerror))
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise errors.InvalidArgument(
                reason="{} secret file {} is mode {:04o}: others may read it; "
                "make it 0600 (chmod 600 {})".format(
                    option, path, st.st_mode & 0o7777, path))
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(CHAP_SECRET_MAX + 2)
    finally:
        os.close(fd)
    secret = raw.decode("utf-8", "replace").rstrip("\r\n")
    if not CHAP_SECRET_MIN <= len(secret) <= CHAP_SECRET_MAX or \
            not secret.isprintable() or any(c.isspace() for c in secret):
        raise errors.InvalidArgument(
            reason="{} secret file {} must hold one line of {}-{} printable "
            "characters without spaces".format(
                option, path, CHAP_SECRET_MIN, CHAP_SECRET_MAX))
    return secret


def make_secret(run_dir):
    """A new secret for the gateway's route, written to run/SECRET_FILE
    (mode 0600); return (secret, path)."""
    secret = secrets.token_hex(16)
    path = os.path.join(run_dir, SECRET_FILE)
    fsutil.write_atomic(path, (secret + "\n").encode(), mode=0o600)
    return secret, path


def read_secret(path):
    with open(path) as f:
        secret = f.read().strip()
    if len(secret) < 32:
        raise errors.InvalidArgument(
            reason="{} holds no gateway secret".format(path))
    return secret


def _cmdline(pid):
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return None


def _alive(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _mounted(path):
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if line.split()[4].replace("\\040", " ") == path:
                    return True
    except OSError:
        pass
    return False


def _unmount(path):
    if not _mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True)
    if r.returncode != 0 and _mounted(path):
        # Busy (a dead nbdfuse, or tgtd still has the file open): detach.
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


def _kill_recorded(pid, cmdline, sig=signal.SIGTERM, wait=5.0):
    """Signal pid only if it still runs the recorded command line."""
    if not pid or not _alive(pid):
        return
    if cmdline is not None and _cmdline(pid) != [c.encode() for c in cmdline]:
        return  # the pid was reused by something else: not ours
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _control_answers(port):
    path = os.path.join(TGTD_CONTROL_DIR, "socket.{}".format(port))
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def cleanup_stale(record_path, say=None):
    """Undo what a crashed server recorded in run/iscsi.json, then drop it."""
    try:
        with open(record_path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return
    except ValueError:
        rec = {}
    tgtd = rec.get("tgtd") or {}
    if tgtd.get("pid") and _alive(tgtd["pid"]) and \
            _cmdline(tgtd["pid"]) == [c.encode() for c in tgtd["cmdline"]]:
        if say:
            say("stopping stale tgtd pid {}".format(tgtd["pid"]))
        _kill_recorded(tgtd["pid"], tgtd["cmdline"], signal.SIGKILL)
    for name, m in sorted((rec.get("mounts") or {}).items()):
        _kill_recorded(m.get("pid"), m.get("cmdline"))
        if m.get("mountpoint") and _mounted(m["mountpoint"]):
            if say:
                say("unmounting stale {}".format(m["mountpoint"]))
            _unmount(m["mountpoint"])
    if tgtd.get("control_port") is not None and \
            not _control_answers(tgtd["control_port"]):
        _remove_control_files(tgtd["control_port"])
    os.unlink(record_path)


def _remove_control_files(port):
    for suffix in ("", ".lock"):
        try:
            os.unlink(os.path.join(TGTD_CONTROL_DIR,
                                   "socket.{}{}".format(port, suffix)))
        except FileNotFoundError:
            pass


class Gateway:
    """One private tgtd and one nbdfuse mount per exported name."""

    def __init__(self, run_dir, nbd_uri, portal, secret, iqn_prefix=None,
                 allow=None, log_path=None, preexec_fn=None, say=None,
                 chap=None, chap_mutual=None):
        self.run_dir = run_dir
        self.base = os.path.join(run_dir, "iscsi")
        self.record_path = os.path.join(run_dir, "iscsi.json")
        self.nbd_uri = nbd_uri  # function: export name -> NBD URI
        self.secret = secret  # of the route (module notes)
        self.portal = portal
        self.iqn_prefix = iqn_prefix or DEFAULT_IQN_PREFIX
        self.allow = allow or {}
        self.log_path = log_path or os.devnull
        self.preexec_fn = preexec_fn
        self.say = say or (lambda msg: None)
        self.tgtd = None
        self.control_port = None
        self.tgtd_cmd = None
        # CHAP accounts: (user, secret file); the secrets are read when
        # tgtd starts and given to it only (see _chap_accounts).
        self.chap = chap
        self.chap_mutual = chap_mutual
        self._secrets = ()      # what tgtadm error messages must not show
        self.targets = {}  # name -> {"tid", "iqn", "readonly", "mountpoint", proc}
        self._next_tid = 1

    # ------------------------------------------------------------ records

    def _save(self):
        rec = {"tgtd": None, "mounts": {}}
        if self.tgtd is not None:
            rec["tgtd"] = {"pid": self.tgtd.pid, "cmdline": self.tgtd_cmd,
                           "control_port": self.control_port}
        for name, t in self.targets.items():
            rec["mounts"][name] = {
                "mountpoint": t["mountpoint"], "pid": t["proc"].pid,
                "cmdline": t["cmd"], "tid": t["tid"], "iqn": t["iqn"],
                "readonly": t["readonly"]}
        rec["portal"] = "{}:{}".format(*self.portal)
        fsutil.write_json_atomic(self.record_path, rec)

    def iqn(self, name):
        return self.iqn_prefix + name

    # ------------------------------------------------------------ tgtd

    def tgtadm(self, *args, check=True):
        cmd = ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi"]
        cmd += [str(a) for a in args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=30)
        except subprocess.TimeoutExpired:
            raise IscsiFailed(reason="{} did not answer within 30 s".format(
                " ".join(cmd)))
        if check and r.returncode != 0:
            shown = " ".join(cmd)
            for secret in self._secrets:
                shown = shown.replace(secret, "********")
            raise IscsiFailed(reason="{} failed: {}".format(
                shown, (r.stderr or r.stdout).strip()))
        return r.stdout

    def _chap_accounts(self):
        """Create tgtd's CHAP accounts (after each tgtd start).

        tgtadm takes the password only on its command line; tgtadm runs
        for milliseconds, as the user serving (root for tgtd), and
        /proc/PID/cmdline of a root process is readable by local users
        for that moment unless /proc is mounted with hidepid=2: on a
        host with untrusted local users, mount /proc so."""
        accounts = [a for a in (self.chap, self.chap_mutual) if a]
        if not accounts:
            return
        secrets_read = []
        for user, path in accounts:
            secrets_read.append((user, read_chap_secret(path)))
        self._secrets = tuple(s for _, s in secrets_read)
        for user, secret in secrets_read:
            self.tgtadm("--mode", "account", "--op", "new", "--user", user,
                        "--password", secret)

    def _bind_chap(self, tid):
        if self.chap:
            self.tgtadm("--mode", "account", "--op", "bind", "--tid", tid,
                        "--user", self.chap[0])
        if self.chap_mutual:
            self.tgtadm("--mode", "account", "--op", "bind", "--tid", tid,
                        "--user", self.chap_mutual[0], "--outgoing")

    def start(self):
        os.makedirs(os.path.join(self.base, "mnt"), exist_ok=True)
        port = CONTROL_PORT_FIRST + os.getpid() % 20000
        for attempt in range(20):
            while _control_answers(port):
                port += 1
            self.control_port = port
            self.tgtd_cmd = ["tgtd", "-f", "-C", str(port), "--iscsi",
                             "portal={}:{}".format(*self.portal)]
            log = procutil.log_writer(self.log_path, "tgtd")
            try:
                self.tgtd = subprocess.Popen(
                    self.tgtd_cmd, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, close_fds=True, preexec_fn=self.preexec_fn,
                    env=tgtd_environment(os.environ))
            finally:
                log.close()
            self._save()
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if self.tgtd.poll() is not None:
                    break
                r = subprocess.run(["tgtadm", "-C", str(port), "--op", "show",
                                    "--mode", "sys"], capture_output=True)
                if r.returncode == 0:
                    if self._portal_listens():
                        self._chap_accounts()
                        return
                time.sleep(0.05)
            if self.tgtd.poll() is None:
                self.tgtd.kill()
                self.tgtd.wait()
            self.tgtd = None
            self._save()
            if self._portal_listens():
                raise IscsiFailed(reason="portal {}:{} is in use".format(
                    *self.portal))
            port += 1
        raise IscsiFailed(reason="tgtd did not start; see " + self.log_path)

    def _portal_listens(self):
        try:
            with socket.create_connection(self.portal, timeout=1):
                return True
        except OSError:
            return False

    # ------------------------------------------------------------ targets

    def sync(self, exports):
        """exports: {name: readonly}; add and remove targets to match."""
        if self.tgtd is None or self.tgtd.poll() is not None:
            # tgtd died (its targets with it): rebuild everything.
            self.say("tgtd died (status {}); restarting it".format(
                None if self.tgtd is None else self.tgtd.returncode))
            self.tgtd = None
            self.reset()
            _remove_control_files(self.control_port)
            self.start()
        for name in [n for n in self.targets if n not in exports]:
            self.remove(name)
        for name, readonly in sorted(exports.items()):
            t = self.targets.get(name)
            if t is not None and t["readonly"] != readonly:
                self.remove(name)
                t = None
            if t is None:
                try:
                    self.add(name, readonly)
                except IscsiFailed as e:
                    self.say("cannot export {} over iSCSI: {}".format(name, e))

    def add(self, name, readonly):
        mountpoint = os.path.join(self.base, "mnt", name)
        os.makedirs(mountpoint, exist_ok=True)
        pidfile = os.path.join(self.base, name + ".nbdfuse.pid")
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        cmd = ["nbdfuse", "-P", pidfile]
        if readonly:
            cmd.append("-r")
        cmd += [os.path.join(mountpoint, "disk"),
                self.nbd_uri(GATEWAY_PREFIX + self.secret + ":" + name)]
        log = procutil.log_writer(self.log_path, "nbdfuse")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, close_fds=True,
                                    preexec_fn=self.preexec_fn)
        finally:
            log.close()
        tid = self._next_tid
        self._next_tid += 1
        t = {"tid": tid, "iqn": self.iqn(name), "readonly": readonly,
             "mountpoint": mountpoint, "proc": proc, "cmd": cmd}
        self.targets[name] = t
        self._save()
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(pidfile):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.remove(name)
                raise IscsiFailed(reason="nbdfuse for {} did not mount "
                                  "(status {})".format(name, proc.poll()))
            time.sleep(0.02)
        try:
            self.tgtadm("--op", "new", "--mode", "target", "--tid", tid,
                        "--targetname", t["iqn"])
            self.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", tid,
                        "--lun", LUN, "--bsoflags", "direct",
                        "--backing-store", os.path.join(mountpoint, "disk"))
            if readonly:
                self.tgtadm("--op", "update", "--mode", "logicalunit",
                            "--tid", tid, "--lun", LUN,
                            "--params", "readonly=1")
            self._bind_chap(tid)
            names = self.allow.get(name, []) + self.allow.get(None, [])
            if names:
                for iqn in names:
                    self.tgtadm("--op", "bind", "--mode", "target", "--tid",
                                tid, "--initiator-name", iqn)
            else:
                for addr in LOOPBACK:
                    self.tgtadm("--op", "bind", "--mode", "target", "--tid",
                                tid, "--initiator-address", addr)
        except IscsiFailed:
            self.remove(name)
            raise
        self.say("iSCSI target {} (LUN {}{})".format(
            t["iqn"], LUN, ", read-only" if readonly else ""))

    def remove(self, name):
        t = self.targets.get(name)
        if t is None:
            return
        if self.tgtd is not None and self.tgtd.poll() is None:
            self.tgtadm("--op", "delete", "--mode", "target", "--tid",
                        t["tid"], "--force", check=False)
        _unmount(t["mountpoint"])
        proc = t["proc"]
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        del self.targets[name]
        self._save()

    def reset(self):
        """Drop every target and mount (after nbdkit restarted)."""
        for name in list(self.targets):
            self.remove(name)

    def stop(self):
        """Stop tgtd, then unmount; the caller stops nbdkit afterwards."""
        if self.tgtd is not None:
            if self.tgtd.poll() is None:
                for t in self.targets.values():
                    self.tgtadm("--op", "delete", "--mode", "target", "--tid",
                                t["tid"], "--force", check=False)
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                try:
                    self.tgtd.wait(10)
                except subprocess.TimeoutExpired:
                    self.tgtd.kill()
                    self.tgtd.wait()
            if not _control_answers(self.control_port):
                _remove_control_files(self.control_port)
        self.tgtd = None
        self.reset()
        try:
            os.unlink(self.record_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ status

    def status(self):
        return show_status(self.control_port)


def show_status(control_port):
    """{iqn: {"tid", "sessions": [{"initiator", "address"}]}} from tgtadm."""
    try:
        r = subprocess.run(["tgtadm", "-C", str(control_port), "--lld",
                            "iscsi", "--op", "show", "--mode", "target"],
                           capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    out = {}
    cur = None
    nexus = None
    for line in r.stdout.splitlines():
        s = line.strip()
        if line.startswith("Target "):
            tid, _, iqn = line[len("Target "):].partition(": ")
            cur = out[iqn] = {"tid": int(tid), "sessions": []}
        elif cur is not None and s.startswith("I_T nexus: "):
            nexus = {"initiator": None, "address": None}
            cur["sessions"].append(nexus)
        elif cur is not None and nexus is not None and \
                s.startswith("Initiator: "):
            nexus["initiator"] = s[len("Initiator: "):].split(" alias:")[0]
        elif cur is not None and nexus is not None and s.startswith("IP Address: "):
            nexus["address"] = s[len("IP Address: "):]
        elif s.startswith("LUN information"):
            nexus = None
    return out
