"""The test suite's fixtures and helpers are plugin modules in
tests/support/, loaded here for every test (see docs/testing.md).

Test modules import helpers from tests.support.* and never from one
another; fixtures need no import at all.
"""

pytest_plugins = [
    "tests.support.tiers",
    "tests.support.asserts",
    "tests.support.processes",
    "tests.support.devices",
    "tests.support.cli",
    "tests.support.servers",
    "tests.support.nbdclient",
    "tests.support.clonelib",
    "tests.support.sessionlib",
    "tests.support.iscsilib",
    "tests.support.netlib",
    "tests.support.twonodes",
    "tests.support.guestlib",
]
