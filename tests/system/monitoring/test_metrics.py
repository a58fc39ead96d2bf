"""`clonectl serve --metrics`: Prometheus text from one status snapshot."""

import json
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import run_clonectl, status_json
from tests.support.sockets import free_port

MiB = 1 << 20


def scrape(address, path="/metrics"):
    with urllib.request.urlopen("http://{}{}".format(address, path),
                                timeout=10) as r:
        return r.headers.get("Content-Type"), r.read().decode()


def write(uri, offset, data):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(data, offset)
    h.flush()
    h.shutdown()


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics_server(server_factory, clonectl, state_dir):
    clonectl("lu", "create", "src", "--size", "8M")
    clonectl("lu", "create", "dst", "--size", "8M")
    clonectl("clone", "add", "src", "c1")
    clonectl("clone", "add", "src", "c2")
    port = free_port()
    srv = server_factory(extra_args=["--metrics", str(port)])
    assert srv.info["metrics"] == "127.0.0.1:{}".format(port)
    return srv


def test_metrics_match_status_json(metrics_server, clonectl, state_dir):
    srv = metrics_server
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")
    clonectl("session", "create", "src", "s1", "--dest", srv.uri("dst"))
    write(srv.uri("src"), 1 * MiB, b"w" * MiB)
    ctype, text = scrape(srv.info["metrics"])
    assert ctype.startswith("text/plain; version="), ctype
    m = samples(text)
    st = status_json(state_dir)
    assert m[("clonectl_up", ())] == 1
    for lu in st["lus"]:
        assert m[("clonectl_lu_size_bytes", (("lu", lu["name"]),))] == \
            lu["size"]
        assert m[("clonectl_export_connections",
                  (("export", lu["name"]),))] == lu["connections"]
    for c in st["clones"]:
        key = (("clone", c["name"]), ("source", "src"))
        assert m[("clonectl_clone_dirty_bytes", key)] == c["bytes_dirty"]
        assert m[("clonectl_clone_state", key + (("state", c["state"]),))] \
            == 1
    assert m[("clonectl_clone_dirty_bytes",
              (("clone", "c2"), ("source", "src")))] == 8 * MiB
    assert m[("clonectl_job_done_bytes",
              (("clone", "c1"), ("operation", "sync")))] == 8 * MiB
    assert m[("clonectl_job_total_bytes",
              (("clone", "c1"), ("operation", "sync")))] == 8 * MiB
    s1 = st["sessions"][0]
    assert m[("clonectl_session_tracked_bytes",
              (("session", "s1"), ("source", "src")))] == \
        s1["tracked_extents"] * s1["granularity"] == 1 * MiB
    assert m[("clonectl_clone_dirty_bytes",
              (("clone", "c1"), ("source", "src")))] == 1 * MiB
    assert m[("clonectl_session_pending_bytes",
              (("session", "s1"), ("source", "src")))] == 0
    assert m[("clonectl_errors", (("kind", "recovery"),))] == 0

    # The mark shows in the next scrape.
    run_clonectl(state_dir, "session", "mark", "s1")
    m = samples(scrape(srv.info["metrics"])[1])
    assert m[("clonectl_session_marked",
              (("session", "s1"), ("source", "src")))] == 1
    s1 = status_json(state_dir)["sessions"][0]
    # The first transfer to a new destination sends everything.
    assert m[("clonectl_session_pending_bytes",
              (("session", "s1"), ("source", "src")))] == \
        s1["extents_to_send"] * s1["granularity"] == 8 * MiB


def test_metrics_during_a_restore_show_copy_on_demand(metrics_server,
                                                      clonectl, state_dir):
    srv = metrics_server
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")
    # Every extent of c1 differs: a restore with 64K/s has work left.
    run_clonectl(state_dir, "clone", "restore", "c1", "--full", "--rate",
                 "64K")
    m = samples(scrape(srv.info["metrics"])[1])
    st = json.loads(run_clonectl(state_dir, "clone", "status", "c1",
                                 "--json").stdout)
    pending = m[("clonectl_restore_pending_bytes", (("clone", "c1"),))]
    assert 0 < pending <= 8 * MiB
    assert pending >= st["restore"]["pending_extents"] * st["granularity"]
    assert m[("clonectl_cod_requests_total", (("clone", "c1"),))] == 0
    assert m[("clonectl_job_running",
              (("clone", "c1"), ("operation", "restore")))] == 1


def test_metrics_port_serves_nothing_else(metrics_server):
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(metrics_server.info["metrics"], "/nope")
    assert e.value.code == 404


def test_metrics_address_defaults_to_loopback_and_bad_ones_are_refused(
        clonectl, tmp_path):
    clonectl("lu", "create", "a", "--size", "1M")
    proc = clonectl("serve", "--metrics", "host:notaport", check=False)
    assert proc.returncode == 1 and "--metrics" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_start_failing_after_the_metrics_port_is_bound_exits(clonectl,
                                                               tmp_path):
    """--metrics binds its port before nbdkit starts (a port in use fails
    the start at once); a start that fails after that, here on an NBD
    socket in a missing directory, exits with its error rather than
    waiting for the metrics server that never ran."""
    clonectl("lu", "create", "a", "--size", "1M")
    try:
        proc = clonectl("serve", "--socket", tmp_path / "missing" / "nbd.sock",
                        "--metrics", free_port(), check=False, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("clonectl serve did not exit after its start failed")
    assert proc.returncode == 1 and "nbd.sock" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
