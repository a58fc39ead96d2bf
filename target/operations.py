"""The operations table: every operation a Target offers, by name.

Read by the control socket (plugins/clonectl_plugin.py binds it to the
served Target; target/control.py dispatches requests to it), by the CLI
(target/cli.py: which operations need the server, and a short-lived
Target's operations when none runs) and by the peer channel (target/peer.py:
the operations a peer manager may ask for).

Each operation names its handler (an attribute path from the Target: the
orchestration that owns it) and how it is called:
- changes: followed by a look for the state changes it made (events);
  the read-only operations are not.
- needs_server: it runs an engine, so only the serving process can do it;
  the CLI refuses it when no server runs.
- user_session: its `name` is a user's session; it is refused on the
  session holding an LU's protected image (the target's own).
- peer: the name a peer manager asks for it under (target/peer.py).
Arguments are keyword arguments; their JSON types are checked against
ARGUMENT_TYPES and the handler's signature (check_arguments).
"""

import collections
import inspect
import json
import os

from . import errors

Operation = collections.namedtuple(
    "Operation", "name handler changes needs_server user_session peer")


def _op(name, handler=None, changes=True, needs_server=False,
        user_session=False, peer=None):
    return Operation(name, handler or name, changes, needs_server,
                     user_session, peer)


def _ping(target):
    return lambda: {"pid": os.getpid()}


def _reload(target):
    return lambda: {"exports": target.reload()}


TABLE = [
    _op("ping", _ping, changes=False),
    _op("status", changes=False),
    _op("reload", _reload),
    _op("events_since", changes=False),
    _op("prepare_stop"),
    _op("export_modes", changes=False),
    _op("lu_create"),
    _op("lu_delete"),
    _op("lu_resize"),
    _op("lu_accept_storage"),
    _op("clone_add", "clone_ops.clone_add"),
    _op("clone_remove", "clone_ops.clone_remove"),
    _op("clone_accept_storage", "clone_ops.clone_accept_storage"),
    _op("clone_list", "clone_ops.clone_list", changes=False),
    _op("clone_status", "clone_ops.clone_status", changes=False),
    _op("clone_map", "clone_ops.clone_map", changes=False),
    _op("clone_picture", "clone_ops.clone_picture", changes=False),
    _op("clone_sync", "clone_ops.clone_sync", needs_server=True),
    _op("clone_reverse_sync", "clone_ops.clone_reverse_sync",
        needs_server=True),
    _op("clone_fracture", "clone_ops.clone_fracture"),
    _op("clone_restore", "clone_ops.clone_restore", needs_server=True),
    _op("clone_verify", "clone_ops.clone_verify", needs_server=True),
    _op("session_create", "session_ops.session_create"),
    _op("session_delete", "session_ops.session_delete", user_session=True),
    _op("session_list", "session_ops.session_list", changes=False),
    _op("session_status", "session_ops.session_status", changes=False),
    _op("session_map", "session_ops.session_map", changes=False),
    _op("session_mark", "session_ops.session_mark", user_session=True),
    _op("session_unmark", "session_ops.session_unmark", user_session=True),
    _op("session_transfer", "session_ops.session_transfer",
        needs_server=True, user_session=True),
    _op("session_update", "session_ops.session_update", needs_server=True,
        user_session=True),
    _op("image_status", "session_ops.image_status", changes=False,
        peer="status"),
    _op("image_protect", "session_ops.image_protect", peer="protect"),
    _op("image_release", "session_ops.image_release", peer="release"),
    _op("image_rollback", "session_ops.image_rollback", peer="rollback"),
    _op("rsg_create", "rsg_ops.rsg_create"),
    _op("rsg_delete", "rsg_ops.rsg_delete"),
    _op("rsg_list", "rsg_ops.rsg_list", changes=False),
    _op("rsg_status", "rsg_ops.rsg_status", changes=False),
    _op("rsg_set", "rsg_ops.rsg_set"),
    _op("rsg_link", "rsg_ops.rsg_link", needs_server=True),
    _op("rsg_unlink", "rsg_ops.rsg_unlink", needs_server=True),
    _op("rsg_attach", "rsg_ops.rsg_attach", needs_server=True),
    _op("rsg_detach", "rsg_ops.rsg_detach", needs_server=True),
    _op("rsg_verify", "rsg_ops.rsg_verify", needs_server=True),
    _op("rsg_promote", "rsg_ops.rsg_promote", needs_server=True),
    _op("rsg_demote", "rsg_ops.rsg_demote", needs_server=True),
]

OPERATIONS = {op.name: op for op in TABLE}

# A peer manager's name of an operation -> the operation.
PEER_OPERATIONS = {op.peer: op.name for op in TABLE if op.peer}


def changes(name):
    """Whether operation name may change something (an operation not in
    the table, such as the plugin's own set_access, is taken to)."""
    op = OPERATIONS.get(name)
    return op is None or op.changes


def needs_server(name):
    """Whether operation name runs an engine (only a server can)."""
    op = OPERATIONS.get(name)
    return op is not None and op.needs_server


def handler(target, op):
    """The callable of op (an Operation) in target, unwrapped."""
    if callable(op.handler):
        return op.handler(target)
    obj = target
    for part in op.handler.split("."):
        obj = getattr(obj, part)
    return obj


def bind(target):
    """name -> callable taking keyword arguments: the operations of target
    as the control socket and a short-lived Target offer them."""
    out = {}
    for op in TABLE:
        func = handler(target, op)
        if op.user_session:
            func = target.session_ops.users_session(func)
        if op.changes:
            func = target.poking(func)
        out[op.name] = func
    return out


# The JSON type of each argument name of the operations (one name, one
# meaning across operations).  An argument not named here is checked by the
# type of its default (a bool, a number, a list for a tuple); sizes and
# rates are strings or integers, checked by units.parse_size.
ARGUMENT_TYPES = {
    "name": str, "source": str, "clone": str, "lu": str, "file": str,
    "secondary": str, "mode": str, "token_file": str, "peer_token_file": str,
    "tls_certificates": str, "peer_tls_certificates": str,
    "volumes": list, "dests": list, "peer_dests": list, "image": str,
    "file_data": str,
}
_JSON_NAMES = {str: "a string", list: "a list", bool: "true or false",
               float: "a number", int: "an integer"}


def check_arguments(op, func, args):
    """Refuse an argument of the wrong JSON type (a string where a list of
    names is expected would otherwise be taken character by character)."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    for key, value in args.items():
        param = params.get(key)
        if param is None:
            continue    # the call itself reports an unknown argument
        default = param.default
        want = ARGUMENT_TYPES.get(key)
        if want is None and default is not param.empty:
            want = {bool: bool, float: float, int: int, tuple: list,
                    list: list}.get(type(default))
        if want is None or (value is None and default is None):
            continue
        ok = isinstance(value, want) and not (
            isinstance(value, bool) and want is not bool)
        if want is float:
            ok = isinstance(value, (int, float)) and \
                not isinstance(value, bool)
        if not ok:
            raise errors.InvalidArgument(
                reason="bad arguments for {}: {!r} must be {}, not {}".format(
                    op, key, _JSON_NAMES[want], json.dumps(value)[:80]))
