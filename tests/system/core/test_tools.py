"""Standard NBD tools against a running `clonectl serve`: qemu-img, qemu-io,
nbdcopy, nbdinfo, fio."""

import json
import random
import shutil
import subprocess

import pytest

from tests.support.cli import MiB, run_clonectl
from tests.support.servers import read_file_range


def _need(tool):
    if shutil.which(tool) is None:
        pytest.skip("{} is not installed".format(tool))


def _run(cmd, timeout=120, check=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True,
                          text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail("{} exited with {}\nstdout:\n{}\nstderr:\n{}".format(
            " ".join(map(str, cmd)), proc.returncode, proc.stdout,
            proc.stderr))
    return proc


def _patterned_file(path, size, seed):
    """Random data with holes and zero runs, like a real disk image."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(40):
            off = rng.randrange(0, size - 70000)
            f.seek(off)
            f.write(rng.randbytes(rng.choice([1, 511, 4096, 65536, 69999])))
    return path


@pytest.fixture
def served_lu(fresh_lu):
    return fresh_lu


def test_qemu_img_convert_round_trip(served_lu, tmp_path):
    _need("qemu-img")
    src = _patterned_file(tmp_path / "src.img", served_lu.size, 1)
    back = tmp_path / "back.img"
    _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-n", src,
          served_lu.uri])
    assert read_file_range(served_lu.file, 0, served_lu.size) == \
        src.read_bytes()
    _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served_lu.uri,
          back])
    assert back.read_bytes() == src.read_bytes()
    _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src,
          served_lu.uri])
    # compare must notice a difference (the test can fail).
    with open(src, "r+b") as f:
        f.seek(12345)
        f.write(b"\x01")
    proc = _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src,
                 served_lu.uri], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_qemu_img_info_and_map(served_lu, nbd_connect, tmp_path):
    """qemu-img sees a raw disk of the LU's size, whose allocation map
    (NBD base:allocation) has data exactly where it was written and zeroes
    elsewhere, and whose bytes are the ones written."""
    _need("qemu-img")
    h = nbd_connect(served_lu.server.socket, served_lu.name)
    data = random.Random(7).randbytes(2 * MiB)
    h.pwrite(data, 4 * MiB)
    h.flush()
    info = json.loads(_run(["qemu-img", "info", "--output=json",
                            served_lu.uri]).stdout)
    assert info["format"] == "raw", info
    assert info["virtual-size"] == served_lu.size, info
    extents = json.loads(_run(["qemu-img", "map", "--output=json", "-f",
                               "raw", served_lu.uri]).stdout)
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == served_lu.size
    written = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert written == [(4 * MiB, 2 * MiB)], extents
    assert all(e["zero"] for e in extents if not e["data"]), extents
    expected = tmp_path / "expected.img"
    with open(expected, "wb") as f:
        f.truncate(served_lu.size)
        f.seek(4 * MiB)
        f.write(data)
    _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", expected,
          served_lu.uri])


def test_qemu_io_aligned_and_unaligned(served_lu):
    _need("qemu-io")
    cmds = [
        "write -P 0xab 1 1000",
        "read -P 0xab 1 1000",
        "write -P 0xcd 4096 65536",
        "read -P 0xcd 4096 65536",
        "write -P 0xef 1048575 3",
        "read -P 0xef 1048575 3",
        "write -z 4096 4096",
        "read -P 0 4096 4096",
        "read -P 0xcd 8192 61440",
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    proc = _run(args + [served_lu.uri])
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    data = read_file_range(served_lu.file, 0, 2 * MiB)
    assert data[0] == 0
    assert data[1:1001] == b"\xab" * 1000
    assert data[1001:4096] == bytes(4096 - 1001)
    assert data[4096:8192] == bytes(4096)
    assert data[8192:4096 + 65536] == b"\xcd" * (65536 - 4096)
    assert data[1048575:1048578] == b"\xef" * 3
    # And qemu-io notices a wrong pattern (the check can fail).
    proc = _run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 1 1000",
                 served_lu.uri], check=False)
    assert "Pattern verification failed" in proc.stdout + proc.stderr


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_round_trip(served_lu, tmp_path, connections):
    _need("nbdcopy")
    src = _patterned_file(tmp_path / "src.img", served_lu.size, 2)
    back = tmp_path / "back.img"
    _run(["nbdcopy", "--connections={}".format(connections), src,
          served_lu.uri])
    assert read_file_range(served_lu.file, 0, served_lu.size) == \
        src.read_bytes()
    _run(["nbdcopy", "--connections={}".format(connections), served_lu.uri,
          back])
    assert back.read_bytes() == src.read_bytes()


def test_nbdinfo_list_shows_every_lu(shared_server):
    _need("nbdinfo")
    run_clonectl(shared_server.state_dir, "lu", "create", "listed-ro",
                 "--size", "1M", "--read-only")
    proc = _run(["nbdinfo", "--list", "--json", shared_server.uri()])
    info = json.loads(proc.stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    doc = json.loads((shared_server.state_dir / "state.json").read_text())
    assert set(exports) == set(doc["lus"])
    assert exports["listed-ro"]["is_read_only"] is True
    assert exports["listed-ro"]["export-size"] == MiB
    assert exports["warmup"]["is_read_only"] is False
    # The plain text listing names them too.
    text = _run(["nbdinfo", "--list", shared_server.uri()]).stdout
    for name in doc["lus"]:
        assert 'export="{}"'.format(name) in text


def test_nbdinfo_map_holes_and_data(served_lu, nbd_connect):
    _need("nbdinfo")
    proc = _run(["nbdinfo", "--map", "--json", served_lu.uri])
    extents = json.loads(proc.stdout)
    assert sum(e["length"] for e in extents) == served_lu.size
    assert all(e["type"] == 3 for e in extents), extents  # hole,zero
    h = nbd_connect(served_lu.uri)
    h.pwrite(b"\x5a" * MiB, 4 * MiB)
    h.flush()
    extents = json.loads(_run(["nbdinfo", "--map", "--json",
                               served_lu.uri]).stdout)
    assert sum(e["length"] for e in extents) == served_lu.size
    data = [e for e in extents if e["type"] == 0]
    assert data, extents
    for e in data:
        assert e["offset"] >= 4 * MiB and \
            e["offset"] + e["length"] <= 5 * MiB, extents
    assert sum(e["length"] for e in data) == MiB
    holes = [e for e in extents if e["type"] == 3]
    assert holes[0]["offset"] == 0 and holes[0]["length"] == 4 * MiB


def _fio(args, timeout=120):
    proc = _run(["fio"] + args + ["--output-format=json"], timeout=timeout,
                check=False)
    out = proc.stdout
    start = out.find("{")
    assert start >= 0, "no JSON from fio:\n{}\n{}".format(out, proc.stderr)
    return proc, json.loads(out[start:])


def test_fio_randwrite_verify(served_lu):
    _need("fio")
    proc, result = _fio([
        "--name=verify", "--ioengine=nbd", "--uri=" + served_lu.uri,
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--randrepeat=0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = result["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 32 * MiB
    assert job["read"]["io_bytes"] == 32 * MiB, "verify read everything"
    # The data really is on the LU: fio's verify headers are in the file.
    assert read_file_range(served_lu.file, 0, 32 * MiB).count(b"\0" * 4096) \
        < 32 * MiB // 4096


def test_fio_detects_corruption(served_lu):
    """The fio check above can fail: verify against data we overwrote."""
    _need("fio")
    common = ["--name=v", "--ioengine=nbd", "--uri=" + served_lu.uri,
              "--bs=4k", "--iodepth=4", "--size=1M", "--verify=crc32c",
              "--verify_fatal=1"]
    proc, result = _fio(common + ["--rw=write", "--do_verify=0"])
    assert result["jobs"][0]["error"] == 0
    with open(served_lu.file, "r+b") as f:
        f.seek(8192 + 100)
        f.write(b"garbage")
    proc, result = _fio(common + ["--rw=read", "--verify_only=1"])
    assert proc.returncode != 0 or result["jobs"][0]["error"] != 0
