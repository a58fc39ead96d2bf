"""Boot a Linux guest under QEMU (TCG) against `clonectl serve` and read
its verdict from the serial console.

Design notes
------------
- The guest is a Debian kernel and a busybox initramfs built once and
  cached outside the repository (guestimage.py).  /init is
  tests/guest/init.sh; it runs scripts/guest/host-check.sh, the same script
  the Vagrant host VM runs, and prints one "CLONECTL-GUEST PASS|FAIL" line
  on the serial console, then powers off.  The host does not trust that
  line alone: tests then check the LU's backing file with
  scripts/guest/target-check.sh (e2fsck -fn, debugfs cat of every file in
  the MANIFEST, the marker in the last MiB) and compare with the checksums
  the guest printed.
- Two attach modes: "disk" (QEMU's own NBD client backs a virtio disk:
  /dev/vda) and "nbd" (the guest kernel's nbd driver: /dev/nbd0 through
  nbd-client over QEMU user networking to clonectl serve --port on
  127.0.0.1, which the guest reaches as 10.0.2.2).
- KVM is deliberately not used (-accel tcg): this machine's /dev/kvm is a
  PVM backend QEMU cannot use, and CI machines may have none.  Everything
  in the guest is therefore small: 64 MiB LUs, 8 MiB fio regions, 1 s
  timed fio jobs.  The guest's speed is not measured; it is not a
  benchmark.
- Each boot has an overall timeout and an idle timeout (no console line
  for that long), so a stalled server fails in bounded time with the last
  step it reached.  QEMU is stopped by PID (SIGTERM, then SIGKILL); it runs
  with PR_SET_PDEATHSIG so a killed pytest takes it along.
- Deliberately ignored: guest performance numbers, multi-queue and
  multi-connection NBD, TLS, guest kernel versions other than the one
  linux-image-amd64 points at, and the guest's clock (it has no RTC sync).
"""

import io
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from target import procutil

from tests.support import guestimage

REPO = Path(__file__).resolve().parents[2]

QEMU = "qemu-system-x86_64"
GUEST_MEMORY_MB = 512
BOOT_TIMEOUT = 300.0      # a whole boot, generous: the 2 cores are shared
IDLE_TIMEOUT = 150.0      # no console line for this long = stalled

RESULT = re.compile(r"CLONECTL-GUEST (PASS|FAIL) (.*)")
MANIFEST = re.compile(r"CLONECTL-(?:CHECK|TARGET) MANIFEST ([0-9a-f]{32}) (\S+)")


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripts_cpio():
    """The per-run part of the initramfs: /init and our scripts."""
    buf = io.BytesIO()
    cpio = guestimage.Cpio(buf)
    cpio.file("init", (REPO / "tests" / "guest" / "init.sh").read_bytes(), 0o755)
    for sub in ("scripts/guest", "scripts/fio"):
        for path in sorted((REPO / sub).iterdir()):
            if path.is_file():
                guestimage.add_tree_file(cpio, path, "clonectl/" + sub + "/" +
                                         path.name)
    cpio.close()
    return buf.getvalue()


class BootResult:
    """What one boot ended with.

    .status: "PASS", "FAIL" (the guest said so), "TIMEOUT" (overall or
    idle), "EXIT" (QEMU ended without a verdict).  .message says why, for
    the assertion message; .console is the whole console text."""

    def __init__(self, status, message, console, seconds, lines):
        self.status = status
        self.message = message
        self.console = console
        self.seconds = seconds
        self.lines = lines

    @property
    def passed(self):
        return self.status == "PASS"

    def manifest(self):
        """{path: md5} the guest's host-check.sh printed."""
        return {m.group(2): m.group(1) for m in map(MANIFEST.search,
                                                     self.lines) if m}

    def steps(self):
        return [l.split("STEP ", 1)[1] for l in self.lines
                if "CLONECTL-CHECK STEP " in l]

    def __repr__(self):
        return "<BootResult {} in {:.1f} s: {}>".format(
            self.status, self.seconds, self.message)

    def explain(self):
        tail = "\n".join(self.lines[-40:])
        return "guest {}: {} ({:.0f} s)\n--- console tail:\n{}".format(
            self.status, self.message, self.seconds, tail)


class GuestVM:
    """One QEMU boot; use as a context manager or call stop()."""

    def __init__(self, guest, workdir, run, token, disks=(), nbd_port=None,
                 export=None, guard=None, kernel=None):
        self.guest = guest
        self.workdir = Path(workdir)
        self.run = run
        self.token = token
        self.disks = list(disks)
        self.nbd_port = nbd_port
        self.export = export
        self.guard = guard
        self.kernel = Path(kernel or guest.kernel())
        self.proc = None
        self.lines = []
        self._queue = queue.Queue()
        self.console_path = self.workdir / "console-{}.log".format(token)
        self.started = None
        self._stopped = False

    def command(self):
        append = ["console=ttyS0", "panic=-1", "loglevel=4", "nokaslr",
                  "mitigations=off", "clonectl.run=" + self.run,
                  "clonectl.token=" + self.token]
        if self.nbd_port:
            append.append("clonectl.port={}".format(self.nbd_port))
        if self.export:
            append.append("clonectl.export=" + self.export)
        cmd = [QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", "max",
               "-smp", "1", "-m", str(GUEST_MEMORY_MB),
               "-nodefaults", "-no-user-config", "-display", "none",
               "-no-reboot", "-monitor", "none",
               "-chardev", "stdio,id=console,signal=off",
               "-serial", "chardev:console",
               "-kernel", str(self.kernel), "-initrd", str(self.initrd),
               "-append", " ".join(append)]
        for disk in self.disks:
            cmd += ["-drive", disk.drive_option()]
        if self.run == "check-nbd":
            cmd += ["-netdev", "user,id=net0",
                    "-device", "virtio-net-pci,netdev=net0"]
        return cmd

    def start(self):
        self.initrd = self.workdir / "initrd-{}.cpio".format(self.token)
        self.guest.initrd_with(scripts_cpio(), self.initrd)
        self._console = open(self.console_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=procutil.die_with_parent)
        if self.guard is not None:
            self.guard.add(self.proc.pid)
        threading.Thread(target=self._read_console, daemon=True).start()
        return self

    def _read_console(self):
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            # The log file gets the seconds since QEMU started: where a
            # slow or stalled boot spent its time.
            self._console.write("[{:7.2f}] {}\n".format(
                time.monotonic() - self.started, line))
            self._console.flush()
            self._queue.put(line)
        self._queue.put(None)

    def send(self, line):
        """Type a line on the guest's serial console."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, pattern=RESULT, timeout=BOOT_TIMEOUT,
             idle_timeout=IDLE_TIMEOUT):
        """Read console lines until one matches pattern; return a
        BootResult: PASS/FAIL from a verdict line, "MATCH" for another
        pattern, TIMEOUT or EXIT otherwise."""
        if isinstance(pattern, str):
            pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        last_line = time.monotonic()
        while True:
            now = time.monotonic()
            if now > deadline:
                return self._result("TIMEOUT", "no verdict within {:.0f} s; "
                                    "last step: {}".format(timeout,
                                                           self._last_step()))
            if now - last_line > idle_timeout:
                return self._result("TIMEOUT", "no console output for "
                                    "{:.0f} s (stalled server?); last step: "
                                    "{}".format(idle_timeout,
                                                self._last_step()))
            try:
                line = self._queue.get(timeout=min(1.0, max(
                    0.01, deadline - now)))
            except queue.Empty:
                continue
            if line is None:
                status = self.proc.wait()
                return self._result("EXIT", "QEMU exited with status {} "
                                    "without a verdict; last step: {}".format(
                                        status, self._last_step()))
            last_line = time.monotonic()
            self.lines.append(line)
            m = pattern.search(line)
            if m:
                if pattern is RESULT:
                    message = m.group(2)
                    detail = self._check_failure_line()
                    if m.group(1) == "FAIL" and detail:
                        message += " -- " + detail
                    return self._result(m.group(1), message)
                return self._result("MATCH", line)

    def _check_failure_line(self):
        for line in reversed(self.lines):
            if "CLONECTL-CHECK FAIL" in line or "CLONECTL-ATTACH FAIL" in line:
                return line.strip()
        return None

    def _last_step(self):
        for line in reversed(self.lines):
            if "STEP " in line or "CLONECTL-GUEST BOOTED" in line:
                return line.strip()
        return "(none: the guest did not get to its script)"

    def _result(self, status, message):
        return BootResult(status, message, "\n".join(self.lines),
                          time.monotonic() - self.started, list(self.lines))

    def stop(self, timeout=20, term_grace=10):
        """Let QEMU finish powering off; else SIGTERM, then SIGKILL, by
        PID."""
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(term_grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self._console.close()
        try:
            self.initrd.unlink()
        except FileNotFoundError:
            pass

    def kill(self, grace=10):
        """Stop QEMU: a guest that gave its verdict is powering off and
        gets `grace` seconds to do so; otherwise (timed out, stalled) it
        is terminated at once."""
        verdict = any(RESULT.search(l) for l in self.lines)
        # QEMU drains in-flight requests on SIGTERM: with a stalled server
        # it never exits by itself.
        self.stop(timeout=grace if verdict else 0,
                  term_grace=10 if verdict else 3)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


class NbdDisk:
    """A -drive backed by QEMU's NBD client on a Unix socket."""

    def __init__(self, socket_path, export, read_only=False):
        self.socket_path = str(socket_path)
        self.export = export
        self.read_only = read_only

    def drive_option(self):
        if "," in self.socket_path:
            raise ValueError("QEMU options cannot hold a ',' in " +
                             self.socket_path)
        opt = ("if=virtio,format=raw,file.driver=nbd,file.server.type=unix,"
               "file.server.path={},file.export={}".format(
                   self.socket_path, self.export))
        if self.read_only:
            opt += ",readonly=on"
        return opt


def boot(guest, workdir, run, token, timeout=BOOT_TIMEOUT,
         idle_timeout=IDLE_TIMEOUT, **kwargs):
    """Boot once, wait for the verdict, stop QEMU; return the BootResult."""
    vm = GuestVM(guest, workdir, run, token, **kwargs)
    vm.start()
    try:
        result = vm.wait(timeout=timeout, idle_timeout=idle_timeout)
    finally:
        vm.kill()
    return result


def target_check(image, token):
    """Run scripts/guest/target-check.sh on a backing file: (ok, output,
    {path: md5})."""
    proc = subprocess.run(["sh", str(REPO / "scripts/guest/target-check.sh"),
                           str(image), token], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    manifest = {m.group(2): m.group(1) for m in map(MANIFEST.search,
                                                     out.splitlines()) if m}
    ok = proc.returncode == 0 and "CLONECTL-TARGET PASS" in proc.stdout
    return ok, out, manifest


LU_SIZE = "64M"


@pytest.fixture(scope="session")
def guest():
    """The cached guest (built on first use: downloads ~70 MB)."""
    if shutil.which(QEMU) is None:
        pytest.skip("{} is not installed (scripts/setup installs "
                    "qemu-system-x86)".format(QEMU))
    try:
        return guestimage.ensure_guest()
    except guestimage.GuestBuildError as e:
        pytest.fail("cannot build the guest: {}".format(e))
