"""docs/man/ is exactly what scripts/manpages writes from the click
commands: a changed --help without regenerated pages fails here."""

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.support.cli import REPO
from target.cli import main

MAN_DIR = REPO / "docs" / "man"


def _generate(out):
    subprocess.run([sys.executable, str(REPO / "scripts" / "manpages"),
                    "--out", str(out)], check=True, capture_output=True,
                   text=True, timeout=60)
    return {p.name: p.read_text() for p in sorted(out.glob("*.1"))}


def test_docs_man_is_what_the_commands_say(tmp_path):
    fresh = _generate(tmp_path / "man")
    committed = {p.name: p.read_text() for p in sorted(MAN_DIR.glob("*.1"))}
    stale = sorted(set(committed) ^ set(fresh))
    changed = sorted(n for n in set(committed) & set(fresh)
                     if committed[n] != fresh[n])
    assert not stale and not changed, (
        "docs/man/ disagrees with the commands (missing or extra: {}, "
        "changed: {}); run scripts/manpages".format(stale, changed))


def _leaf_commands(group, path):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, path + [name])
        else:
            yield path + [name], cmd


def test_every_command_and_option_has_its_page(tmp_path):
    fresh = _generate(tmp_path / "man")
    leaves = list(_leaf_commands(main, []))
    assert len(leaves) > 20
    for path, cmd in leaves:
        page = fresh["-".join(["clonectl"] + path) + ".1"]
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt.replace("-", "\\-") in page, (path, opt)
        helptext = CliRunner().invoke(main, path + ["--help"]).output
        first = cmd.help.strip().split("\n")[0]
        assert first in helptext
        assert " ".join(first.split()).replace("-", "\\-") in \
            " ".join(page.split())


def test_written_pages_render_with_man(tmp_path):
    if not shutil.which("man"):
        pytest.skip("man is not installed (package man-db)")
    fresh = _generate(tmp_path / "man")
    assert "clonectl-lu-create.1" in fresh
    out = subprocess.run(["man", "--warnings", "-l",
                          str(tmp_path / "man" / "clonectl-lu-create.1")],
                         capture_output=True, text=True, timeout=60,
                         env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin",
                              "MANPAGER": "cat", "PAGER": "cat"})
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "clonectl lu create [OPTIONS] NAME" in out.stdout
    assert "--read-only" in out.stdout
