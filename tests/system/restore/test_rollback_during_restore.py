"""`lu rollback` writes a Source without host writes, as a protected
restore or a reverse sync from a clone does: the two must not run on one
LU at once.  While a clone restores the Source, hosts read the clone's
data and the engine keeps copying it; a rollback then would put the
image back below the clones layer only, report success and release the
image, leaving hosts on the clone's data.  So the rollback is refused,
naming the clone, and the image stays to be put back once the restore
has finished.  (The converse, a restore refused while a rollback runs,
is tests/engine/test_image_seams.py's: it needs the rollback held.)"""

import os

import pytest

from target import control
from tests.support.clonelib import MiB, read_range

pytest.importorskip("nbd")

SIZE = 16 * MiB


@pytest.mark.parametrize("operation", ["restore", "reverse-sync"])
def test_rollback_is_refused_while_a_clone_restores_the_lu(clone_env,
                                                           operation):
    env = clone_env.setup(size=SIZE, clones=("c1",))
    env.sync_wait("c1")
    env.cli("clone", "fracture", "c1")
    # The clone differs from the Source everywhere.
    env.write_export("c1", 0, os.urandom(SIZE))
    image = read_range(env.img("src"), 0, SIZE)
    sock = str(env.state_dir / "run" / "control.sock")
    st = control.call(sock, "image_protect", lu="src")
    assert st["protected"] and st["export"] == "src@protected-src", st
    # A host changes the first MiB (its old data saved into the image).
    env.write_export("src", 0, b"\x5a" * MiB)
    # A slow restore from c1 starts (no host connected).
    env.cli("clone", operation, "c1", "--rate", "1M")
    state = env.status("c1")["state"]
    assert state in ("restoring", "reverse-syncing"), state

    proc = env.cli("lu", "rollback", "src", check=False)
    got = env.read_export("src", 0, SIZE)
    g = 64 << 10
    differ = [e for e in range(SIZE // g)
              if got[e * g:(e + 1) * g] != image[e * g:(e + 1) * g]]
    assert proc.returncode == 1, (
        "`lu rollback src` during a {} from c1 said {!r}; the protected "
        "image is {}; {} of {} extents of src (first {}) read other data "
        "than the image (c1's, the {} still {})".format(
            operation, proc.stdout.strip(),
            "kept" if control.call(sock, "image_status", lu="src")[
                "protected"] else "released",
            len(differ), SIZE // g, differ[:4], operation,
            env.status("c1")["state"]))
    err = proc.stderr.lower()
    assert "clone c1 is restoring it" in err, proc.stderr
    assert "traceback" not in err, proc.stderr
    # Nothing changed: the image is kept, readable as it was.
    assert control.call(sock, "image_status", lu="src")["protected"]
    assert env.read_export("src@protected-src", 0, SIZE) == image
    assert env.status("c1")["state"] == state
