"""Build (once) and cache the guest that tests/guest boots under QEMU.

The guest is a Debian kernel and a small initramfs, made from Debian
packages fetched at test time with `apt-get download` (nothing is installed
on the host for them) plus a few host binaries copied with their libraries:

- kernel: the `linux-image-*-amd64` package that `linux-image-amd64`
  depends on.  QEMU boots the uncompressed vmlinux through its PVH entry
  (the Debian kernel has CONFIG_PVH=y); we take it out of the vmlinuz the
  way the kernel's `scripts/extract-vmlinux` does (find the compressed
  payload's magic, decompress).  Measured on this 2-core machine under TCG:
  see docs/testing.md (Guest kernel).
- modules: virtio_pci virtio_blk virtio_net nbd ext4 (+ crc32c_generic,
  which ext4 and jbd2 ask for through the crypto API rather than a symbol)
  and everything they depend on, read from each .ko's .modinfo `depends=`
  (the package ships no modules.dep; depmod is not on the host).
- busybox (busybox-static), nbd-client (+ libnl-genl), and from the host:
  mke2fs, e2fsck, fio with every library `ldd` names.  fio alone brings
  ~80 MB of libraries (ceph, gluster); the initramfs is left uncompressed
  because decompressing it under TCG costs more than QEMU reading it.

The cache lives outside the repository, in
${CLONECTL_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/clonectl-guest}, keyed
by the versions of every package that feeds the guest and by this file;
`debs/` keeps the downloaded packages.  Builds take a lock and rename into
place, so concurrent test runs share one build.  The per-run part of the
initramfs (our scripts and fio jobs) is packed at each boot, so editing a
script never needs a rebuild.
"""

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

GUEST_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "nbd", "ext4",
                 "crc32c_generic"]
# Packages that only feed the guest: downloaded, never installed.
GUEST_PACKAGES = ["busybox-static", "nbd-client", "libnl-genl-3-200"]
# Host packages whose binaries are copied into the guest (scripts/setup
# installs them).
HOST_PACKAGES = ["e2fsprogs", "fio", "libc6"]
HOST_BINARIES = {"mke2fs": "/usr/sbin/mkfs.ext4", "e2fsck": "/usr/sbin/e2fsck",
                 "fio": "/usr/bin/fio"}


class GuestBuildError(Exception):
    pass


def cache_root():
    explicit = os.environ.get("CLONECTL_GUEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "clonectl-guest"


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise GuestBuildError("{} failed ({}):\n{}{}".format(
            " ".join(map(str, cmd)), proc.returncode, proc.stdout,
            proc.stderr))
    return proc.stdout


# ---------------------------------------------------------------- apt

_apt_updated = [False]


def _apt_update_once():
    if _apt_updated[0]:
        return
    _apt_updated[0] = True
    cmd = ["apt-get", "update", "-qq"]
    if os.getuid() != 0:
        cmd = ["sudo", "-n"] + cmd
    _run(cmd)


def _apt_query(fn):
    """Run fn(); if apt knows no such package, `apt-get update` once and
    retry (a fresh machine may have empty package lists)."""
    try:
        return fn()
    except GuestBuildError:
        _apt_update_once()
        return fn()


def kernel_package():
    def query():
        out = _run(["apt-cache", "depends", "linux-image-amd64"])
        m = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
        if not m:
            raise GuestBuildError("linux-image-amd64 depends on no kernel")
        return m.group(1)
    return _apt_query(query)


def download(package, version, debs):
    """Path of package_version.deb in debs/, downloading it if needed."""
    debs.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    found = list(debs.glob("{}_{}_*.deb".format(package, quoted)))
    if not found:
        _apt_query(lambda: _run(["apt-get", "download", "-q",
                                 "{}={}".format(package, version)],
                                cwd=debs))
        found = list(debs.glob("{}_{}_*.deb".format(package, quoted)))
    if not found:
        raise GuestBuildError("apt-get download {} left no .deb in {}"
                              .format(package, debs))
    return found[0]


# ---------------------------------------------------------------- kernel

def extract_vmlinux(vmlinuz):
    """The ELF vmlinux inside a bzImage (like scripts/extract-vmlinux)."""
    data = Path(vmlinuz).read_bytes()
    for magic, decompress in ((b"\xfd7zXZ\x00", _unxz),
                              (b"\x1f\x8b\x08", _gunzip)):
        pos = data.find(magic)
        while pos >= 0:
            try:
                elf = decompress(data[pos:])
            except Exception:
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            pos = data.find(magic, pos + 1)
    raise GuestBuildError("no xz or gzip payload with an ELF in " +
                          str(vmlinuz))


def _unxz(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)


def _gunzip(blob):
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)


def has_pvh_note(elf):
    """True if the ELF has XEN_ELFNOTE_PHYS32_ENTRY (type 18, "Xen"), the
    entry point QEMU's -kernel uses for an uncompressed vmlinux."""
    return b"Xen\x00" in elf and _find_note(elf, b"Xen\x00", 18)


def _find_note(elf, name, ntype):
    # Walk the program headers' PT_NOTE segments (ELF64 little endian).
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, t = struct.unpack_from("<III", elf, pos)
            n = elf[pos + 12:pos + 12 + namesz]
            if n == name and t == ntype:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def module_depends(ko_bytes):
    """The `depends=` list of a kernel module's .modinfo."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko_bytes)
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")


def module_load_order(modules_root, wanted):
    """Paths (relative to modules_root) of wanted modules and their
    dependencies, dependencies first."""
    by_name = {}
    for ko in Path(modules_root).rglob("*.ko"):
        by_name[ko.name[:-3].replace("-", "_")] = ko
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in by_name:
            raise GuestBuildError("kernel module {} not in the package"
                                  .format(name))
        for dep in module_depends(by_name[name].read_bytes()):
            visit(dep)
        order.append(by_name[name])

    for name in wanted:
        visit(name)
    return [p.relative_to(modules_root) for p in order]


# ---------------------------------------------------------------- libraries

def shared_libraries(binary, extra_lib_dirs=()):
    """Absolute paths of the libraries (and loader) `ldd` resolves."""
    env = dict(os.environ)
    if extra_lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join(map(str, extra_lib_dirs))
    out = _run(["ldd", str(binary)], env=env)
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise GuestBuildError("{}: library {}".format(binary, line))
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


# ---------------------------------------------------------------- cpio

class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks; written
    here so the host needs no cpio and every entry is root-owned."""

    def __init__(self, out):
        self.out = out
        self.ino = 1
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        name_b = name.encode() + b"\x00"
        header = "070701" + "".join("{:08x}".format(v) for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(name_b), 0))
        self.out.write(header.encode() + name_b)
        self._pad()
        self.out.write(data)
        self._pad()

    def _pad(self):
        self.out.write(b"\x00" * (-self.out.tell() % 4))

    def dir(self, path):
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.dir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, 0o040755)

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path, target):
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path, major, minor):
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self._entry(path, 0o020600, rdev=(major, minor))

    def close(self):
        self._entry("TRAILER!!!", 0)
        self.out.write(b"\x00" * (-self.out.tell() % 512))


def add_tree_file(cpio, src, dest):
    """Add a file, keeping its executable bit."""
    mode = 0o755 if os.access(src, os.X_OK) else 0o644
    cpio.file(dest, Path(src).read_bytes(), mode)


# ---------------------------------------------------------------- the build

class Guest:
    """A built guest: .vmlinux .bzimage .base_initrd .modules .versions"""

    def __init__(self, directory):
        self.dir = Path(directory)
        info = json.loads((self.dir / "guest.json").read_text())
        self.vmlinux = self.dir / "vmlinux"
        self.bzimage = self.dir / "vmlinuz"
        self.base_initrd = self.dir / "base.cpio"
        self.modules = info["modules"]
        self.versions = info["versions"]
        self.pvh = info["pvh"]
        self.build_seconds = info["build_seconds"]
        self.downloaded_bytes = info["downloaded_bytes"]

    def kernel(self):
        return self.vmlinux if self.pvh else self.bzimage

    def initrd_with(self, scripts_cpio_bytes, dest):
        """Write base.cpio + a per-run archive to dest (the kernel unpacks
        concatenated archives in order)."""
        with open(dest, "wb") as out, open(self.base_initrd, "rb") as base:
            shutil.copyfileobj(base, out, 1 << 20)
            out.write(scripts_cpio_bytes)
        return dest


def candidate_versions(packages):
    """{package: candidate version} from one `apt-cache policy` (each
    apt-cache call costs 1-2 s on this machine)."""
    def query():
        out = _run(["apt-cache", "policy"] + list(packages))
        found = dict(re.findall(r"^(\S+):\n\s+Installed:.*\n\s+Candidate:"
                                r"\s*(\S+)", out, re.M))
        missing = [p for p in packages if found.get(p) in (None, "(none)")]
        if missing:
            raise GuestBuildError("apt knows no candidate for " +
                                  " ".join(missing))
        return {p: found[p] for p in packages}
    return _apt_query(query)


def package_versions():
    versions = candidate_versions([kernel_package()] + GUEST_PACKAGES)
    out = _run(["dpkg-query", "-W", "-f=${Package} ${Version}\n"] +
               HOST_PACKAGES)
    host = dict(line.split(" ", 1) for line in out.splitlines())
    return versions, host


def cache_key(versions, host):
    h = hashlib.sha256()
    h.update(json.dumps([versions, host], sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


_ensured = {}


def ensure_guest(log=lambda msg: None):
    """The cached guest for the current package versions, built if
    missing.  Raises GuestBuildError with the reason if it cannot be."""
    if "guest" not in _ensured:
        _ensured["guest"] = _ensure_guest(log)
    return _ensured["guest"]


def _ensure_guest(log):
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    versions, host = package_versions()
    key = cache_key(versions, host)
    target = root / key
    if (target / "guest.json").exists():
        os.utime(target / "guest.json")  # in use: see _prune
        return Guest(target)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "guest.json").exists():
            return Guest(target)
        log("building guest {} in {}".format(key, target))
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            _build(work, root / "debs", versions, host)
            if target.exists():
                shutil.rmtree(target)
            os.rename(work / "out", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(root, keep=target)
    return Guest(target)


UNUSED_DAYS = 3


def _prune(root, keep):
    """Remove guests of other keys unused for UNUSED_DAYS (~165 MB each):
    another worktree may still use a recent one."""
    for info in root.glob("*/guest.json"):
        if info.parent == keep:
            continue
        if time.time() - info.stat().st_mtime > UNUSED_DAYS * 86400:
            shutil.rmtree(info.parent, ignore_errors=True)


def _build(work, debs, versions, host):
    started = time.monotonic()
    before = sum(p.stat().st_size for p in debs.glob("*.deb")) \
        if debs.exists() else 0
    extracted = work / "root"
    for package, version in versions.items():
        deb = download(package, version, debs)
        _run(["dpkg-deb", "-x", str(deb), str(extracted)])
    downloaded = sum(p.stat().st_size for p in debs.glob("*.deb")) - before

    out = work / "out"
    out.mkdir()
    vmlinuz = next((extracted / "boot").glob("vmlinuz-*"))
    kver = vmlinuz.name[len("vmlinuz-"):]
    shutil.copy(vmlinuz, out / "vmlinuz")
    elf = extract_vmlinux(vmlinuz)
    pvh = has_pvh_note(elf)
    (out / "vmlinux").write_bytes(elf)

    modules_root = extracted / "lib" / "modules" / kver
    order = module_load_order(modules_root, GUEST_MODULES)

    lib_dirs = [extracted / "lib" / "x86_64-linux-gnu",
                extracted / "usr" / "lib" / "x86_64-linux-gnu"]
    with open(out / "base.cpio", "wb") as f:
        cpio = Cpio(f)
        for d in ("dev", "proc", "sys", "tmp", "mnt", "run", "etc", "bin",
                  "sbin", "usr/bin", "usr/sbin", "lib64"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        add_tree_file(cpio, extracted / "bin" / "busybox", "bin/busybox")
        cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
        libs = set()
        binaries = {"usr/sbin/nbd-client": extracted / "sbin" / "nbd-client"}
        for name, path in HOST_BINARIES.items():
            real = shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
            if real is None:
                raise GuestBuildError("host has no {} (scripts/setup "
                                      "installs it)".format(name))
            binaries[path.lstrip("/")] = Path(real)
        for dest, src in binaries.items():
            add_tree_file(cpio, src, dest)
            libs.update(shared_libraries(src, lib_dirs))
        cpio.symlink("usr/sbin/mke2fs", "mkfs.ext4")
        for lib in sorted(libs):
            dest = ("lib64/" if lib.startswith("/lib64/")
                    else "lib/x86_64-linux-gnu/") + os.path.basename(lib)
            cpio.file(dest, Path(lib).read_bytes(), 0o755)
        names = []
        for rel in order:
            cpio.file("lib/modules/" + rel.name,
                      (modules_root / rel).read_bytes())
            names.append(rel.name)
        cpio.file("etc/modules-load-order", ("\n".join(names) + "\n").encode())
        cpio.close()
    info = {"kernel_version": kver, "modules": names, "pvh": pvh,
            "versions": dict(versions, **{"host:" + k: v
                                          for k, v in host.items()}),
            "build_seconds": round(time.monotonic() - started, 1),
            "downloaded_bytes": downloaded}
    (out / "guest.json").write_text(json.dumps(info, indent=1) + "\n")
