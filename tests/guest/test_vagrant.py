"""vagrant/ cannot run here (no boxes, no hardware virtualization), so
check what can be checked: the Vagrantfile parses, and evaluated against a
stub of Vagrant's configuration API it provisions with scripts that exist
and are the ones the guest test runs."""

import shutil
import subprocess

import pytest

from tests.support import guestlib

VAGRANT = guestlib.REPO / "vagrant"

# Vagrant.configure yields an object that accepts any call; every
# `provision` call is recorded and printed as NAME<TAB>PATH.
RUBY_STUB = r'''
$provisions = []
class Recorder
  def method_missing(name, *args, **kw, &blk)
    $provisions << [args[0], kw[:path].to_s] if name == :provision
    blk.call(Recorder.new) if blk
    Recorder.new
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(version)
    yield Recorder.new
  end
end
load ARGV[0]
$provisions.each { |name, path| puts "#{name}\t#{path}" }
'''


@pytest.fixture
def ruby():
    path = shutil.which("ruby")
    if path is None:
        pytest.skip("ruby is not installed (scripts/setup installs it)")
    return path


def test_vagrantfile_syntax(ruby):
    proc = subprocess.run([ruby, "-c", str(VAGRANT / "Vagrantfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Syntax OK" in proc.stdout, proc.stderr


def test_vagrant_provisions_with_the_guest_test_scripts(ruby):
    proc = subprocess.run([ruby, "-e", RUBY_STUB, "Vagrantfile"],
                          cwd=VAGRANT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    provisions = [tuple(line.split("\t")) for line in
                  proc.stdout.splitlines()]
    assert [name for name, _ in provisions] == ["serve", "check", "check"]
    paths = [(VAGRANT / path).resolve() for _, path in provisions]
    for path in paths:
        assert path.is_file(), path
    assert guestlib.REPO / "scripts/guest/target-check.sh" in paths
    host = (VAGRANT / "provision-host.sh").read_text()
    assert "scripts/guest/attach-nbd.sh attach" in host.replace("$scripts",
                                                                "scripts/guest")
    assert "host-check.sh full" in host


@pytest.mark.parametrize("script", sorted(
    str(p.relative_to(guestlib.REPO)) for p in
    list((guestlib.REPO / "scripts/guest").glob("*.sh")) +
    list(VAGRANT.glob("*.sh")) + [guestlib.REPO / "tests/guest/init.sh"]))
def test_shell_scripts_parse(script):
    proc = subprocess.run(["sh", "-n", str(guestlib.REPO / script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
