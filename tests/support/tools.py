"""Helpers that drive outside tools (qemu-io) and read whole exports."""

import subprocess

import pytest

MiB = 1 << 20


def run(*cmd, check=True, timeout=60, **kwargs):
    """Run cmd; with check, a non-zero exit fails the test showing its
    output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True,
                          text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail("{} exited with {}\nstdout:\n{}\nstderr:\n{}".format(
            " ".join(map(str, cmd)), proc.returncode, proc.stdout,
            proc.stderr))
    return proc


def qemu_io(uri, *commands, check=True):
    """qemu-io -f raw -c COMMAND... URI.  With check, a non-zero exit or a
    failed command fails the test: qemu-io reports a read whose pattern
    does not match ("Pattern verification failed") with exit status 0."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = run(*args, uri, check=check)
    if check:
        out = proc.stdout + proc.stderr
        assert "failed" not in out.lower(), out
    return proc


class QemuIoSession:
    """An interactive qemu-io: one initiator that stays logged in."""

    def __init__(self, url, guard):
        # stdbuf: qemu-io's stdout is a pipe, block-buffered otherwise.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "-eL", "qemu-io", "-f", "raw", url], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1)
        guard.add(self.proc.pid)

    def command(self, cmd):
        """Run a read or write command; return its output.  The last line
        of one is the statistics line (" ops; "), or an error."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = []
        for line in self.proc.stdout:
            out.append(line)
            if " ops; " in line or ("Pattern verification" not in line and
                                    ("error" in line or "failed" in line)):
                return "".join(out)
        pytest.fail("qemu-io exited:\n" + "".join(out))

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_all(uri):
    """Every byte of the export at uri, through libnbd."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(32 * MiB, size - off), off)
                        for off in range(0, size, 32 * MiB))
    finally:
        h.shutdown()
