"""The read-only status page of `serve --metrics`, rendered by headless
Chromium while a slow protected restore runs: the map picture moves and
the numbers are those of `status --json`."""

import html
import json
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.support.cli import status_json
from tests.support.sockets import free_port

MiB = 1 << 20
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/setup "
    "installs it)")


def render(address):
    """The page's DOM after its script fetched /status.json and drew."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", "--virtual-time-budget=2000",
         "--dump-dom", "http://{}/".format(address)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def picture(dom, clone):
    m = re.search(r'<svg class="map"[^>]*data-clone="{}"[^>]*>(.*?)</svg>'
                  .format(re.escape(clone)), dom, re.S)
    assert m, dom[-3000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(0)[:400]))
    rects = re.findall(r'<rect class="(\w+)" x="([\d.]+)" width="([\d.]+)"',
                       m.group(1))
    return attrs, rects


def test_status_page_follows_a_slow_restore(clonectl, server_factory,
                                            state_dir):
    clonectl("lu", "create", "src", "--size", "16M")
    with open(state_dir / "lus" / "src.img", "r+b") as f:
        f.write(b"s" * 16 * MiB)
    clonectl("clone", "add", "src", "c1")
    port = free_port()
    srv = server_factory(extra_args=["--metrics", "127.0.0.1:{}".format(
        port)])
    address = srv.info["metrics"]
    clonectl("clone", "sync", "c1", "--wait")
    clonectl("clone", "fracture", "c1")
    clonectl("clone", "restore", "c1", "--full", "--rate", "1M")

    first = render(address)
    middle = status_json(state_dir)
    time.sleep(1.5)
    second = render(address)

    a1, rects1 = picture(first, "c1")
    a2, rects2 = picture(second, "c1")
    c = middle["clones"][0]
    assert c["state"] == "restoring", c
    pending_now = c["restore"]["pending_extents"]
    total = c["extents_total"]
    # Pending extents only go down: first load >= status >= second load,
    # and the restore (1 MiB/s of 16 MiB) moved between the loads.
    assert int(a1["pending"]) >= pending_now >= int(a2["pending"]), \
        (a1, pending_now, a2)
    assert int(a2["pending"]) < int(a1["pending"]) < total, (a1, a2)
    for attrs in (a1, a2):
        assert int(attrs["pending"]) + int(attrs["clean"]) + \
            int(attrs["protected"]) == total, attrs
    # The picture changed: blue (pending) cells gave way to clean ones.
    assert rects1 != rects2
    width = {kind: sum(float(w) for k, _, w in rects if k == kind)
             for rects in (rects2,) for kind in ("clean", "pending")}
    assert width["clean"] > 0 and width["pending"] > 0, rects2
    assert re.search(r'data-clone="c1" data-state="restoring"', second)

    # The numbers of the tables are those of status --json.
    text = html.unescape(re.sub(r"(?:<[^>]+>)+", "|", second))
    assert "|src|16MiB|rw|yes|0|" in text, text[-3000:]
    assert "|restore|c1|" in text, text[-3000:]
    assert "|pending {}, protected 0|".format(a2["pending"]) in text

    with urllib.request.urlopen("http://{}/status.json".format(address),
                                timeout=10) as r:
        page = json.load(r)
    m = page["maps"]["c1"]
    assert m["extents"] == total and m["state"] == "restoring"
    assert sum(e - s for s, e in m["runs"]["pending"]) >= \
        m["counts"]["pending"] > 0
    assert page["time"].endswith("Z")
