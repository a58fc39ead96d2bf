"""The Python programs of scripts/ (torture.py, powerfs.py) as modules:
scripts/ is not a package and is not put on sys.path.  `needs_powerfs`
marks the tests that mount scripts/powerfs.py."""

import importlib.util
import os
import sys

import pytest

from tests.support.cli import REPO


def load(name):
    """scripts/NAME.py, imported once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "scripts" / (name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


needs_powerfs = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0,
    reason="mounts scripts/powerfs.py, a FUSE file system: needs /dev/fuse "
    "and root")
