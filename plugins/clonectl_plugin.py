# clonectl nbdkit plugin: a thin adapter from nbdkit's python plugin API
# (version 2) to target.target.Target, which owns the LUs and their engines.
#
# Started by `clonectl serve` as
#     nbdkit python clonectl_plugin.py statedir=DIR pythonpath=DIR \
#         [thread_model=parallel|serialize_requests|serialize_all_requests] \
#         [allow=NET,NET...]    (clients from other addresses are refused)
#         [allow_export=EXPORT=NET,NET...]...  (repeatable, one per export:
#                               only clients from NET may open EXPORT)
#         [gateway_secret=FILE]  (the iSCSI gateway's route: FILE, mode
#                               0600, holds the secret its export names
#                               carry; target/iscsi.py)
#         [max_connections=N] [max_per_address=N]  (live connections, idle
#                               ones included: target/limits.py)
#         [thread_state=connection|connection_thread|request]  (how long
#                               the Python thread state of a thread serving
#                               a connection lives; see _hold_thread_state:
#                               request is nbdkit's own behaviour,
#                               connection_thread holds only the connection's
#                               own thread's, not parallel's workers'; both
#                               kept for scripts/bench)
#
# nbdkit embeds /usr/bin/python3, which does not see the virtual environment:
# the target package is found through pythonpath=.  The script's directory is
# not on sys.path and __file__ is None here, and the required open() below
# shadows the builtin open in this module.

import ctypes
import errno
import sys
import threading

import nbdkit

API_VERSION = 2

_config = {"thread_model": "serialize_requests"}
_target = None
_control = None
_allow = None  # target.access.AllowList with allow=, else None
_allow_export = []  # allow_export= values, in order
_export_rules = None  # target.access.ExportRules with allow_export=, else None
_limiter = None  # target.limits.ConnectionLimiter with max_connections=...
_held = {}  # connection -> what _hold_thread_state returned for it
# (connection, worker thread ident) -> the worker's PyThreadState pointer,
# held by _hold_worker_state until close(); _hold_workers says whether to.
# The connection's own thread is there too, with None: it has its hold
# from open() (nbdkit runs the requests there when a connection has one
# worker thread), and only its own Release may give that back.
_workers = {}
_hold_workers = False

_THREAD_STATES = ("connection", "connection_thread", "request")

ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
ctypes.pythonapi.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
ctypes.pythonapi.PyThreadState_Delete.argtypes = [ctypes.c_void_p]

_THREAD_MODELS = {
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
}


def config(key, value):
    if key not in ("statedir", "pythonpath", "thread_model", "parent",
                   "replication", "replication_token", "replication_tls",
                   "allow",
                   "allow_export", "gateway_secret", "max_connections",
                   "max_per_address", "thread_state"):
        raise Exception("unknown parameter {!r}".format(key))
    if key == "allow_export":
        _allow_export.append(value)
        return
    if key == "thread_model" and value not in _THREAD_MODELS:
        raise Exception("thread_model must be one of " +
                        ", ".join(sorted(_THREAD_MODELS)))
    if key == "thread_state" and value not in _THREAD_STATES:
        raise Exception("thread_state must be one of " +
                        ", ".join(_THREAD_STATES))
    _config[key] = value


def config_complete():
    global _target, _allow, _export_rules, _limiter, _hold_workers
    if "statedir" not in _config:
        raise Exception("statedir= is required")
    if "pythonpath" in _config:
        sys.path.insert(0, _config["pythonpath"])
    from target import access, iscsi, limits
    from target.target import Target
    limits.install_log_limit()
    _one_line_errors()
    if "max_connections" in _config or "max_per_address" in _config:
        _limiter = limits.ConnectionLimiter(
            int(_config.get("max_connections", 0)),
            int(_config.get("max_per_address", 0)))
    secret = iscsi.read_secret(_config["gateway_secret"]) \
        if "gateway_secret" in _config else None
    _target = Target(_config["statedir"], gateway_secret=secret)
    _hold_workers = _config["thread_model"] == "parallel" and \
        _config.get("thread_state", "connection") == "connection"
    if "allow" in _config:
        _allow = access.AllowList(_config["allow"])
    if _allow_export:
        _export_rules = access.ExportRules(_allow_export,
                                           _target.clone_sources)


def thread_model():
    # SERIALIZE_REQUESTS by default, chosen by measurement (the figures are
    # in docs/performance.md, "Thread model" and "thread model parallel
    # with the worker threads' states held"): under PARALLEL the worker
    # threads of a connection hand the GIL to each other, which costs CPU
    # per request and loses on reads one at a time; it gains only where
    # requests wait outside the interpreter (sync links, copies on first
    # write), and nbdkit 1.32 aborts under it when a client goes away with
    # requests in flight (docs/known-gaps.md): a switch for benchmarks.
    # SERIALIZE_REQUESTS keeps one request per connection at a time but
    # lets connections run side by side (the GIL is released in
    # preadv/pwrite and in waits), so multi-conn clients and a connection
    # waiting on an engine do not hold up the others, for a few per cent
    # against SERIALIZE_ALL_REQUESTS.
    return _THREAD_MODELS[_config["thread_model"]]


def after_fork():
    # Threads must start after nbdkit has forked (it also calls this in
    # --foreground mode), so the control socket is started here.
    global _control
    from target import control, operations as ops
    _target.start()
    if "replication" in _config:
        # A secondary: listen for primaries (serve --replication-port).
        bind, _, port = _config["replication"].rpartition(":")
        _target.start_replication(bind.strip("[]"), int(port),
                                  _config["replication_token"],
                                  _config.get("replication_tls"))
    # Requests only once the target has resumed what was running: a status
    # before would show a restore or sync not running (and a `--wait`
    # following it would end there), and a request could start a second
    # engine beside the one about to resume.
    operations = ops.bind(_target)
    operations["set_access"] = _set_access
    _control = control.ControlServer(_target.state_dir.control_socket,
                                     operations, check=ops.check_arguments)
    _control.start()
    if "parent" in _config:
        _target.watch_parent(int(_config["parent"]))


def _set_access(allow="", allow_export=(), max_connections=0,
                max_per_address=0):
    """The control operation behind a reload of `serve`'s configuration:
    new allow lists and connection limits, in the format of the plugin
    parameters, for the connections that come next."""
    global _allow, _export_rules, _limiter
    from target import access, limits
    new_allow = access.AllowList(allow) if allow else None
    new_rules = access.ExportRules(list(allow_export),
                                   _target.clone_sources) \
        if allow_export else None
    if _limiter is None:
        _limiter = limits.ConnectionLimiter(int(max_connections),
                                            int(max_per_address))
    else:
        with _limiter.lock:
            _limiter.max_connections = int(max_connections)
            _limiter.max_per_address = int(max_per_address)
    _allow, _export_rules = new_allow, new_rules
    return {}


def cleanup():
    if _control is not None:
        _control.stop()
    if _target is not None:
        _target.close()


def _one_line_errors():
    """Our errors (target.errors.Error: a refused client, a bad export
    name, an I/O error with its errno) reach nbdkit's log as their message
    alone, on one line.  nbdkit 1.32 logs an exception a callback raises as
    traceback.format_exception() renders it, and offers no other way to
    fail a callback (preconnect included) than raising; other exceptions,
    the bugs, keep their traceback."""
    import traceback
    from target import errors
    format_exception = traceback.format_exception

    def one_line(exc, /, *args, **kwargs):
        value = args[0] if args else exc
        if isinstance(value, errors.Error):
            return ["{}: {}".format(value.code, value)]
        return format_exception(exc, *args, **kwargs)

    traceback.format_exception = one_line


def _fail(e):
    code = getattr(e, "errno", None)
    nbdkit.set_error(code if isinstance(code, int) and code > 0 else errno.EIO)
    raise e


def preconnect(readonly):
    # Before the handshake (and TLS): a refused client gets nothing.
    if _allow is not None:
        try:
            _allow.check_peer()
        except Exception as e:
            _fail(e)
    if _limiter is not None:
        # Counted from here until nbdkit's thread for this connection ends.
        try:
            from target import access
            _limiter.admit(access.peer_address())
        except Exception as e:
            _fail(e)


def list_exports(readonly, is_tls):
    # Exports this client may not open are not even named.
    if _export_rules is not None:
        try:
            return _export_rules.visible(_target.exports())
        except Exception as e:
            _fail(e)
    return _target.exports()


def default_export(readonly, is_tls):
    return ""


def _hold_thread_state():
    """Keep this thread's Python thread state until close().

    nbdkit's python plugin enters every callback with PyGILState_Ensure
    and leaves with PyGILState_Release; its threads are not Python's, so
    each callback creates a thread state and deletes it on the way out,
    with its frame stack: an mmap and a munmap per request, more than
    half a 4 KiB read's CPU (docs/performance.md, "several clients at
    once").  One more Ensure here, in the connection's thread, keeps the
    count above zero: the callbacks then only take and drop the GIL.
    Under the serializing thread models open, every request and close run
    in the connection's thread, and close() gives the state back (its
    Release is in the same thread).  Under parallel the requests run in
    the connection's worker threads: _hold_worker_state."""
    if _config.get("thread_state", "connection") != "request":
        return ctypes.pythonapi.PyGILState_Ensure()
    return None


def _hold_worker_state(h):
    """The same for a worker thread of connection h (thread model
    parallel), called by every data callback: on the thread's first
    request, one more Ensure, never released.

    nbdkit joins a connection's worker threads before it calls close(),
    so no worker can give its state back: a thread that exits with the
    count above zero leaves its state in the interpreter.  close() frees
    them (_free_worker_states), from the thread states recorded here; a
    dict keyed by the thread ident, because a threading.local lives in
    the very thread state that is to go."""
    key = h, threading.get_ident()
    if key not in _workers:
        ctypes.pythonapi.PyGILState_Ensure()
        _workers[key] = ctypes.pythonapi.PyThreadState_Get()


def _free_worker_states(h):
    # With the GIL held (close is a callback), for states of exited
    # threads, none of them current: what PyThreadState_Delete requires.
    # list() copies the keys in one step: other connections' workers add
    # theirs meanwhile.
    for key in [key for key in list(_workers) if key[0] is h]:
        state = _workers.pop(key)
        if state is None:
            continue  # the connection's own thread: this one
        ctypes.pythonapi.PyThreadState_Clear(state)
        ctypes.pythonapi.PyThreadState_Delete(state)


def _release_thread_state(held):
    if held is not None:
        ctypes.pythonapi.PyGILState_Release(held)


def open(readonly):
    try:
        name = nbdkit.export_name()
        if _export_rules is not None:
            # Before connect counts the connection: a refusal changes nothing.
            _export_rules.check_peer(name)
        h = _target.connect(name, readonly)
    except Exception as e:
        _fail(e)
    _held[h] = _hold_thread_state()
    if _hold_workers:
        _workers[h, threading.get_ident()] = None
    return h


def close(h):
    _release_thread_state(_held.pop(h, None))
    if _hold_workers:
        _free_worker_states(h)
    _target.disconnect(h)


def get_size(h):
    return h.export.size


def is_rotational(h):
    return False


def can_write(h):
    # The connection's mode: read-only LUs, and a secondary's volumes.
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    # Every connection to an LU shares one backing fd in this process, so a
    # flush on any connection makes the writes completed on all of them
    # durable: what multi-conn promises.
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        h.export.read(buf, offset)
    except Exception as e:
        _fail(e)


def pwrite(h, buf, offset, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        h.export.write(buf, offset, flags & nbdkit.FLAG_FUA)
    except Exception as e:
        _fail(e)


def flush(h, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        h.export.flush()
    except Exception as e:
        _fail(e)


def trim(h, count, offset, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        h.export.trim(offset, count, flags & nbdkit.FLAG_FUA)
    except Exception as e:
        _fail(e)


def zero(h, count, offset, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        h.export.zero(offset, count,
                  may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
                  fast=bool(flags & nbdkit.FLAG_FAST_ZERO),
                  fua=bool(flags & nbdkit.FLAG_FUA))
    except Exception as e:
        _fail(e)


def extents(h, count, offset, flags):
    if _hold_workers:
        _hold_worker_state(h)
    try:
        return [(off, length, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
                 if hole else 0)
                for off, length, hole in h.export.extents(offset, count)]
    except Exception as e:
        _fail(e)
