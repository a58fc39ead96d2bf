"""Access: NBD over TCP with TLS required (pre-shared keys or X.509
certificates), so a client without the key or without trust in the CA gets
nothing, not even the export list; client certificates verified
(--tls-verify-peer); an allow-list of client addresses (--allow, checked in
the plugin's preconnect) and per-export ones (--allow-export, checked when
the export is opened); the control socket is the owner's only
(tests/unit/test_control.py checks its mode)."""

import errno
import os
import socket
import stat
import subprocess
import time

import pytest

from tests.support.cli import CLONECTL, MiB, run_clonectl, status_json
from tests.support.processes import terminate_pid
from tests.support.servers import serve_log_has
from tests.support.tlscerts import Certs

nbd = pytest.importorskip("nbd")




def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def psk_file(tmp_path):
    path = tmp_path / "keys.psk"
    path.write_text("alice:" + os.urandom(32).hex() + "\n")
    path.chmod(0o600)
    return path


def _tls_client(port, psk, user="alice"):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(psk))
    h.set_tls_username(user)
    h.set_export_name("a")
    h.connect_tcp("127.0.0.1", str(port))
    return h


class TcpServer:
    """`clonectl serve --port PORT ARGS...`, stopped by PID."""

    def __init__(self, state_dir, port, args, log_path, guard):
        self.state_dir, self.port = state_dir, port
        env = dict(os.environ)
        env.pop("CLONECTL_STATE", None)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [CLONECTL, "--state-dir", str(state_dir), "serve", "--port",
             str(port)] + [str(a) for a in args], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, start_new_session=True,
            env=env)
        guard.add(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log()
            self.info = status_json(state_dir)["server"]
            if self.info and self.info.get("pid") == self.proc.pid:
                guard.add(self.info["nbdkit_pid"])
                return
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        terminate_pid(self.proc.pid)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def tls_server(clonectl, state_dir, psk_file, process_guard, tmp_path):
    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS")
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(), ["--tls-psk", psk_file],
                    tmp_path / "tls.out", process_guard)
    yield srv
    srv.stop()


def test_tls_client_with_the_key_reads_and_writes(tls_server, psk_file):
    h = _tls_client(tls_server.port, psk_file)
    assert h.get_tls_negotiated()
    h.pwrite(b"secret" * 100, 4096)
    assert h.pread(600, 4096) == b"secret" * 100
    h.shutdown()


def test_client_without_tls_gets_nothing(tls_server):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("a")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(tls_server.port))
    # Not even the list of exports.
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_opt_mode(True)
    try:
        h.connect_tcp("127.0.0.1", str(tls_server.port))
        with pytest.raises(nbd.Error):
            h.opt_list(lambda name, desc: 0)
    except nbd.Error:
        pass  # refused even earlier: fine


def test_client_with_a_wrong_key_gets_nothing(tls_server, tmp_path):
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    with pytest.raises(nbd.Error):
        _tls_client(tls_server.port, wrong)
    other_user = tmp_path / "bob.psk"
    other_user.write_text("bob:" + os.urandom(32).hex() + "\n")
    with pytest.raises(nbd.Error):
        _tls_client(tls_server.port, other_user, user="bob")


def test_tls_psk_file_must_exist_and_be_private(clonectl, state_dir, tmp_path,
                                                psk_file):
    clonectl("lu", "create", "a", "--size", str(MiB))
    proc = run_clonectl(state_dir, "serve", "--port", str(_free_port()),
                        "--tls-psk", str(tmp_path / "missing.psk"),
                        check=False)
    assert proc.returncode in (1, 2) and "missing.psk" in proc.stderr, \
        proc.stderr
    psk_file.chmod(0o644)
    proc = run_clonectl(state_dir, "serve", "--port", str(_free_port()),
                        "--tls-psk", str(psk_file), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "readable by others" in proc.stderr, proc.stderr
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o644
    status = run_clonectl(state_dir, "status", "--json", check=False)
    assert status.returncode == 3, status.stderr     # no server runs
    assert status.stdout.count('"server": null') == 1


# ---------------------------------------------------------------- X.509

@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path / "pki")


def _cert_server(clonectl, state_dir, certs, process_guard, out, *extra):
    """`serve --tls-certificates` (plus extra options) with LU "a"."""
    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS")
    clonectl("lu", "create", "a", "--size", str(MiB))
    return TcpServer(state_dir, _free_port(),
                     ["--tls-certificates", certs.server_dir] + list(extra),
                     out, process_guard)


@pytest.fixture
def cert_server(clonectl, state_dir, certs, process_guard, tmp_path):
    srv = _cert_server(clonectl, state_dir, certs, process_guard,
                       tmp_path / "tls-cert.out")
    yield srv
    srv.stop()


def _cert_client(port, cert_dir):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(cert_dir))
    h.set_export_name("a")
    h.connect_tcp("127.0.0.1", str(port))
    return h


def test_tls_certificates_client_trusting_the_ca_reads_and_writes(
        cert_server, certs, state_dir):
    assert cert_server.info["tls"] == "certificates"
    assert cert_server.info["tls_verify_peer"] is False
    assert cert_server.info["uri"].startswith("nbds://127.0.0.1:")
    h = _cert_client(cert_server.port, certs.client_dir)
    assert h.get_tls_negotiated()
    h.pwrite(b"x509" * 256, 8192)
    h.flush()
    assert h.pread(1024, 8192) == b"x509" * 256
    h.shutdown()
    with open(state_dir / "lus" / "a.img", "rb") as f:
        f.seek(8192)
        assert f.read(1024) == b"x509" * 256


def test_tls_certificates_refuse_plain_and_untrusting_clients(cert_server,
                                                              certs):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("a")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(cert_server.port))
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_opt_mode(True)
    h.connect_tcp("127.0.0.1", str(cert_server.port))
    with pytest.raises(nbd.Error):  # not even the list of exports
        h.opt_list(lambda name, desc: 0)
    del h  # disconnect now: a connected client makes the server stop slowly
    # A client that does not trust the server's CA stops at the handshake.
    with pytest.raises(nbd.Error) as e:
        _cert_client(cert_server.port, certs.untrusting_dir)
    assert "certificate" in str(e.value).lower(), e.value
    # The same client code with the right CA gets through (so the refusal
    # above is the certificate check, not a broken client).
    _cert_client(cert_server.port, certs.client_dir).shutdown()


@pytest.fixture
def verify_server(clonectl, state_dir, certs, process_guard, tmp_path):
    srv = _cert_server(clonectl, state_dir, certs, process_guard,
                       tmp_path / "tls-verify.out", "--tls-verify-peer")
    yield srv
    srv.stop()


def _refused_at_tls(port, cert_dir):
    """Assert a TLS client with cert_dir can neither open "a" nor list the
    exports."""
    with pytest.raises(nbd.Error):
        _cert_client(port, cert_dir).shutdown()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(cert_dir))
    h.set_opt_mode(True)
    names = []
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(port))
        h.opt_list(lambda name, desc: names.append(name))
    assert names == []
    del h  # closes the connection


def test_tls_verify_peer_admits_clients_with_a_certificate_of_the_ca(
        verify_server, certs):
    """--tls-verify-peer: a client certificate signed by the server's CA is
    required; without one, or with one signed by another CA, a client that
    trusts the server gets nothing.  Without the nbdkit option the
    certificate-less client of this test connects (as in the tests above),
    so the refusals below are the verification."""
    assert verify_server.info["tls"] == "certificates"
    assert verify_server.info["tls_verify_peer"] is True
    good = certs.client_with_certificate("host1.example.com", certs.ca)
    h = _cert_client(verify_server.port, good)
    assert h.get_tls_negotiated()
    h.pwrite(b"peer" * 128, 0)
    assert h.pread(512, 0) == b"peer" * 128
    h.shutdown()
    h = nbd.NBD()  # and it may list the exports
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(good))
    h.set_opt_mode(True)
    h.connect_tcp("127.0.0.1", str(verify_server.port))
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    assert names == ["a"]
    h.opt_abort()
    del h  # closes the connection
    # No client certificate (the CA-only directory that is enough for a
    # server without --tls-verify-peer).
    _refused_at_tls(verify_server.port, certs.client_dir)
    # A certificate signed by another CA.
    _refused_at_tls(verify_server.port, certs.client_with_certificate(
        "intruder.example.com", certs.other_ca))
    # The server still serves the good client after the refusals.
    _cert_client(verify_server.port, good).shutdown()


def test_tls_certificates_directory_is_checked(clonectl, state_dir, certs,
                                               psk_file, tmp_path):
    clonectl("lu", "create", "a", "--size", str(MiB))

    def refused(*args, status=1, match):
        proc = run_clonectl(state_dir, "serve", "--port", str(_free_port()),
                            *args, check=False)
        assert proc.returncode == status, proc.stderr
        assert match in proc.stderr and "Traceback" not in proc.stderr, \
            proc.stderr
        return proc

    refused("--tls-certificates", tmp_path / "nowhere",
            match="does not exist")
    refused("--tls-certificates", psk_file, match="not a directory")
    key = certs.server_dir / "server-key.pem"
    key.chmod(0o644)
    refused("--tls-certificates", certs.server_dir,
            match="server-key.pem is readable by others (mode 644)")
    key.chmod(0o640)            # its group is others too
    refused("--tls-certificates", certs.server_dir,
            match="server-key.pem is readable by others (mode 640)")
    key.chmod(0o600)
    key.rename(tmp_path / "key.pem")
    refused("--tls-certificates", certs.server_dir,
            match="server-key.pem: No such file")
    (tmp_path / "key.pem").rename(key)
    refused("--tls-certificates", certs.server_dir, "--tls-psk", psk_file,
            match="exclusive")
    refused("--tls-certificates", certs.server_dir, "--iscsi-portal",
            "127.0.0.1:{}".format(_free_port()), status=2,
            match="--iscsi-portal cannot be combined with --tls-certificates")
    refused("--tls-verify-peer", match="--tls-verify-peer needs "
            "--tls-certificates")
    refused("--tls-psk", psk_file, "--tls-verify-peer",
            match="--tls-verify-peer needs --tls-certificates")
    assert status_json(state_dir)["server"] is None


# ---------------------------------------------------------------- --allow

def _client_from(source, port, export="a", opt_mode=False):
    """A libnbd client whose connection comes from address source (any
    127.0.0.0/8 address is local on lo)."""
    s = socket.socket()
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
    except BaseException:
        s.close()
        raise
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_opt_mode(opt_mode)
    h.connect_socket(s.detach())  # libnbd owns the fd now
    return h


def _list_from(source, port):
    h = _client_from(source, port, opt_mode=True)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    return names


@pytest.fixture
def allow_server(clonectl, state_dir, process_guard, tmp_path):
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(),
                    ["--allow", "127.0.0.2", "--allow", "127.0.1.0/24"],
                    tmp_path / "allow.out", process_guard)
    yield srv
    srv.stop()


def test_allow_list_admits_listed_addresses_only(allow_server):
    assert allow_server.info["allow"] == ["127.0.0.2", "127.0.1.0/24"]
    for source in ("127.0.0.2", "127.0.1.9"):
        h = _client_from(source, allow_server.port)
        h.pwrite(source.encode().ljust(512, b"."), 0)
        assert h.pread(512, 0).startswith(source.encode())
        h.shutdown()
    log = allow_server.state_dir / "run" / "serve.log"
    for source in ("127.0.0.1", "127.0.0.3", "127.0.2.1"):
        with pytest.raises(nbd.Error):
            _client_from(source, allow_server.port)
        # Refused by the allow-list (not some other failure).
        assert serve_log_has(allow_server.state_dir, "client {} is not in "
                             "the --allow list".format(source)), \
            log.read_text()[-2000:]
    h = nbd.NBD()  # an ordinary client from 127.0.0.1 cannot list either
    h.set_opt_mode(True)
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(allow_server.port))
        h.opt_list(lambda name, desc: 0)


def test_without_allow_every_address_is_served(clonectl, state_dir,
                                               process_guard, tmp_path):
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(), [], tmp_path / "open.out",
                    process_guard)
    try:
        assert srv.info["allow"] is None
        for source in ("127.0.0.1", "127.0.0.3"):
            h = _client_from(source, srv.port)
            assert len(h.pread(512, 0)) == 512
            h.shutdown()
    finally:
        srv.stop()


def test_allow_values_are_checked(clonectl, state_dir, tmp_path):
    clonectl("lu", "create", "a", "--size", str(MiB))
    port = str(_free_port())
    for args, status, match in [
            (["--port", port, "--allow", "10.0.0.1/8"], 1, "host bits set"),
            (["--port", port, "--allow", "db1"], 1, "invalid --allow 'db1'"),
            (["--port", port, "--allow", "10.0.0.0/33"], 1, "invalid"),
            (["--socket", tmp_path / "s.sock", "--allow", "127.0.0.1"], 1,
             "--allow needs --port"),
            (["--port", port, "--allow", "127.0.0.1", "--iscsi-portal",
              "127.0.0.1:{}".format(_free_port())], 2,
             "--iscsi-portal cannot be combined with --allow"),
            (["--port", port, "--allow-export", "127.0.0.1"], 1,
             "invalid --allow-export '127.0.0.1': EXPORT= is missing"),
            (["--socket", tmp_path / "s.sock", "--allow-export",
              "a=127.0.0.1"], 1, "--allow-export needs --port"),
            (["--port", port, "--allow-export", "a=127.0.0.1",
              "--iscsi-portal", "127.0.0.1:{}".format(_free_port())], 2,
             "--iscsi-portal cannot be combined with --allow-export")]:
        proc = run_clonectl(state_dir, "serve", *args, check=False)
        assert proc.returncode == status, (args, proc.stderr)
        assert match in proc.stderr, (args, proc.stderr)
    assert status_json(state_dir)["server"] is None


# ---------------------------------------------------------------- --allow-export

def test_allow_export_values_are_parsed():
    from target import access, errors
    assert access.parse_export_rules(
        ["a=127.0.0.2", "a=10.0.0.0/8", "src@s1=::1"]) == {
        "a": [access.parse("127.0.0.2"), access.parse("10.0.0.0/8")],
        "src@s1": [access.parse("::1")]}
    for value, match in [("=127.0.0.1", "EXPORT= is missing"),
                         ("a=db1", "does not appear to be an IPv4 or IPv6"),
                         ("a=10.0.0.1/8", "host bits set"),
                         ("a b=127.0.0.1", "invalid name 'a b'"),
                         ("a@=127.0.0.1", "invalid name ''"),
                         ("a=", "does not appear")]:
        with pytest.raises(errors.InvalidAllowExport) as e:
            access.parse_export_rules([value])
        assert str(e.value).startswith(
            "invalid --allow-export {!r}: ".format(value)), str(e.value)
        assert match in str(e.value), str(e.value)
        assert e.value.errno == errno.EINVAL
        del e


def test_export_rules_follow_exact_names_then_the_source():
    from target import access
    rules = access.ExportRules(["a=127.0.0.2,10.0.0.0/8", "a=192.0.2.1",
                                "a@s1=192.0.2.9"])
    ip = access.ipaddress.ip_address
    assert rules.permits("a", ip("10.1.2.3"))
    assert rules.permits("a", ip("192.0.2.1"))  # rules for one export add up
    assert rules.permits("a", ip("::ffff:127.0.0.2"))
    assert not rules.permits("a", ip("127.0.0.1"))
    assert not rules.permits("a", None)  # not an IP socket
    assert rules.permits("b", ip("127.0.0.1"))  # no rule: open
    assert rules.permits("ab", ip("127.0.0.1"))
    # SRC@NAME follows SRC unless it has rules of its own.
    assert rules.rule_for("a@s2")[0] == "a"
    assert not rules.permits("a@s2", ip("127.0.0.1"))
    assert rules.permits("a@s2", ip("10.9.9.9"))
    assert rules.rule_for("a@s1")[0] == "a@s1"
    assert rules.permits("a@s1", ip("192.0.2.9"))
    assert not rules.permits("a@s1", ip("10.9.9.9"))
    # The iSCSI gateway's name for an export is the export.
    assert not rules.permits("iscsi-gateway:a", ip("127.0.0.1"))
    assert rules.permits("iscsi-gateway:a", ip("10.1.2.3"))
    assert rules.rule_for("iscsi-gateway:0123abcd:a")[0] == "a"
    # A clone shows its Source's data: it follows the Source unless it has
    # rules of its own, and so do its gateway name and frozen images.
    rules = access.ExportRules(["a=127.0.0.2", "cb=192.0.2.1"],
                               lambda: {"ca": "a", "cb": "a", "cz": "z"})
    assert rules.rule_for("ca")[0] == "a"
    assert not rules.permits("ca", ip("127.0.0.1"))
    assert rules.permits("ca", ip("127.0.0.2"))
    assert rules.rule_for("cb")[0] == "cb"
    assert not rules.permits("cb", ip("127.0.0.2"))
    assert rules.rule_for("iscsi-gateway:s:ca")[0] == "a"
    assert rules.rule_for("ca@s1")[0] == "a"
    assert rules.rule_for("cz") == (None, None)
    assert rules.permits("cz", ip("127.0.0.1"))


@pytest.fixture
def export_rule_server(clonectl, state_dir, process_guard, tmp_path):
    clonectl("lu", "create", "a", "--size", str(MiB))
    clonectl("lu", "create", "b", "--size", str(MiB))
    clonectl("lu", "create", "c", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(),
                    ["--allow", "127.0.0.0/24",
                     "--allow-export", "a=127.0.0.2/32",
                     "--allow-export", "b=127.0.0.0/8"],
                    tmp_path / "allow-export.out", process_guard)
    yield srv
    srv.stop()


def _connections(state_dir, name):
    return [lu for lu in status_json(state_dir)["lus"]
            if lu["name"] == name][0]["connections"]


def test_allow_export_keeps_other_networks_away_from_one_export(
        export_rule_server, state_dir):
    """Rules: a=127.0.0.2/32 (refuses 127.0.0.1), b=127.0.0.0/8 (admits
    it), c has none; server-wide --allow 127.0.0.0/24."""
    srv = export_rule_server
    assert srv.info["allow_export"] == {"a": ["127.0.0.2"],
                                        "b": ["127.0.0.0/8"]}
    assert srv.info["allow"] == ["127.0.0.0/24"]
    log = state_dir / "run" / "serve.log"
    marker = b"only from 127.0.0.2".ljust(512, b".")
    # From the listed address: every export, all listed.
    h = _client_from("127.0.0.2", srv.port)
    h.pwrite(marker, 0)
    h.flush()
    h.shutdown()
    assert _list_from("127.0.0.2", srv.port) == ["a", "b", "c"]
    # From 127.0.0.1 (an ordinary connect_tcp): "a" is refused when opened
    # and not named in the list of exports; "b" (its /8 rule admits the
    # address) and "c" (no rule) are served.
    for name in ("a", "iscsi-gateway:a"):
        h = nbd.NBD()
        h.set_export_name(name)
        with pytest.raises(nbd.Error):
            h.connect_tcp("127.0.0.1", str(srv.port))
        del h
    assert serve_log_has(state_dir, "client 127.0.0.1 may not open export "
                         "'a': it is not in the --allow-export list for "
                         "'a'"), \
        log.read_text()[-2000:]
    for name in ("b", "c"):
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_tcp("127.0.0.1", str(srv.port))
        h.pwrite(name.encode() * 512, 0)
        assert h.pread(512, 0) == name.encode() * 512
        h.shutdown()
    assert _list_from("127.0.0.1", srv.port) == ["b", "c"]
    # The refusals changed nothing: no connection counted, data intact.
    assert _connections(state_dir, "a") == 0
    with open(state_dir / "lus" / "a.img", "rb") as f:
        assert f.read(512) == marker
    # The server-wide --allow still applies first, so a client must pass
    # both: from 127.0.1.1 (inside b's /8, outside 127.0.0.0/24) "b" is
    # refused before the handshake.
    with pytest.raises(nbd.Error):
        _client_from("127.0.1.1", srv.port, export="b")
    assert serve_log_has(state_dir,
                         "client 127.0.1.1 is not in the --allow list")


def test_allow_export_rules_of_a_source_cover_its_frozen_image(
        export_rule_server, state_dir):
    srv = export_rule_server
    h = _client_from("127.0.0.2", srv.port)
    h.pwrite(b"frozen".ljust(512, b"."), 0)
    h.flush()
    h.shutdown()
    run_clonectl(state_dir, "session", "create", "a", "s1", "--dest",
                 "nbd://127.0.0.1:{}/b".format(srv.port))
    run_clonectl(state_dir, "session", "mark", "s1", "--export")
    assert _list_from("127.0.0.2", srv.port) == ["a", "a@s1", "b", "c"]
    assert _list_from("127.0.0.1", srv.port) == ["b", "c"]
    h = nbd.NBD()
    h.set_export_name("a@s1")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(srv.port))
    del h
    h = _client_from("127.0.0.2", srv.port, export="a@s1")
    assert h.pread(512, 0) == b"frozen".ljust(512, b".")
    h.shutdown()


def test_allow_export_rules_of_a_source_cover_its_fractured_clone(
        export_rule_server, state_dir):
    """A fractured clone shows its Source's data under its own name: without
    rules of its own it follows the Source's (a=127.0.0.2/32)."""
    srv = export_rule_server
    marker = b"fractured".ljust(512, b".")
    h = _client_from("127.0.0.2", srv.port)
    h.pwrite(marker, 0)
    h.flush()
    h.shutdown()
    run_clonectl(state_dir, "clone", "add", "a", "ca")
    run_clonectl(state_dir, "clone", "sync", "ca", "--wait")
    run_clonectl(state_dir, "clone", "fracture", "ca")
    assert _list_from("127.0.0.2", srv.port) == ["a", "b", "c", "ca"]
    assert _list_from("127.0.0.1", srv.port) == ["b", "c"]
    h = nbd.NBD()
    h.set_export_name("ca")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(srv.port))
    del h
    assert serve_log_has(state_dir,
                         "client 127.0.0.1 may not open export 'ca': it is "
                         "not in the --allow-export list for 'a'")
    h = _client_from("127.0.0.2", srv.port, export="ca")
    assert h.pread(512, 0) == marker
    h.shutdown()
