"""The replication channel between two `clonectl serve`, seen from the
network: a sniffing relay (tests/support/relay.py) between the primary's
link and the secondary's `--replication-port` records every byte.

- with `--replication-tls-certificates` on the secondary and `rsg link
  --tls-certificates` on the primary, neither the token nor a data pattern
  written to the volume appears in the captured bytes, and the secondary
  holds the pattern;
- a plain link to that secondary is refused with a message naming TLS;
- `serve --replication-token-file` with a file others can read exits 1
  with the fix, and so does `rsg link --token-file`.
(Engine-level twins, faster and without TLS too: tests/engine/
test_rsg_channel.py.)
"""

import json
import time

import pytest

from tests.support.cli import run_clonectl
from tests.support.relay import SniffingRelay
from tests.support.sockets import free_port
from tests.support.tlscerts import Certs
from tests.support.tools import qemu_io, read_all

MiB = 1 << 20
TOKEN = "replication-token-0123456789"
OFFSET = 1 * MiB
# 0x5a... as qemu-io's write -P writes it; 64 KiB of it.
PATTERN = b"\x5a" * (64 << 10)


def link_status(state_dir):
    st = json.loads(run_clonectl(state_dir, "rsg", "status", "g",
                                 "--json").stdout)
    return (st.get("links") or [{}])[0]


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting for " + what)


@pytest.fixture
def pair(tmp_path, server_factory, stop_at_teardown):
    certs = Certs(tmp_path / "certs")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        run_clonectl(d, "lu", "create", "v1", "--size", str(4 * MiB))
    port = free_port()
    secondary = server_factory(
        state_dir=b, socket=tmp_path / "b.sock",
        extra_args=["--replication-port", str(port),
                    "--replication-token-file", str(token),
                    "--replication-tls-certificates",
                    str(certs.server_dir)])
    relay = stop_at_teardown(SniffingRelay("127.0.0.1", port))
    primary = server_factory(state_dir=a, socket=tmp_path / "a.sock")
    run_clonectl(a, "rsg", "create", "g", "--volume", "v1",
                 "--srl-size", "1M")
    return {"a": a, "b": b, "primary": primary, "secondary": secondary,
            "relay": relay, "token": token, "certs": certs, "tmp": tmp_path}


def test_tls_link_hides_token_and_data(pair):
    p = pair
    run_clonectl(p["a"], "rsg", "link", "g", "--secondary", p["relay"].addr,
                 "--mode", "sync", "--token-file", p["token"],
                 "--tls-certificates", p["certs"].client_dir)
    qemu_io(p["primary"].uri("v1"), "write -P 0x5a {} 64k".format(OFFSET))
    wait_for(lambda: link_status(p["a"]).get("state") == "replicating" and
             link_status(p["a"]).get("lag_updates") == 0, 30,
             "the link to catch up")
    image = read_all(p["secondary"].uri("v1"))
    assert image[OFFSET:OFFSET + len(PATTERN)] == PATTERN
    captured = p["relay"].captured()
    assert len(captured) > len(PATTERN)
    assert TOKEN.encode() not in captured
    assert PATTERN[:32] not in captured


def test_plain_link_to_a_tls_secondary_is_refused(pair):
    p = pair
    run_clonectl(p["a"], "rsg", "link", "g", "--secondary", p["relay"].addr,
                 "--token-file", p["token"])
    qemu_io(p["primary"].uri("v1"), "write -P 0x5a {} 64k".format(OFFSET))
    link = wait_for(lambda: (lambda l: l if "TLS" in (l.get("error") or "")
                             else None)(link_status(p["a"])), 20,
                    "a refusal naming TLS")
    assert link["state"] == "failed", link
    assert PATTERN[:32] not in p["relay"].captured()


def test_token_files_readable_by_others_are_refused(pair):
    p = pair
    loose = p["tmp"] / "loose"
    loose.write_text(TOKEN + "\n")
    loose.chmod(0o640)
    r = run_clonectl(p["a"], "rsg", "link", "g", "--secondary",
                     p["relay"].addr, "--token-file", loose, check=False)
    assert r.returncode == 1 and "chmod 600 {}".format(loose) in r.stderr
    assert link_status(p["a"]) == {}
    r = run_clonectl(p["tmp"] / "C", "serve", "--socket",
                     str(p["tmp"] / "c.sock"), "--replication-port",
                     str(free_port()), "--replication-token-file", loose,
                     check=False)
    assert r.returncode == 1 and "chmod 600 {}".format(loose) in r.stderr
