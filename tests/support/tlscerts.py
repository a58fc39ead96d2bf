"""X.509 material for TLS tests, made with openssl: a CA, a server
directory as `--tls-certificates DIR` wants it (ca-cert.pem,
server-cert.pem, server-key.pem, for 127.0.0.1 and localhost) and client
directories (ca-cert.pem of the CA they trust, and a client certificate
when asked for one)."""

import subprocess


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
    """server_dir: the server's directory; client_dir: trusts the CA that
    signed it; untrusting_dir: trusts another CA only."""

    def __init__(self, base):
        base.mkdir(parents=True, exist_ok=True)
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
