"""How the CLI shows a running job: a clone's sync, reverse sync,
restore or verify, or a session's transfer (`--wait`, `clonectl wait`).

A job is shown as done/total bytes of this job (not how much of the clone
is in sync), a percentage, the rate and the time left:

    c1: sync  42.0%  1.2GiB of 2.9GiB  85.3MiB/s  1m 20s left

On a terminal one line is rewritten in place (carriage return) and never
wider than the terminal, so it never wraps; without one (a log, a pipe) a
line is printed every LOG_INTERVAL seconds and when the job ends, so a
short job writes a line or two.
"""

import shutil
import sys
import time

from . import units

# Seconds between lines when the output is not a terminal.
LOG_INTERVAL = 5.0
# Seconds between status polls.
POLL_INTERVAL = 0.5


class Job:
    """What one status poll says about a job, whatever its kind."""

    def __init__(self, name, kind, done, total, rate, eta, running,
                 state=None):
        self.name = name
        self.kind = kind
        self.done = done or 0
        self.total = total or 0
        self.rate = rate or 0
        self.eta = eta
        self.running = running
        self.state = state

    @property
    def percent(self):
        if not self.total:
            return 100.0 if not self.running else 0.0
        return min(100.0, 100.0 * self.done / self.total)

    def fields(self):
        """The parts of the line, most important first; line() drops
        from the end what does not fit."""
        if self.state and not self.running:
            # Ended: what the clone is now comes first.
            head = "{}: {}, {}".format(self.name, self.state, self.kind)
        else:
            head = "{}: {}".format(self.name, self.kind)
        out = [head, "{:5.1f}%".format(self.percent),
               "{} of {}".format(units.format_size(self.done), units.format_size(self.total))]
        if self.running:
            out.append("{}/s".format(units.format_size(self.rate)))
            out.append("{} left".format(units.format_duration(self.eta)))
        return out


def line(job, width=None):
    """The job's line, at most width characters (None: no limit)."""
    fields = job.fields()
    text = "  ".join(fields)
    while width is not None and len(text) > width and len(fields) > 1:
        fields.pop()
        text = "  ".join(fields)
    if width is not None and len(text) > width:
        text = text[:max(0, width - 1)] + ("~" if width else "")
    return text


def clone_job(st):
    """A Job from `clone_status`, or None if no operation was started."""
    op = st.get("operation")
    if not op:
        return None
    return Job(st["name"], op["operation"], op.get("bytes_done"),
               op.get("bytes_total"), op.get("rate"), op.get("eta"),
               bool(op.get("running")), st.get("state"))


def verify_job(st):
    """A Job from `clone_status` of a clone's verify, or None if none ran."""
    v = st.get("verify")
    if not v:
        return None
    return Job(st["name"], "verify", v.get("bytes_done"),
               v.get("bytes_total"), v.get("rate"), v.get("eta"),
               bool(v.get("running")))


def transfer_job(st):
    """A Job from `session_status`, or None if it never transferred."""
    tr = st.get("transfer")
    if not tr:
        return None
    return Job(st["name"], "transfer", tr.get("bytes_done"),
               tr.get("bytes_total"), tr.get("rate"), tr.get("eta"),
               bool(st.get("transferring")))


class Display:
    """Shows successive Jobs on out: rewritten in place on a terminal,
    else one line every LOG_INTERVAL seconds; finish() prints the last."""

    def __init__(self, out=None, tty=None, clock=time.monotonic):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.last_logged = None
        self.shown = False

    def _width(self):
        # One column less than the terminal: a line that fills the last
        # column makes some terminals wrap.
        return max(20, shutil.get_terminal_size().columns - 1)

    def update(self, job):
        if job is None:
            return
        if self.tty:
            width = self._width()
            self.out.write("\r" + line(job, width).ljust(width))
            self.out.flush()
            self.shown = True
        elif self.last_logged is None or \
                self.clock() - self.last_logged >= LOG_INTERVAL:
            self._print(job)

    def _print(self, job):
        self.out.write(line(job) + "\n")
        self.out.flush()
        self.last_logged = self.clock()

    def finish(self, job):
        """End the display with the job's final line."""
        if self.tty:
            if job is not None:
                width = self._width()
                self.out.write("\r" + line(job, width).ljust(width) + "\n")
            elif self.shown:
                self.out.write("\n")
            self.out.flush()
        elif job is not None:
            self._print(job)


def follow(fetch, job_of, running, out=None, sleep=time.sleep):
    """Poll fetch() until running(status) is false, showing job_of(status)
    on a Display; return the last status."""
    display = Display(out)
    while True:
        st = fetch()
        if not running(st):
            display.finish(job_of(st))
            return st
        display.update(job_of(st))
        sleep(POLL_INTERVAL)
