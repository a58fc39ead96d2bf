"""The layers of target/ and plugins/, checked on the source with `ast`.

Layers, top to bottom; a module imports only from its own layer or below,
no engine imports another engine, and no module reaches into another
module's private names (`x._y` on a module or name imported from another
target module, or `from .x import _y`): it asks for a public method
instead.

Private names are checked twice: on names imported from another module,
and on any object (`self.group._x`) when `_x` is defined (a def, a class,
an assignment) only in other modules than the one using it.

The table is data: put a new module in its layer here.  A name is the
part of the path after target/ without .py (or plugins/NAME): a package
(target/clones/...) counts as one name, so its modules may import one
another.

A failure lists every violation, with file and line.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LAYERS = [
    ("manager", {"plugins/clonectl_plugin", "cli", "server"}),
    ("operations", {"operations"}),
    # Target owns the LUs and orchestrates the engines, one module per
    # engine; access decides who may see which export (iSCSI gateways
    # included) and gateway routes the gateway's own connections.
    ("target", {"target", "lu", "access", "gateway", "clone_orchestration",
                "session_orchestration", "rsg_orchestration"}),
    ("engines", {"clones", "sessions", "replication", "iscsi", "peer",
                 "monitor"}),
    # control: the control socket's protocol, client and server (engines
    # call the manager through it).
    ("shared", {"changemap", "copier", "maps", "iostack", "backends",
                "inventory", "control"}),
    ("base", {"errors", "filelocks", "storageid", "fsutil", "units",
              "limits", "events", "progress", "channel", "groupcommit",
              "config", "procutil", "__init__"}),
]
ENGINES = "engines"

LAYER_OF = {name: (i, layer) for i, (layer, names) in enumerate(LAYERS)
            for name in names}


# ---------------------------------------------------------------- the parser

def sources():
    """{name: [(path relative to the repository, source)]} for every module
    of target/ and plugins/."""
    found = {}
    for path in sorted((REPO / "target").rglob("*.py")) + \
            sorted((REPO / "plugins").glob("*.py")):
        rel = path.relative_to(REPO)
        found.setdefault(name_of(module_of(rel)), []).append(
            (str(rel), path.read_text()))
    return found


def module_of(rel):
    """target/clones/model.py -> target.clones.model; __init__ is its
    package."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def name_of(module):
    """The table's name of a dotted module: target.clones.model -> clones,
    target -> __init__, plugins.clonectl_plugin -> plugins/clonectl_plugin;
    None for a module of neither (the standard library, nbd, click)."""
    parts = module.split(".")
    if parts[0] == "plugins" and len(parts) > 1:
        return "plugins/" + parts[1]
    if parts[0] != "target":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _package(rel):
    parts = module_of(rel).split(".")
    return parts if Path(rel).name == "__init__.py" else parts[:-1]


def imports(rel, tree):
    """(line, imported dotted module, names bound in this module: {local
    name: (dotted module, attribute or None)}) for every import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = {}
                if alias.asname:
                    bound[alias.asname] = (alias.name, None)
                yield node.lineno, alias.name, bound
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(rel)[:len(_package(rel)) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module
                                          else []))
            else:
                module = node.module
            for alias in node.names:
                local = alias.asname or alias.name
                # from target import clones / from . import errors: a module
                if name_of(module) == "__init__" or (
                        name_of(module) is not None and
                        module.count(".") == 0):
                    yield node.lineno, module + "." + alias.name, \
                        {local: (module + "." + alias.name, None)}
                else:
                    yield node.lineno, module, \
                        {local: (module, alias.name)}


def layer_violations(found):
    problems = []
    for name, files in sorted(found.items()):
        if name not in LAYER_OF:
            problems.append("{}: not in the layer table".format(
                files[0][0]))
            continue
        mine, my_layer = LAYER_OF[name]
        for rel, text in files:
            for line, module, _ in imports(rel, ast.parse(text)):
                other = name_of(module)
                if other is None or other == name:
                    continue
                if other not in LAYER_OF:
                    problems.append("{}:{}: imports {}, not in the layer "
                                    "table".format(rel, line, module))
                    continue
                theirs, their_layer = LAYER_OF[other]
                if theirs < mine:
                    problems.append(
                        "{}:{}: {} ({}) imports {} ({}), a layer above"
                        .format(rel, line, name, my_layer, other,
                                their_layer))
                elif my_layer == their_layer == ENGINES:
                    problems.append(
                        "{}:{}: engine {} imports engine {}".format(
                            rel, line, name, other))
    return sorted(problems, key=_by_place)


def _by_place(problem):
    path, line = problem.split(":")[:2]
    return (path, int(line) if line.isdigit() else 0, problem)


def private_violations(found):
    problems = []
    for name, files in sorted(found.items()):
        for rel, text in files:
            tree = ast.parse(text)
            foreign = {}
            for line, module, bound in imports(rel, tree):
                other = name_of(module)
                if other is None or other == name:
                    continue
                for local, (mod, attr) in bound.items():
                    if attr is not None and attr.startswith("_") and \
                            not attr.startswith("__"):
                        problems.append("{}:{}: imports {}'s private {}"
                                        .format(rel, line, other, attr))
                    foreign[local] = other
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and \
                        isinstance(node.value, ast.Name) and \
                        node.value.id in foreign and \
                        node.attr.startswith("_") and \
                        not node.attr.startswith("__"):
                    problems.append("{}:{}: {}.{} is private to {}".format(
                        rel, node.lineno, node.value.id, node.attr,
                        foreign[node.value.id]))
    return sorted(problems, key=_by_place)


def _private_definitions(tree):
    """The private names a module defines: functions, methods, classes,
    and names or attributes it assigns (self._x = ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                             ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and \
                isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_attribute_violations(found):
    trees = {name: [(rel, ast.parse(text)) for rel, text in files]
             for name, files in found.items()}
    defined = {name: set().union(*(_private_definitions(t) for _, t in files))
               for name, files in trees.items()}
    problems = []
    for name, files in sorted(trees.items()):
        for rel, tree in files:
            for node in ast.walk(tree):
                if not isinstance(node, ast.Attribute):
                    continue
                attr = node.attr
                if not attr.startswith("_") or attr.startswith("__") or \
                        attr in defined[name]:
                    continue
                owners = sorted(other for other, names in defined.items()
                                if attr in names)
                if owners:
                    problems.append("{}:{}: {} is private to {}".format(
                        rel, node.lineno, ast.unparse(node),
                        ", ".join(owners)))
    return sorted(problems, key=_by_place)


def _report(problems):
    return "{} violation(s):\n  ".format(len(problems)) + \
        "\n  ".join(problems)


# ---------------------------------------------------------------- the tests



def test_every_module_is_in_the_layer_table():
    missing = [files[0][0] for name, files in sources().items()
               if name not in LAYER_OF]
    assert not missing, "put these in LAYERS: {}".format(missing)


def test_imports_follow_the_layers():
    problems = layer_violations(sources())
    assert not problems, _report(problems)


def test_no_module_uses_another_modules_private_names():
    problems = private_violations(sources())
    assert not problems, _report(problems)


def test_no_module_uses_private_attributes_of_another_modules_objects():
    problems = private_attribute_violations(sources())
    assert not problems, _report(problems)


def test_the_checks_can_fail():
    """Fabricated modules with each kind of violation are reported."""
    found = {
        "errors": [("target/errors.py", "from . import clones\n")],
        "clones": [("target/clones/model.py",
                    "from .. import sessions\nfrom ..maps import _load\n"
                    "from . import sync\n")],
        "maps": [("target/maps.py", "from target import fsutil\n"
                  "fsutil._helper()\n"
                  "def _load(): pass\n"
                  "class Map:\n    def _grow(self): self._size = 1\n")],
        "sessions": [("target/sessions.py", "def f(m):\n    m._grow()\n"
                      "    return m._size, m._own\n"
                      "def g(s):\n    s._own = 1\n")],
        "nowhere": [("target/nowhere.py", "")],
    }
    layers = layer_violations(found)
    assert any("errors (base) imports clones (engines)" in p
               for p in layers), layers
    assert any("engine clones imports engine sessions" in p
               for p in layers), layers
    assert any("nowhere.py: not in the layer table" in p
               for p in layers), layers
    assert len(layers) == 3, layers         # clones' own sync is fine
    private = private_violations(found)
    assert sorted(private) == [
        "target/clones/model.py:2: imports maps's private _load",
        "target/maps.py:2: fsutil._helper is private to fsutil"], private
    attributes = private_attribute_violations(found)
    assert attributes == [
        "target/sessions.py:2: m._grow is private to maps",
        "target/sessions.py:3: m._size is private to maps"], attributes


# ---------------------------------------------------------------- the tests' own layout

def _test_imports(path):
    """(line, text) of each import in a test module that reaches another
    test module (tests live in test_*.py; what they share lives in
    tests/support), and of each use of sys.path."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [
                "{}.{}".format(node.module or "", a.name) for a in node.names]
            if any(part.startswith("test_") for n in names
                   for part in n.split(".")):
                found.append((node.lineno, "imports a test module"))
        elif isinstance(node, ast.Import):
            if any(part.startswith("test_") for a in node.names
                   for part in a.name.split(".")):
                found.append((node.lineno, "imports a test module"))
        elif isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append((node.lineno, "uses sys.path"))
    return found


def test_no_test_module_imports_another():
    problems = ["{}:{}: {}".format(path.relative_to(REPO), line, what)
                for path in sorted((REPO / "tests").rglob("*.py"))
                for line, what in _test_imports(path)]
    assert not problems, _report(problems)


def test_the_test_import_check_can_fail(tmp_path):
    bad = tmp_path / "test_x.py"
    bad.write_text("import sys\nfrom .test_y import Harness\n"
                   "import tests.engine.test_z\nsys.path.insert(0, '.')\n")
    assert [line for line, _ in _test_imports(bad)] == [2, 3, 4]


# ---------------------------------------------------------------- citations

# A document outside the repository, a design seed or an issue number:
# code, scripts and tests say their rules in their own words instead (the
# design lives in docs/).
CITATION = re.compile(r"DESIGN\.md|shared/seeds|\bseed 0\d\d\b|"
                      r"\bissues? #?\d+\b|rsg-bugs|\binvariant \d\b")


def citations(text):
    return [n for n, line in enumerate(text.splitlines(), 1)
            if CITATION.search(line)]


def test_code_and_tests_cite_nothing_outside_the_repository():
    me = Path(__file__).resolve()
    problems = ["{}:{}".format(path.relative_to(REPO), n)
                for top in ("target", "plugins", "scripts", "tests")
                for path in sorted((REPO / top).rglob("*"))
                if path.is_file() and path.suffix in ("", ".py", ".sh")
                and path.resolve() != me and "__pycache__" not in path.parts
                for n in citations(path.read_text(errors="replace"))]
    assert not problems, _report(problems)


def test_the_citation_check_can_fail():
    assert citations("ok\nas DESIGN.md section 3 says\nseed 002 figure 4\n"
                     "see issue 5\nrandom --seed 42\n") == [2, 3, 4]
