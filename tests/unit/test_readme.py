"""The README's two commands are the ones CI and the scripts use, and every
clonectl command line shown in README.md and docs/*.md is one the CLI
accepts."""

import re
import shlex
import subprocess

import pytest
from click.testing import CliRunner

from tests.support.cli import REPO
from target.cli import main

DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def _code_blocks(text):
    """The bodies of the shell code blocks of a markdown text."""
    blocks, body, lang = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, lang = [], line[3:].strip()
            else:
                if lang in ("", "sh", "bash"):
                    blocks.append("\n".join(body) + "\n")
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = _code_blocks(section)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()
                if line.split("#")[0].strip()]
    assert commands == ["scripts/demo", "scripts/test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text()
          .splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "exec scripts/test"


def _setup_calls(script):
    text = (REPO / "scripts" / script).read_text()
    # The lines that run it (a line that prints its name is not a call).
    return [line.strip() for line in text.splitlines()
            if line.lstrip().startswith('"$repo/scripts/setup"')]


def test_scripts_set_up_what_they_need():
    assert _setup_calls("test") == ['"$repo/scripts/setup" --test']
    assert _setup_calls("demo") == ['"$repo/scripts/setup"']
    test_script = (REPO / "scripts" / "test").read_text()
    assert test_script.index("scripts/setup") < test_script.index("-m pytest")


def test_fast_tier_is_documented_and_is_unit_and_engine():
    test_script = (REPO / "scripts" / "test").read_text()
    assert "--fast) args+=(-n auto tests/unit tests/engine) ;;" in test_script
    for doc in ("README.md", "docs/testing.md"):
        assert "scripts/test --fast" in (REPO / doc).read_text(), doc


def _packages(*args):
    out = subprocess.run([str(REPO / "scripts" / "setup"), *args, "--list"],
                         capture_output=True, text=True, check=True,
                         timeout=30)
    return out.stdout.split()


def test_serving_setup_leaves_out_the_test_tools():
    serve, test = _packages(), _packages("--test")
    assert set(serve) < set(test)
    for tool in ("fio", "qemu-system-x86", "ruby", "libiscsi-bin",
                 "qemu-block-extra", "openssl"):
        assert tool in test and tool not in serve
    # scripts/demo uses qemu-img, nbdinfo and nbdcopy; serve --iscsi-portal
    # tgtd and fusermount3.
    for package in ("nbdkit", "nbdkit-plugin-python", "python3-libnbd",
                    "libnbd-bin", "qemu-utils", "tgt", "fuse3"):
        assert package in serve
    readme = (REPO / "README.md").read_text()
    for package in serve:
        assert package in readme, package


def _command_lines(text):
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r";|&&|\|", line.split("#")[0]):
                part = re.sub(r"\[[^\]]*\]", "", part).strip()
                if part.startswith("clonectl "):
                    yield part


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_command_lines_parse(doc):
    lines = list(_command_lines(doc.read_text()))
    if doc.name == "README.md":
        assert len(lines) > 25
    runner = CliRunner()
    for line in lines:
        args = shlex.split(line)[1:]
        if args == ["--version"]:
            continue
        # --help after the command line: click checks every option name and
        # the command path, then prints the help instead of running it.
        result = runner.invoke(main, args + ["--help"])
        assert result.exit_code == 0, (doc.name, line, result.output)
        assert "Usage:" in result.output


def test_relative_links_resolve():
    # Written by the service, monitoring and operations work.
    elsewhere = {"docs/service.md", "docs/monitoring.md",
                 "docs/operations.md"}
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            path = (doc.parent / link).resolve()
            rel = str(path.relative_to(REPO))
            assert path.exists() or rel in elsewhere, (doc.name, link)
