"""Access: NBD over TCP with TLS required (pre-shared keys or X.509
certificates), so a client without the key or without trust in the CA gets
nothing, not even the export list; client certificates verified
(--tls-verify-peer); an allow-list of client addresses (--allow, checked in
the plugin's preconnect); the control socket is the owner's only
(tests/unit/test_control.py checks its mode)."""

import os
import socket
import stat
import subprocess
import time

import pytest

from conftest import CLONECTL, MiB, run_clonectl, status_json, terminate_pid

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
    assert run_clonectl(state_dir, "status", "--json").stdout.count(
        '"server": null') == 1


# ---------------------------------------------------------------- X.509

def _openssl(cwd, *args):
    subprocess.run(["/usr/bin/openssl"] + list(args), cwd=str(cwd),
                   check=True, capture_output=True, timeout=30)


def _make_ca(path, name):
    path.mkdir(parents=True)
    _openssl(path, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=" + name,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return path


class Certs:
    """A CA, a server certificate for 127.0.0.1 signed by it (server_dir,
    as nbdkit wants it), a client directory trusting that CA, and one
    trusting another CA only."""

    def __init__(self, base):
        self.base = base
        self.ca = ca = _make_ca(base / "ca", "clonectl test CA")
        self.other_ca = other = _make_ca(base / "other-ca", "someone else")
        self.server_dir = base / "server"
        self.server_dir.mkdir()
        (base / "ext.cnf").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "basicConstraints=CA:FALSE\n")
        _openssl(self.server_dir, "req", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 "server-key.pem", "-out", str(base / "server.csr"), "-subj",
                 "/CN=localhost")
        _openssl(self.server_dir, "x509", "-req", "-in",
                 str(base / "server.csr"), "-CA", str(ca / "ca-cert.pem"),
                 "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial",
                 "-CAserial", str(base / "ca.srl"), "-out", "server-cert.pem",
                 "-days", "2", "-extfile", str(base / "ext.cnf"))
        (self.server_dir / "ca-cert.pem").write_bytes(
            (ca / "ca-cert.pem").read_bytes())
        (self.server_dir / "server-key.pem").chmod(0o600)
        self.client_dir = base / "client"
        self.client_dir.mkdir()
        (self.client_dir / "ca-cert.pem").write_bytes(
            (ca / "ca-cert.pem").read_bytes())
        self.untrusting_dir = base / "client-other"
        self.untrusting_dir.mkdir()
        (self.untrusting_dir / "ca-cert.pem").write_bytes(
            (other / "ca-cert.pem").read_bytes())

    def client_with_certificate(self, name, ca):
        """A libnbd certificates directory trusting the server's CA and
        holding client-cert.pem (CN=name, signed by ca) and client-key.pem."""
        d = self.base / ("client-" + name)
        d.mkdir()
        (d / "ca-cert.pem").write_bytes((self.ca / "ca-cert.pem").read_bytes())
        ext = self.base / "client-ext.cnf"
        ext.write_text("extendedKeyUsage=clientAuth\n"
                       "keyUsage=critical,digitalSignature\n"
                       "basicConstraints=CA:FALSE\n")
        csr = self.base / (name + ".csr")
        _openssl(d, "req", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                 "client-key.pem", "-out", str(csr), "-subj", "/CN=" + name)
        _openssl(d, "x509", "-req", "-in", str(csr), "-CA",
                 str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
                 "-CAcreateserial", "-CAserial", str(self.base / "ca.srl"),
                 "-out", "client-cert.pem", "-days", "2", "-extfile",
                 str(ext))
        (d / "client-key.pem").chmod(0o600)
        return d


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path / "pki")


@pytest.fixture
def cert_server(clonectl, state_dir, certs, process_guard, tmp_path):
    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS")
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(),
                    ["--tls-certificates", certs.server_dir],
                    tmp_path / "tls-cert.out", process_guard)
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
    if not nbd.NBD().supports_tls():
        pytest.skip("libnbd without TLS")
    clonectl("lu", "create", "a", "--size", str(MiB))
    srv = TcpServer(state_dir, _free_port(),
                    ["--tls-certificates", certs.server_dir,
                     "--tls-verify-peer"],
                    tmp_path / "tls-verify.out", process_guard)
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

def _client_from(source, port):
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
    h.set_export_name("a")
    h.connect_socket(s.detach())  # libnbd owns the fd now
    return h


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
        assert "client {} is not in the --allow list".format(source) in \
            log.read_text(), log.read_text()[-2000:]
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
             "--iscsi-portal cannot be combined with --allow")]:
        proc = run_clonectl(state_dir, "serve", *args, check=False)
        assert proc.returncode == status, (args, proc.stderr)
        assert match in proc.stderr, (args, proc.stderr)
    assert status_json(state_dir)["server"] is None
