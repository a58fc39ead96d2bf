"""target.backends: FileBackend against real files, MemoryBackend, and the
two compared under random operations."""

import errno
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from target import backends

KiB = 1 << 10
MiB = 1 << 20


def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def _read(b, offset, length):
    buf = bytearray(length)
    b.readinto(buf, offset)
    return bytes(buf)


def _check_extents_cover(extents, offset, length):
    pos = offset
    for off, n, _ in extents:
        assert off == pos, extents
        assert n > 0, extents
        pos += n
    assert pos == offset + length, extents


@pytest.fixture
def fb(tmp_path):
    b = backends.FileBackend(_sparse(tmp_path / "lu.img", 4 * MiB))
    yield b
    b.close()


# ---------------------------------------------------------------- FileBackend

def test_file_backend_size_and_fresh_zeroes(fb):
    assert fb.size == 4 * MiB
    assert fb.readonly is False
    assert _read(fb, 0, 64 * KiB) == bytes(64 * KiB)
    assert _read(fb, 4 * MiB - 1, 1) == b"\0"


@pytest.mark.parametrize("offset, length", [
    (0, 1), (1, 511), (511, 2), (4095, 4097), (MiB - 3, 4 * KiB + 7),
    (4 * MiB - 512, 512), (12345, 65536),
])
def test_file_backend_write_read_any_alignment(fb, offset, length):
    data = os.urandom(length)
    fb.write(data, offset)
    assert _read(fb, offset, length) == data
    # Bytes around the write are untouched.
    if offset:
        assert _read(fb, offset - 1, 1) == b"\0"
    if offset + length < fb.size:
        assert _read(fb, offset + length, 1) == b"\0"
    with open(fb.path, "rb") as f:
        f.seek(offset)
        assert f.read(length) == data


def test_file_backend_accepts_buffer_types(fb):
    fb.write(memoryview(b"abcd"), 10)
    fb.write(bytearray(b"efgh"), 14)
    buf = bytearray(8)
    fb.readinto(memoryview(buf), 10)
    assert bytes(buf) == b"abcdefgh"


def test_file_backend_flush_syncs_its_own_file(fb, monkeypatch):
    """flush() is an fdatasync (or fsync) of the LU's file: the data on
    disk is only as durable as that call (tests/system/core/
    test_flush_durability.py sees it survive a power cut)."""
    synced = []
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real: (
            synced.append(os.fstat(fd).st_ino), real(fd))[1])
    fb.write(b"x" * 512, 0)
    assert synced == [], "a write is not a flush"
    fb.flush()
    assert synced == [os.stat(fb.path).st_ino]
    with open(fb.path, "rb") as f:
        assert f.read(512) == b"x" * 512


def test_file_backend_trim_punches_hole(fb):
    fb.write(b"\xaa" * (256 * KiB), 0)
    fb.trim(64 * KiB, 128 * KiB)
    assert _read(fb, 0, 64 * KiB) == b"\xaa" * (64 * KiB)
    assert _read(fb, 64 * KiB, 128 * KiB) == bytes(128 * KiB)
    assert _read(fb, 192 * KiB, 64 * KiB) == b"\xaa" * (64 * KiB)
    ext = fb.extents(0, 256 * KiB)
    _check_extents_cover(ext, 0, 256 * KiB)
    assert (64 * KiB, 128 * KiB, True) in ext
    assert os.path.getsize(fb.path) == 4 * MiB, "trim must keep the size"


def test_file_backend_unaligned_trim_keeps_neighbours(fb):
    fb.write(b"\x55" * 8192, 0)
    fb.trim(100, 1000)
    data = _read(fb, 0, 8192)
    assert data[:100] == b"\x55" * 100
    assert data[1100:] == b"\x55" * (8192 - 1100)
    # Trimmed bytes read as zero or as the old data, nothing else.
    assert set(data[100:1100]) <= {0, 0x55}


@pytest.mark.parametrize("may_trim", [False, True])
@pytest.mark.parametrize("offset, length", [(0, 4096), (1, 1000),
                                            (4000, 300000)])
def test_file_backend_zero(fb, may_trim, offset, length):
    fb.write(b"\xff" * (512 * KiB), 0)
    fb.zero(offset, length, may_trim=may_trim)
    data = _read(fb, 0, 512 * KiB)
    assert data[:offset] == b"\xff" * offset
    assert data[offset:offset + length] == bytes(length)
    assert data[offset + length:] == b"\xff" * (512 * KiB - offset - length)
    assert os.path.getsize(fb.path) == 4 * MiB


def test_file_backend_zero_with_may_trim_leaves_a_hole(fb):
    """What every copy writes for a hole: the file stays sparse there."""
    fb.write(os.urandom(MiB), 0)
    fb.flush()
    before = os.stat(fb.path).st_blocks * 512
    fb.zero(256 * KiB, 512 * KiB, may_trim=True)
    assert _read(fb, 256 * KiB, 512 * KiB) == bytes(512 * KiB)
    assert os.stat(fb.path).st_blocks * 512 <= before - 512 * KiB
    assert fb.extents(0, MiB) == [(0, 256 * KiB, False),
                                  (256 * KiB, 512 * KiB, True),
                                  (768 * KiB, 256 * KiB, False)]


def test_file_backend_extents_of_sparse_file(fb):
    _check_extents_cover(fb.extents(0, fb.size), 0, fb.size)
    assert fb.extents(0, fb.size) == [(0, fb.size, True)]
    fb.write(b"d" * 4096, MiB)
    fb.write(b"d" * 8192, 3 * MiB)
    ext = fb.extents(0, fb.size)
    _check_extents_cover(ext, 0, fb.size)
    assert ext == [(0, MiB, True), (MiB, 4096, False),
                   (MiB + 4096, 2 * MiB - 4096, True),
                   (3 * MiB, 8192, False),
                   (3 * MiB + 8192, MiB - 8192, True)]
    # A sub-range starting inside data and ending inside a hole.
    sub = fb.extents(MiB + 1024, 8192)
    assert sub == [(MiB + 1024, 3072, False), (MiB + 4096, 5120, True)]
    # A range entirely inside a hole, and one at the very end.
    assert fb.extents(2 * MiB, 4096) == [(2 * MiB, 4096, True)]
    assert fb.extents(4 * MiB - 512, 512) == [(4 * MiB - 512, 512, True)]


def test_file_backend_extents_fully_allocated(tmp_path):
    path = tmp_path / "full.img"
    path.write_bytes(os.urandom(64 * KiB))
    with backends.FileBackend(str(path)) as b:
        assert b.extents(0, 64 * KiB) == [(0, 64 * KiB, False)]
        assert b.extents(4096, 100) == [(4096, 100, False)]


def test_file_backend_read_only(tmp_path):
    path = _sparse(tmp_path / "ro.img", MiB)
    with backends.FileBackend(path, readonly=True) as b:
        assert b.readonly
        assert _read(b, 0, 512) == bytes(512)
        with pytest.raises(OSError) as info:
            b.write(b"x", 0)
        assert info.value.errno == errno.EBADF
    assert open(path, "rb").read() == bytes(MiB)


def test_file_backend_short_read_is_eio(tmp_path):
    path = tmp_path / "shrinks.img"
    path.write_bytes(b"y" * 8192)
    with backends.FileBackend(str(path)) as b:
        os.truncate(path, 4096)
        with pytest.raises(OSError) as info:
            _read(b, 0, 8192)
        assert info.value.errno == errno.EIO
        assert str(path) in str(info.value)


def test_file_backend_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        backends.FileBackend(str(tmp_path / "nope"))


def test_file_backend_reopens_its_own_file_not_what_its_path_names_now(
        tmp_path):
    """A second descriptor (the replicated primary flushes volumes through
    one): the path may name another file since the first opening."""
    path = tmp_path / "vol.img"
    path.write_bytes(bytes(8192))
    b = backends.FileBackend(str(path), owner="LU vol")
    try:
        (tmp_path / "other.img").write_bytes(bytes(8192))
        os.replace(tmp_path / "other.img", path)
        again = b.reopen()
        try:
            again.write(b"\x01" * 4096, 0)
            again.flush()
            got = bytearray(4096)
            b.readinto(got, 0)
            assert got == b"\x01" * 4096, "the reopened backend wrote " \
                "the file that now has the path"
            assert again.path == b.path
        finally:
            again.close()
    finally:
        b.close()
    assert path.read_bytes() == bytes(8192)


def test_file_backend_close_is_idempotent(tmp_path):
    b = backends.FileBackend(_sparse(tmp_path / "f", 4096))
    fd = b.fd
    b.close()
    b.close()
    assert b.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


# tmpfs has punch hole but no FALLOC_FL_ZERO_RANGE: the fallback paths.

@pytest.fixture
def shm_backend():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="clonectl-test-")
    os.ftruncate(fd, MiB)
    os.close(fd)
    b = backends.FileBackend(path)
    yield b
    b.close()
    os.unlink(path)


def test_zero_without_zero_range_falls_back_to_writing(shm_backend):
    b = shm_backend
    b.write(b"\x11" * 65536, 0)
    b.zero(1000, 5000)
    data = _read(b, 0, 65536)
    assert data[:1000] == b"\x11" * 1000
    assert data[1000:6000] == bytes(5000)
    assert data[6000:] == b"\x11" * (65536 - 6000)


def test_fast_zero_fails_cleanly_or_zeroes(shm_backend):
    b = shm_backend
    b.write(b"\x22" * 65536, 0)
    try:
        b.zero(4096, 8192, fast=True)
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP
        # A refused fast zero changes nothing.
        assert _read(b, 0, 65536) == b"\x22" * 65536
    else:
        data = _read(b, 0, 65536)
        assert data[4096:12288] == bytes(8192)
        assert data[:4096] == b"\x22" * 4096


def test_fast_zero_with_may_trim_punches(shm_backend):
    b = shm_backend
    b.write(b"\x33" * 65536, 0)
    b.zero(4096, 8192, may_trim=True, fast=True)
    data = _read(b, 0, 65536)
    assert data[4096:12288] == bytes(8192)
    assert data[:4096] == b"\x33" * 4096
    assert data[12288:] == b"\x33" * (65536 - 12288)


# ---------------------------------------------------------------- MemoryBackend

def test_memory_backend_basics():
    m = backends.MemoryBackend(8192)
    assert m.size == 8192
    assert _read(m, 0, 8192) == bytes(8192)
    m.write(b"hello", 4090)
    assert _read(m, 4088, 10) == b"\0\0hello\0\0\0"
    m.zero(4091, 2)
    assert _read(m, 4090, 5) == b"h\0\0lo"
    m.trim(0, 8192)  # advisory no-op
    assert _read(m, 4090, 5) == b"h\0\0lo"
    m.flush()
    m.flush()
    assert m.flushes == 2
    # Its zero blocks are holes.
    assert m.extents(0, 8192) == [(0, 4096, False), (4096, 4096, True)]
    with m:
        pass


def test_memory_backend_copies_written_buffer():
    m = backends.MemoryBackend(16)
    buf = bytearray(b"abcd")
    m.write(memoryview(buf), 0)
    buf[:] = b"zzzz"  # nbdkit reuses its buffers after pwrite returns
    assert _read(m, 0, 4) == b"abcd"


# ---------------------------------------------------------------- equivalence

SIZE = 256 * KiB

_offsets = st.integers(0, SIZE - 1)
_op = st.one_of(
    st.tuples(st.just("write"), _offsets, st.integers(1, 20000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), _offsets, st.integers(1, 70000),
              st.booleans()),
    st.tuples(st.just("trim"), _offsets, st.integers(1, 70000),
              st.just(None)),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=25))
def test_file_backend_matches_memory_backend(tmp_path, ops):
    """Writes and zeroes must leave identical content in both backends.

    Trim is advisory (FileBackend punches a hole, MemoryBackend keeps the
    data): a trimmed byte must read as zero or as its old value, and only
    bytes not trimmed since they were last written are compared exactly.
    """
    fd, path = tempfile.mkstemp(dir=str(tmp_path))
    os.ftruncate(fd, SIZE)
    os.close(fd)
    mem = backends.MemoryBackend(SIZE)
    undefined = bytearray(SIZE)  # 1 = trimmed since last written
    with backends.FileBackend(path) as f:
        for kind, offset, length, arg in ops:
            length = min(length, SIZE - offset)
            if kind == "write":
                data = bytes([arg]) * length
                f.write(data, offset)
                mem.write(data, offset)
                undefined[offset:offset + length] = bytes(length)
            elif kind == "zero":
                f.zero(offset, length, may_trim=arg)
                mem.zero(offset, length, may_trim=arg)
                undefined[offset:offset + length] = bytes(length)
            else:
                f.trim(offset, length)
                mem.trim(offset, length)
                undefined[offset:offset + length] = b"\1" * length
        f.flush()
        got = _read(f, 0, SIZE)
        ext = f.extents(0, SIZE)
    want = bytes(mem.data)
    for i in ([] if got == want else range(SIZE)):
        if got[i] != want[i]:
            assert undefined[i] and got[i] == 0, (
                "byte {}: file {} memory {} trimmed {}".format(
                    i, got[i], want[i], undefined[i]))
    # Holes reported by extents really read as zeroes.
    _check_extents_cover(ext, 0, SIZE)
    for off, n, hole in ext:
        if hole:
            assert got[off:off + n] == bytes(n)
    os.unlink(path)


# ---------------------------------------------------------------- faults

def _set_faults(path, rules):
    """Replace the faults file atomically (rename), as tests must."""
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rules, f)
    os.rename(tmp, str(path))


def test_fault_injection_only_when_the_variable_is_set_at_open(
        tmp_path, monkeypatch):
    img = _sparse(tmp_path / "lu.img", MiB)
    faults = tmp_path / "faults.json"
    _set_faults(faults, [{"path": img, "op": "*", "errno": "EIO"}])
    monkeypatch.delenv(backends.FAULTS_ENV, raising=False)
    with backends.FileBackend(img) as b:
        assert "write" not in vars(b)  # nothing wrapped: the class's method
        b.write(b"x" * 512, 0)
    monkeypatch.setenv(backends.FAULTS_ENV, str(faults))
    with backends.FileBackend(img) as b:
        with pytest.raises(OSError) as e:
            b.write(b"y" * 512, 0)
        assert e.value.errno == errno.EIO and "injected" in str(e.value)
        with pytest.raises(OSError):
            _read(b, 0, 512)
    monkeypatch.delenv(backends.FAULTS_ENV)
    with backends.FileBackend(img) as b:
        assert _read(b, 0, 512) == b"x" * 512  # the failed write changed nothing


def test_fault_rules_select_path_op_range_and_follow_the_file(
        tmp_path, monkeypatch):
    img = _sparse(tmp_path / "lu.img", MiB)
    other = _sparse(tmp_path / "other.img", MiB)
    faults = tmp_path / "faults.json"
    monkeypatch.setenv(backends.FAULTS_ENV, str(faults))
    b, o = backends.FileBackend(img), backends.FileBackend(other)
    b.write(b"a" * 8192, 0)  # no file yet: no faults
    _set_faults(faults, [{"path": img, "op": ["write", "zero"],
                          "offset": 4096, "length": 4096,
                          "errno": "ENOSPC"},
                         {"path": img, "op": "flush", "errno": 5}])
    b.write(b"b" * 4096, 0)          # before the range
    b.write(b"b" * 4096, 8192)       # after it
    assert _read(b, 4096, 4096) == b"a" * 4096  # reads are not selected
    for call in (lambda: b.write(b"c" * 2, 8191),
                 lambda: b.write(b"c" * 8192, 0),
                 lambda: b.zero(4096, 1)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        b.flush()
    assert e.value.errno == errno.EIO
    o.write(b"c" * 8192, 0)          # another file: untouched
    o.flush()
    assert _read(b, 0, 12288) == b"b" * 4096 + b"a" * 4096 + b"b" * 4096
    os.unlink(faults)                # fault removed
    b.write(b"d" * 8192, 0)
    b.flush()
    _set_faults(faults, {"not": "a list"})
    with pytest.raises(Exception) as e:
        b.write(b"e", 0)
    assert "CLONECTL_FAULTS" in str(e.value) and e.value.errno == errno.EINVAL
    b.close()
    o.close()
