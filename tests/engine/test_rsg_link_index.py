"""A link's DCM file is named by the index it was given when it was added,
saved in its record: a restart opens each link's own DCM, and two links
never share one."""

import json

from tests.support.rsgpair import MiB, pair  # noqa: F401
from tests.support.rsgmodel import wait_for
from target.target import Target


def test_links_sharing_an_index_in_the_record_get_distinct_dcms(pair):
    p = pair(size=4 * MiB)
    p.link_up()
    p.check_identical()
    p.ta.rsg_detach("g", p.addr)
    p.ta.rsg_link("g", "127.0.0.1:1", "async", p.tok)
    g = p.ta.rsgs["g"]
    assert [l.index for l in g.links] == [0, 1]
    p.ta.close()
    # A record naming one DCM file for both links.
    path = g.files.record
    with open(path) as f:
        rec = json.load(f)
    assert [l["index"] for l in rec["links"]] == [0, 1]
    rec["links"][1]["index"] = 0
    with open(path, "w") as f:
        json.dump(rec, f)
    p.ta = Target(p.A)
    p.ta.start()
    g = p.ta.rsgs["g"]
    a, b = g.links
    assert a.index == 0 and b.index == 1
    assert a.dcm.count() == 0
    assert b.dcm.count() == b.dcm.extents and b.logging
    assert any("belongs to another link" in m for m in g.problems)
    # Each writes its own file: a change marks the detached link's DCM
    # only once (a shared file would show it in the other).
    p.write(0, b"\x01" * 4096)
    assert a.dcm.count() == 1
    assert g.record()[0]["links"][1]["index"] == 1


def test_record_without_index_numbers_links_by_position(pair):
    p = pair(size=4 * MiB)
    p.link_up()
    p.check_identical()
    g = p.ta.rsgs["g"]
    p.ta.rsg_detach("g", p.addr)
    p.write(0, b"\x01" * 4096)
    assert g.links[0].dcm.count() == 1
    p.ta.close()
    path = g.files.record
    with open(path) as f:
        rec = json.load(f)
    del rec["links"][0]["index"]
    with open(path, "w") as f:
        json.dump(rec, f)
    p.ta = Target(p.A)
    p.ta.start()
    link = p.ta.rsgs["g"].links[0]
    assert link.index == 0 and link.dcm.count() == 1
    p.ta.rsg_attach("g", p.addr)
    wait_for(p.replicating, 30, "replicating", link.status)
    p.check_identical()
