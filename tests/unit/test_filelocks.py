"""target.filelocks: QEMU's image locks on the files the target opens.

Another program is a child Python process taking the lock bytes a QEMU
opener would take (qemu-nbd writing: permission bytes 100 and 101 and
the unshared resize byte 203; a VM's disk: also byte 201, writes not
shared; a read-only qemu-io: byte 100).  The real QEMU tools against a
served LU are in tests/system/core/test_backing_claims.py.
"""

import errno
import os
import subprocess
import sys

import pytest

from target import backends, errors, filelocks

HOLDER = r'''
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for byte in map(int, sys.argv[2:]):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, byte, 1, 0))
print("held", flush=True)
sys.stdin.read()
'''

QEMU_NBD = (100, 101, 203)
VM_DISK = (100, 101, 201, 203)
QEMU_IO_READONLY = (100,)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


@pytest.fixture
def holder(image):
    """holder(bytes): a child process holding those lock bytes of image
    until the test ends (or holder.release())."""
    procs = []

    def hold(lock_bytes):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, image] + [str(b) for b in
                                                      lock_bytes],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    def release():
        for proc in procs:
            proc.stdin.close()
            proc.wait(10)

    hold.release = release
    yield hold
    release()


def _locks_of(path):
    """The lock bytes anyone holds on path, from /proc/locks."""
    st = os.stat(path)
    where = "{:02x}:{:02x}:{}".format(os.major(st.st_dev),
                                      os.minor(st.st_dev), st.st_ino)
    found = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "OFDLCK" and fields[5] == where:
                found.update(range(int(fields[6]), int(fields[7]) + 1))
    return found


def test_an_open_file_holds_qemus_bytes_for_a_writer(image):
    with backends.FileBackend(image):
        assert _locks_of(image) == {100, 101, 201, 203}
    assert _locks_of(image) == set()


def test_a_read_only_open_holds_read_and_forbids_writers(image):
    with backends.FileBackend(image, readonly=True):
        assert _locks_of(image) == {100, 201, 203}


@pytest.mark.parametrize("held", [QEMU_NBD, VM_DISK],
                         ids=["qemu-nbd", "vm-disk"])
def test_a_file_another_program_writes_is_refused(image, holder, held):
    holder(held)
    with pytest.raises(errors.BackingLocked) as e:
        backends.FileBackend(image)
    assert "in use by another program" in str(e.value)
    with pytest.raises(errors.BackingLocked):
        backends.FileBackend(image, readonly=True)
    with pytest.raises(errors.BackingLocked):
        filelocks.open_locked(image, writable=True)


def test_a_reader_that_shares_writes_is_no_obstacle(image, holder):
    holder(QEMU_IO_READONLY)
    with backends.FileBackend(image):
        pass


def test_the_file_is_taken_once_the_other_program_lets_go(image, holder):
    holder(QEMU_NBD)
    with pytest.raises(errors.BackingLocked):
        backends.FileBackend(image)
    holder.release()
    with backends.FileBackend(image):
        pass


def test_this_process_may_open_its_own_file_again(image, holder):
    first = backends.FileBackend(image)
    second = first.reopen()
    third = backends.FileBackend(image, readonly=True)
    # Closing one leaves the others' locks: others are still refused.
    first.close()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c",
                        "import sys; from target import filelocks; "
                        "filelocks.open_locked(sys.argv[1], True)", image],
                       check=True, capture_output=True,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__)))))
    second.close()
    third.close()
    assert _locks_of(image) == set()
    holder(QEMU_NBD)        # and nothing of ours is counted any more
    with pytest.raises(errors.BackingLocked):
        backends.FileBackend(image)


def _claimed_elsewhere(dev):
    """Whether an exclusive open of dev (a mount's) fails."""
    try:
        os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
    except OSError as e:
        assert e.errno == errno.EBUSY, e
        return True
    return False


def test_a_device_stays_claimed_while_any_descriptor_of_it_is_open(
        loop_device):
    first = filelocks.open_locked(loop_device, writable=True)
    second = filelocks.open_locked(loop_device, writable=True)
    filelocks.close(first)
    assert _claimed_elsewhere(loop_device)
    filelocks.close(second)
    assert not _claimed_elsewhere(loop_device)


def test_a_device_claimed_elsewhere_is_refused(loop_device):
    holder = os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(errors.BackingLocked) as e:
            backends.FileBackend(loop_device)
        assert "mounted" in str(e.value)
    finally:
        os.close(holder)
    with backends.FileBackend(loop_device):
        assert _claimed_elsewhere(loop_device)


def test_one_file_is_refused_to_a_second_owner(image):
    """Two objects of one target never share storage, whatever their
    paths: a second owner is refused, the same owner opens it again."""
    x = backends.FileBackend(image, owner="LU x")
    again = x.reopen()
    with pytest.raises(errors.BackingShared) as e:
        backends.FileBackend(image, owner="LU y")
    assert "LU x" in str(e.value) and "LU y" in str(e.value)
    x.close()
    with pytest.raises(errors.BackingShared):
        backends.FileBackend(image, owner="clone c")
    again.close()
    with backends.FileBackend(image, owner="clone c"):
        pass
