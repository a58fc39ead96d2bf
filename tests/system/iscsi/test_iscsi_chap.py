"""CHAP on the iSCSI gateway: one-way (the initiator proves itself) and
mutual (the target too), with real initiators (libiscsi's iscsi-inq)."""

import os
import subprocess

import pytest

from tests.support.cli import run_clonectl
from tests.support.iscsilib import needs_iscsi

pytestmark = needs_iscsi

SECRET = "initiator-secret-1"
TARGET_SECRET = "target-secret-22"


def _secret_file(path, secret, mode=0o600):
    path.write_text(secret + "\n")
    os.chmod(path, mode)
    return path


def _inq(url, env=None):
    full = dict(os.environ)
    for k in ("LIBISCSI_CHAP_USERNAME", "LIBISCSI_CHAP_PASSWORD",
              "LIBISCSI_CHAP_TARGET_USERNAME",
              "LIBISCSI_CHAP_TARGET_PASSWORD"):
        full.pop(k, None)
    full.update(env or {})
    return subprocess.run(["iscsi-inq", url], capture_output=True, text=True,
                          timeout=60, env=full)


def _with_user(url, user, password):
    return url.replace("iscsi://", "iscsi://{}%{}@".format(user, password))


def test_one_way_chap(iscsi_server, clonectl, tmp_path):
    clonectl("lu", "create", "d1", "--size", "8M")
    secret = _secret_file(tmp_path / "chap.secret", SECRET)
    srv = iscsi_server(extra_args=["--iscsi-chap",
                                   "alice:{}".format(secret)])
    url = srv.url("d1")
    ok = _inq(_with_user(url, "alice", SECRET))
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, \
        ok.stdout + ok.stderr
    for bad in (_inq(url), _inq(_with_user(url, "alice", "wrong-secret-99")),
                _inq(_with_user(url, "mallory", SECRET))):
        assert bad.returncode != 0, bad.stdout
        assert "DIRECT_ACCESS" not in bad.stdout
    # The secret is in no file the server wrote and on no command line.
    run = srv.server.state_dir / "run"
    for name in os.listdir(run):
        path = run / name
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), name
    info = run_clonectl(srv.server.state_dir, "status", "--json").stdout
    assert SECRET not in info and '"one-way"' in info


def test_mutual_chap_refuses_a_target_with_the_wrong_secret(
        iscsi_server, clonectl, tmp_path):
    clonectl("lu", "create", "d1", "--size", "8M")
    secret = _secret_file(tmp_path / "chap.secret", SECRET)
    target = _secret_file(tmp_path / "target.secret", TARGET_SECRET)
    srv = iscsi_server(extra_args=[
        "--iscsi-chap", "alice:{}".format(secret),
        "--iscsi-chap-mutual", "tgt:{}".format(target)])
    url = _with_user(srv.url("d1"), "alice", SECRET)
    ok = _inq(url, {"LIBISCSI_CHAP_TARGET_USERNAME": "tgt",
                    "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET})
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout, \
        ok.stdout + ok.stderr
    bad = _inq(url, {"LIBISCSI_CHAP_TARGET_USERNAME": "tgt",
                     "LIBISCSI_CHAP_TARGET_PASSWORD": "not-the-target-1"})
    assert bad.returncode != 0 and "DIRECT_ACCESS" not in bad.stdout, \
        bad.stdout + bad.stderr


def test_secret_files_readable_by_others_are_refused(clonectl, tmp_path,
                                                      state_dir):
    clonectl("lu", "create", "d1", "--size", "8M")
    loose = _secret_file(tmp_path / "loose.secret", SECRET, mode=0o644)
    short = _secret_file(tmp_path / "short.secret", "short")
    good = _secret_file(tmp_path / "good.secret", SECRET)
    cases = [
        (["--iscsi-chap", "alice:{}".format(loose)], "mode 0644"),
        (["--iscsi-chap", "alice:{}".format(short)], "12-255"),
        (["--iscsi-chap", "alice"], "USER:SECRETFILE"),
        (["--iscsi-chap", "alice:{}".format(good),
          "--iscsi-chap-mutual", "tgt:{}".format(good)], "different"),
        (["--iscsi-chap-mutual", "tgt:{}".format(good)], "needs"),
    ]
    for args, why in cases:
        proc = clonectl("serve", "--socket", tmp_path / "s.sock",
                        "--iscsi-portal", "127.0.0.1:3261", *args,
                        check=False)
        assert proc.returncode in (1, 2), (args, proc.stderr)
        assert why in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert SECRET not in proc.stderr
    assert not (tmp_path / "s.sock").exists()
