"""libiscsi's conformance suite against a served LU: the families the
docs/iscsi.md claims (a short CI subset; the full run is in docs/iscsi.md)."""

import subprocess

from tests.support.iscsilib import needs_iscsi

pytestmark = needs_iscsi

# A subset of the families that pass in full (docs/iscsi.md); each run
# takes well under a second.
CI_FAMILIES = ["SCSI.TestUnitReady", "SCSI.Inquiry", "SCSI.ReadCapacity10",
               "SCSI.ReadCapacity16", "SCSI.Read10", "SCSI.Read16",
               "SCSI.Write10", "SCSI.Write16", "SCSI.WriteVerify16",
               "SCSI.Verify16", "SCSI.Unmap", "iSCSI.iSCSIcmdsn",
               "iSCSI.iSCSIResiduals", "iSCSI.iSCSITMF"]


def run_suite(url, families):
    proc = subprocess.run(["iscsi-test-cu", "--dataloss", "--normal",
                           "--test=" + ",".join(families), url],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    tests = [line.split() for line in out.splitlines()
             if line.strip().startswith("tests ")]
    return proc.returncode, out, tests


def test_claimed_conformance_families_pass(iscsi_server, clonectl):
    clonectl("lu", "create", "d1", "--size", "64M")
    srv = iscsi_server()
    rc, out, tests = run_suite(srv.url("d1"), CI_FAMILIES)
    assert rc == 0, out
    assert "[FAILED]" not in out, out
    # "tests  Total Ran Passed Failed Inactive": every test ran and passed.
    assert len(tests) == 1, out
    total, ran, passed, failed = map(int, tests[0][1:5])
    assert total == ran == passed and failed == 0, out
    assert total >= 50, out  # the families really ran (not a typo'd name)


def test_suite_reports_failures_of_a_family_tgtd_fails(iscsi_server,
                                                       clonectl):
    """The check above can fail: iSCSIdatasn fails on tgtd (it accepts
    invalid DataSNs, raw file or not), and run_suite sees it."""
    clonectl("lu", "create", "d1", "--size", "8M")
    srv = iscsi_server()
    rc, out, tests = run_suite(srv.url("d1"), ["iSCSI.iSCSIdatasn"])
    assert rc != 0
    assert int(tests[0][4]) >= 1, out
