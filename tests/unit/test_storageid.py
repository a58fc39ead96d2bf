"""target.storageid: what storage an open file is, across boots.

Block devices are read from a sysfs tree the test writes (as the kernel
lays it out for each kind of device); regular files are real files, their
filesystem's device described in that tree or not.
"""

import os

import pytest

from target import storageid


class FakeSysfs:
    """A /sys with the block devices a test describes, and a device node
    per device (mknod) to open: of_fd looks up a descriptor's st_rdev
    under <root>/dev/block/MAJ:MIN, as in the real /sys."""

    def __init__(self, root):
        self.root = root
        self.devices = root / "devices"
        (root / "dev" / "block").mkdir(parents=True)

    def device(self, path, attrs, dev):
        """Device directory devices/path (a partition's parent first)
        holding attrs {relative name: text}, linked as dev (maj, min)."""
        node = self.devices / path
        node.mkdir(parents=True, exist_ok=True)
        for name, text in attrs.items():
            (node / name).parent.mkdir(parents=True, exist_ok=True)
            (node / name).write_text(text + "\n")
        os.symlink(node, self.root / "dev" / "block" / "{}:{}".format(*dev))
        return node

    def identity(self, dev, tmp_path):
        node = tmp_path / "node-{}-{}".format(*dev)
        if not node.exists():
            os.mknod(node, 0o600 | 0o060000, os.makedev(*dev))
        return self.of(node)

    def filesystem_of(self, path, attrs):
        """Describe the device path's filesystem is on, as a disk."""
        dev = os.stat(path).st_dev
        return self.device("fs/block/disk", attrs,
                           (os.major(dev), os.minor(dev)))

    def of(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_PATH)
        try:
            return storageid.of_fd(fd, sysfs=str(self.root))
        finally:
            os.close(fd)


@pytest.fixture
def sysfs(tmp_path):
    return FakeSysfs(tmp_path / "sys")


# Numbers no real device of this machine has: the node is only stat()ed.
DEV = (250, 7)


@pytest.mark.parametrize("attrs, expected", [
    ({"dm/uuid": "LVM-abc", "dm/name": "vg-lv"}, "dm:LVM-abc"),
    ({"dm/uuid": "", "dm/name": "mine"}, "dm-name:mine"),
    ({"md/uuid": "11:22:33:44"}, "md:11:22:33:44"),
    ({"loop/backing_file": "/srv/gone.img"}, None),
    ({"loop/backing_file": "/srv/a.img (deleted)"}, None),
    ({"wwid": "eui.0025", "serial": "S1"}, "wwid:eui.0025"),
    ({"device/wwid": "naa.5000", "serial": "S1"}, "wwid:naa.5000"),
    ({"serial": "QM0001"}, "serial:QM0001"),
    ({"device/serial": "  S2  "}, "serial:S2"),
    ({"serial": ""}, None),
    ({}, None),
], ids=["dm", "dm-without-uuid", "md", "loop-gone", "loop-deleted",
        "nvme-wwid", "scsi-wwid",
        "virtio-serial", "nvme-serial", "empty-serial", "nothing"])
def test_a_device_is_named_by_what_its_driver_reports(
        sysfs, tmp_path, attrs, expected):
    sysfs.device("virtual/block/x", attrs, DEV)
    assert sysfs.identity(DEV, tmp_path) == expected


def test_dm_wins_over_what_its_disk_like_attributes_say(sysfs, tmp_path):
    sysfs.device("virtual/block/dm-0", {"dm/uuid": "CRYPT-1",
                                        "serial": "nope"}, DEV)
    assert sysfs.identity(DEV, tmp_path) == "dm:CRYPT-1"


def test_a_partition_is_its_disk_and_its_first_sector(sysfs, tmp_path):
    sysfs.device("pci/block/sda", {"device/wwid": "naa.1"}, (251, 0))
    sysfs.device("pci/block/sda/sda2", {"partition": "2", "start": "2048"},
                 (251, 2))
    assert sysfs.identity((251, 2), tmp_path) == "wwid:naa.1+part@2048"


def test_a_partition_of_a_disk_without_identity_has_none(sysfs, tmp_path):
    sysfs.device("pci/block/vdb", {}, (252, 16))
    sysfs.device("pci/block/vdb/vdb1", {"partition": "1", "start": "34"},
                 (252, 17))
    assert sysfs.identity((252, 17), tmp_path) is None


def test_a_device_sysfs_does_not_list_has_no_identity(sysfs, tmp_path):
    assert sysfs.identity((253, 99), tmp_path) is None


def test_a_loop_device_is_the_file_it_shows(sysfs, tmp_path):
    """Not the file's path: a renamed file is the same storage, another
    file moved to the path is not (sysfs shows the path the kernel has
    now)."""
    img = tmp_path / "a.img"
    img.write_bytes(b"a")
    sysfs.filesystem_of(img, {"serial": "D1"})
    sysfs.device("virtual/block/loop3", {"loop/backing_file": str(img),
                                         "loop/offset": "512"}, DEV)
    got = sysfs.identity(DEV, tmp_path)
    assert got == "loop:{}@512".format(sysfs.of(img))
    assert got.startswith("loop:file:") and "ino={}".format(
        os.stat(img).st_ino) in got
    (tmp_path / "b.img").write_bytes(b"a")
    os.replace(tmp_path / "b.img", img)
    sysfs.device("virtual/block/loop4", {"loop/backing_file": str(img),
                                         "loop/offset": "512"},
                 (DEV[0], DEV[1] + 1))
    assert sysfs.identity((DEV[0], DEV[1] + 1), tmp_path) != got


def test_a_loop_device_over_a_disk_is_the_disk(sysfs, tmp_path):
    """Loop over /dev/sdb: sdb renamed at boot must not pass."""
    disk = (251, 16)
    sysfs.device("pci/block/sdb", {"device/wwid": "naa.2"}, disk)
    node = tmp_path / "sdb"
    os.mknod(node, 0o600 | 0o060000, os.makedev(*disk))
    sysfs.device("virtual/block/loop5", {"loop/backing_file": str(node)},
                 DEV)
    assert sysfs.identity(DEV, tmp_path) == "loop:wwid:naa.2@0"


def test_a_file_is_its_filesystem_device_and_inode(sysfs, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(b"a")
    b.write_bytes(b"a")
    st = os.stat(a)
    sysfs.filesystem_of(a, {"device/wwid": "naa.3"})
    got = sysfs.of(a)
    assert got == "file:wwid:naa.3:ino={}".format(st.st_ino)
    assert sysfs.of(b) != got, "same contents, another file"
    os.link(a, tmp_path / "hard")
    os.symlink(a, tmp_path / "soft")
    assert sysfs.of(tmp_path / "hard") == got
    assert sysfs.of(tmp_path / "soft") == got
    os.rename(a, tmp_path / "moved")
    assert sysfs.of(tmp_path / "moved") == got, "a rename keeps the file"


class FakeStat:
    """A regular file's stat result, on the device dev."""

    def __init__(self, dev, ino=12):
        self.st_mode, self.st_dev, self.st_ino = 0o100600, dev, ino


def test_a_file_on_no_block_device_is_named_by_its_filesystem_id(sysfs):
    """btrfs, tmpfs, NFS (device major 0): statfs's f_fsid, if not 0."""
    anonymous = FakeStat(os.makedev(0, 45))
    assert storageid._of_stat(anonymous, lambda: 0x1234abcd,
                              str(sysfs.root), 0) == "file:fsid=1234abcd:ino=12"
    assert storageid._of_stat(anonymous, lambda: 0, str(sysfs.root),
                              0) is None


def test_a_file_on_a_disk_without_identity_has_none(sysfs):
    """Not its f_fsid: xfs's is its device number, which a swap keeps."""
    sysfs.device("pci/block/vdb", {}, (252, 16))
    on_vdb = FakeStat(os.makedev(252, 16))
    assert storageid._of_stat(on_vdb, lambda: 0xfc10, str(sysfs.root),
                              0) is None


@pytest.mark.parametrize("attrs", [
    {"md/uuid": "00000000:00000000:00000000:00000000"},
    {"serial": "0000000000"}, {"device/wwid": "   "}])
def test_values_of_zeroes_are_no_identity(sysfs, tmp_path, attrs):
    sysfs.device("virtual/block/md127", attrs, DEV)
    assert sysfs.identity(DEV, tmp_path) is None


def test_a_luks_mapping_is_the_same_under_another_name(sysfs, tmp_path):
    uuid = "CRYPT-LUKS2-" + "ab" * 16 + "-{}"
    sysfs.device("virtual/block/dm-1", {"dm/uuid": uuid.format("data")}, DEV)
    other = (DEV[0], DEV[1] + 1)
    sysfs.device("virtual/block/dm-2", {"dm/uuid": uuid.format("db")}, other)
    assert sysfs.identity(DEV, tmp_path) == \
        sysfs.identity(other, tmp_path) == "dm:CRYPT-LUKS2-" + "ab" * 16


def test_a_loop_leading_back_to_itself_has_no_identity(sysfs, tmp_path):
    """Its file's path, resolved now, is the loop device's own node (an
    image mounted over the directory of its file): no endless descent."""
    node = tmp_path / "loop-node"
    os.mknod(node, 0o600 | 0o060000, os.makedev(*DEV))
    sysfs.device("virtual/block/loop6", {"loop/backing_file": str(node)},
                 DEV)
    assert sysfs.identity(DEV, tmp_path) is None


def test_a_file_restored_from_a_backup_is_other_storage(sysfs, tmp_path):
    """Same path, same bytes, another file: what an admin accepts."""
    a = tmp_path / "a.img"
    a.write_bytes(b"data")
    sysfs.filesystem_of(a, {"serial": "D1"})
    before = sysfs.of(a)
    (tmp_path / "restored").write_bytes(a.read_bytes())
    os.replace(tmp_path / "restored", a)
    assert sysfs.of(a) != before


@pytest.mark.parametrize("a, b, shared", [
    ("wwid:naa.1", "wwid:naa.1", True),
    ("wwid:naa.1", "wwid:naa.1+part@2048", True),
    ("wwid:naa.1+part@2048", "wwid:naa.1+part@4096", False),
    ("file:wwid:naa.1+part@2048:ino=12", "wwid:naa.1+part@2048", True),
    ("file:wwid:naa.1+part@2048:ino=12", "wwid:naa.1", True),
    ("file:wwid:naa.1:ino=12", "file:wwid:naa.1:ino=13", False),
    ("loop:file:serial:D:ino=12@0", "file:serial:D:ino=12", True),
    ("loop:file:serial:D:ino=12@0", "loop:file:serial:D:ino=12@4096",
     False),
    ("loop:wwid:naa.2@0+part@2048", "wwid:naa.2", True),
    ("loop:wwid:naa.2@0+part@2048", "loop:wwid:naa.2@0", True),
    ("file:fsid=1234:ino=5", "file:fsid=1234:ino=6", False),
    ("serial:a+b@c", "serial:a", False),
    (None, "wwid:naa.1", False),
    (None, None, False),
])
def test_what_shares_bytes(a, b, shared):
    assert storageid.overlap(a, b) is shared
    assert storageid.overlap(b, a) is shared


def test_within_unwraps_what_of_fd_builds(sysfs, tmp_path):
    """A partition of a loop device over a file on a partition."""
    img = tmp_path / "a.img"
    img.write_bytes(b"a")
    st = os.stat(img)
    sysfs.device("pci/block/sdd", {"device/wwid": "naa.4"}, (251, 48))
    sysfs.device("pci/block/sdd/sdd1", {"partition": "1", "start": "2048"},
                 (os.major(st.st_dev), os.minor(st.st_dev)))
    sysfs.device("virtual/block/loop7", {"loop/backing_file": str(img),
                                         "loop/offset": "0"}, DEV)
    sysfs.device("virtual/block/loop7/loop7p2",
                 {"partition": "2", "start": "4096"}, (DEV[0], DEV[1] + 1))
    got = sysfs.identity((DEV[0], DEV[1] + 1), tmp_path)
    file_id = "file:wwid:naa.4+part@2048:ino={}".format(st.st_ino)
    assert got == "loop:{}@0+part@4096".format(file_id)
    assert storageid.within(got) == [
        "loop:{}@0".format(file_id), file_id, "wwid:naa.4+part@2048",
        "wwid:naa.4"]
