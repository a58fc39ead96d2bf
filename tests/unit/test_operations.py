"""target.operations: the one table of the operations a Target offers."""

import ast
import inspect
from pathlib import Path

import pytest

from target import control, inventory, operations
from target.target import Target

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture
def target(tmp_path):
    sd = inventory.StateDir(str(tmp_path / "state"))
    inventory.create_lu(sd, "a", size=MiB)
    t = Target(sd.path)
    yield t
    t.close()


def test_every_operation_resolves_on_a_target(target):
    ops = operations.bind(target)
    assert sorted(ops) == sorted(operations.OPERATIONS)
    for op in operations.TABLE:
        func = operations.handler(target, op)
        assert callable(func), op.name
        # The control socket checks arguments against the signature of
        # the handler itself, through every wrapper.
        assert inspect.signature(ops[op.name]).parameters.keys() == \
            inspect.signature(func).parameters.keys(), op.name


def test_the_peer_operations_are_the_image_operations():
    assert operations.PEER_OPERATIONS == {
        "protect": "image_protect", "release": "image_release",
        "rollback": "image_rollback", "status": "image_status"}


def test_engine_operations_need_the_server():
    assert operations.needs_server("clone_sync")
    assert operations.needs_server("session_transfer")
    assert operations.needs_server("rsg_promote")
    assert not operations.needs_server("clone_add")
    assert not operations.needs_server("no such operation")


def _ops_named_in(path, callers):
    """The string literals given as the operation to callers in path."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else \
            getattr(func, "id", None)
        if name in callers and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant):
            names.add(node.args[1].value)
    return names


def test_every_operation_the_cli_and_manager_ask_for_is_in_the_table():
    asked = _ops_named_in(REPO / "target" / "cli.py",
                          {"_target_call", "_control_call", "call",
                           "try_call"})
    asked |= _ops_named_in(REPO / "target" / "server.py", {"call", "try_call"})
    assert len(asked) > 30
    # set_access is the plugin's own operation (its allow lists).
    assert asked - {"set_access"} <= set(operations.OPERATIONS)


def test_a_bad_argument_type_is_refused_before_the_call(target):
    reply = control.dispatch(
        b'{"op": "clone_add", "args": {"source": "a", "clone": ["c"]}}',
        operations.bind(target), check=operations.check_arguments)
    assert not reply["ok"]
    assert "'clone' must be a string" in reply["error"]["message"]
    assert target.clone_list() == []
