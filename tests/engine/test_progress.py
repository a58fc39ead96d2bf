"""Progress of a job: this job's bytes, not how much of a clone is in
sync; and a display that fits the terminal or logs sparingly."""

import io

from target import backends, clones, progress, units
from target.lu import LogicalUnit

GRAN = 4096
EXTENTS = 16
SIZE = GRAN * EXTENTS


def _group(tmp_path):
    src = backends.MemoryBackend(SIZE)
    lu = LogicalUnit("src", {"size": SIZE, "file": "-",
                                     "readonly": False}, backend=src)
    group = clones.CloneGroup(lu, GRAN, str(tmp_path))
    group.add_clone("c1", backends.MemoryBackend(SIZE))
    return lu, group


def _run(engine):
    while engine.step():
        pass
    assert engine.finish()


def test_incremental_sync_starts_at_zero_percent(tmp_path):
    lu, group = _group(tmp_path)
    _run(group.start_sync("c1", run=False))
    group.fracture("c1")
    lu.write(b"x" * GRAN, 5 * GRAN)          # 1 of 16 extents changed
    engine = group.start_sync("c1", run=False)
    job = progress.clone_job(group.clone_status(group.clones["c1"]))
    assert (job.done, job.total) == (0, GRAN)
    assert job.percent == 0.0
    assert "  0.0%" in progress.line(job)
    _run(engine)
    st = group.clone_status(group.clones["c1"])
    assert (st["operation"]["bytes_done"], st["operation"]["bytes_total"]) \
        == (GRAN, GRAN)


def test_host_writes_during_a_job_add_to_its_total(tmp_path):
    lu, group = _group(tmp_path)
    engine = group.start_sync("c1", run=False)
    assert engine.step()
    st = group.clone_status(group.clones["c1"])
    first = st["operation"]["bytes_total"]
    assert first == SIZE
    # A collision: the extent the engine copied is dirty again.
    group.clones["c1"].delta[0] = 1
    st = group.clone_status(group.clones["c1"])
    op = st["operation"]
    assert op["bytes_total"] == SIZE + GRAN
    assert op["bytes_done"] == op["bytes_copied"]


def test_line_fits_the_width():
    job = progress.Job("a-rather-long-clone-name", "reverse-sync",
                       3 << 30, 7 << 30, 90 << 20, 4000, True)
    full = progress.line(job)
    assert "3GiB of 7GiB" in full and "90MiB/s" in full
    assert "1h 06m left" in full
    for width in (20, 30, 45, 60, 80):
        assert len(progress.line(job, width)) <= width


def test_terminal_rewrites_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    out = io.StringIO()
    d = progress.Display(out, tty=True)
    job = progress.Job("c1", "sync", 1 << 20, 4 << 20, 1 << 20, 3, True)
    for _ in range(3):
        d.update(job)
    d.finish(progress.Job("c1", "sync", 4 << 20, 4 << 20, 0, None, False))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    parts = text[:-1].split("\r")[1:]
    assert len(parts) == 4
    assert all(len(p) <= 49 for p in parts), parts


def test_no_terminal_logs_every_few_seconds():
    now = [0.0]
    out = io.StringIO()
    d = progress.Display(out, tty=False, clock=lambda: now[0])
    job = progress.Job("c1", "sync", 1, 4, 1, 3, True)
    for _ in range(25):        # 12 s of polls every 0.5 s
        d.update(job)
        now[0] += 0.5
    d.finish(progress.Job("c1", "sync", 4, 4, 1, None, False))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines    # at 0, 5 and 10 s, and the last
    assert "100.0%" in lines[-1]


def test_units_and_durations():
    assert units.format_duration(45) == "45s"
    assert units.format_duration(185) == "3m 05s"
    assert units.format_duration(None) == "?"
