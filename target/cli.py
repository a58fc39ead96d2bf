"""clonectl: the manager CLI."""

import contextlib
import functools
import io
import json
import os
import select
import sys
import time

import click

from . import (control, errors, fsutil, inventory, operations, progress,
               server, units)

DEFAULT_STATE_DIR = "/var/lib/clonectl"


# Exit statuses (documented in `clonectl --help` and `clonectl status
# --help`).
# 1 is every error (handle_errors), 2 click's usage errors, 5 a change
# whose outcome is unknown (errors.OutcomeUnknown.exit_status).
EXIT_OK, EXIT_NOT_RUNNING, EXIT_DEGRADED = 0, 3, 4


def _json_out():
    """The stdout of a command run with --json (its text output goes
    nowhere meanwhile), or None."""
    cctx = click.get_current_context(silent=True)
    ctx = cctx.find_object(Context) if cctx else None
    return ctx.json_out if ctx else None


def _fail(message, code=1, error=None):
    out = _json_out()
    if out is not None:
        error = error or errors.Error(reason=message)
        try:
            out.write(json.dumps({"error": {
                "message": str(message), "errno": error.errno,
                "type": error.code}}, indent=2, sort_keys=True) + "\n")
            out.flush()
        except OSError as e:
            _end_if_output_gone(e, out)
            raise
        sys.exit(code)
    click.echo("clonectl: error: {}".format(message), err=True)
    sys.exit(code)


def handle_errors(func):
    """Turn our errors, and operating system errors, into a message on
    stderr (with --json: an {"error": ...} object on stdout) and exit
    status 1 (an error's own exit_status if it has one)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except errors.Error as e:
            _fail(str(e), code=getattr(e, "exit_status", 1), error=e)
        except OSError as e:
            _end_if_output_gone(e)
            ctx = click.get_current_context().find_object(Context)
            err = os_error(e, ctx.state_dir.path if ctx else None)
            _fail(str(err), error=err)
    return wrapper


def _end_if_output_gone(e, out=None):
    """If e is the reader of stdout (out: the stream written, when stdout
    is redirected meanwhile) going (`clonectl ... | head`), end with no
    error message and the status of a program SIGPIPE ended: neither done
    (0) nor refused (1) is known to that reader."""
    if not isinstance(e, BrokenPipeError):
        return
    try:
        fd = (out or sys.stdout).fileno()
        # A pipe without reader polls as an error (a broken pipe may be a
        # socket's).
        poll = select.poll()
        poll.register(fd, 0)
        gone = any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        sys.exit(128 + 13)


def json_result(func):
    """--json for an action command: print the resulting status object
    (the last one the target answered) as JSON instead of the text, and
    errors as {"error": {"message", "errno", "type"}} on stdout, exit 1
    (or the error's own exit_status).  Put it above pass_ctx."""
    @click.option("--json", "as_json", is_flag=True,
                  help="Print the resulting status object as JSON on stdout "
                       "instead of text; an error is printed as {\"error\": "
                       "{\"message\", \"errno\", \"type\"}} on stdout, "
                       "with exit status 1 (5 when the change's outcome is "
                       "unknown: see clonectl --help).")
    @functools.wraps(func)
    def wrapper(*args, as_json=False, **kwargs):
        if not as_json:
            return func(*args, **kwargs)
        ctx = click.get_current_context().find_object(Context)
        ctx.json_out = sys.stdout
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                func(*args, **kwargs)
        finally:
            ctx.json_out = None
        try:
            _print_json(ctx.last_result if ctx.last_result is not None
                        else {})
        except OSError as e:
            _end_if_output_gone(e)
            raise
    return wrapper


def os_error(e, state_dir=None):
    """The errors.Error of an OSError: a state directory that cannot be used
    (the file is in it, or is it or one of its parents) or a file error."""
    reason = e.strerror or str(e)
    path = os.fsdecode(e.filename) if e.filename is not None else None
    if path is not None:
        reason = "{}: {}".format(path, reason)
    if state_dir is not None and path is not None:
        path = os.path.abspath(path)
        if path == state_dir or path.startswith(state_dir + os.sep) or \
                state_dir.startswith(path.rstrip(os.sep) + os.sep):
            return errors.StateDirUnusable(path=state_dir, reason=reason)
    if path is None:
        return errors.Error(reason=reason)
    return errors.FileError(path=path, reason=e.strerror or str(e))


def _print_json(obj):
    """JSON for machines: sizes in bytes, times in ISO 8601 UTC."""
    click.echo(json.dumps(units.iso_times(obj), indent=2, sort_keys=True))


def _table(rows, headers):
    rows = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    click.echo(fmt.format(*headers).rstrip())
    for row in rows:
        click.echo(fmt.format(*row).rstrip())


class Context:
    def __init__(self, state_dir):
        self.state_dir = inventory.StateDir(state_dir)
        # The last object the target answered (what --json prints) and the
        # real stdout while a command runs with --json.
        self.last_result = None
        self.json_out = None


pass_ctx = click.make_pass_decorator(Context)


def _state_dir_here(ctx, param, value):
    if value is not None:
        ctx.find_object(Context).state_dir = inventory.StateDir(value)


class _Group(click.Group):
    """A group whose commands also take --state-dir after their name
    (`clonectl lu list --state-dir DIR`), so it goes wherever an admin
    types it; the group's own option stays the one with the default."""

    group_class = type

    def add_command(self, cmd, name=None):
        if not isinstance(cmd, click.Group) and \
                not any(p.name == "state_dir" for p in cmd.params):
            cmd.params.append(click.Option(
                ["--state-dir"], metavar="DIR", expose_value=False,
                callback=_state_dir_here,
                help="State directory, as `clonectl --state-dir DIR`; "
                     "accepted here too."))
        super().add_command(cmd, name)


@click.group(cls=_Group,
             context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.option("--state-dir", envvar="CLONECTL_STATE", default=DEFAULT_STATE_DIR,
              show_default=True, metavar="DIR",
              help="State directory: the LU inventory (state.json), backing "
                   "files created by clonectl, and the runtime files of a "
                   "running server. Also taken from $CLONECTL_STATE.")
@click.version_option(package_name="clonectl")
@click.pass_context
def main(ctx, state_dir):
    """Serve Source LUs over NBD and keep protected clones of them.

    \b
    A typical session:
      clonectl --state-dir /srv/clonectl lu create db1 --size 10G
      clonectl --state-dir /srv/clonectl serve --socket /run/clonectl.sock --detach
      qemu-img info 'nbd+unix:///db1?socket=/run/clonectl.sock'
      clonectl --state-dir /srv/clonectl status
      clonectl --state-dir /srv/clonectl stop

    Every LU is exported under its own name by one server; `nbdinfo --list`
    shows them. Errors are printed on stderr and exit with status 1 (2 for
    usage errors); `clonectl status` also exits 3 when no server runs and 4
    when something is degraded. A command whose change reached the server
    just before it went away (restarted, killed, stopped) exits with
    status 5: it may have been carried out or not, and it is not sent
    again; look with `clonectl status` before repeating it. Status
    commands, and every command that
    changes something, accept --json (sizes in bytes, times ISO 8601 UTC);
    a command that changes something then prints its error as {"error":
    ...} on stdout. Human output uses IEC units
    (KiB, MiB, GiB) and ISO 8601 UTC times. `clonectl events` follows every
    change; `serve --metrics PORT` serves Prometheus metrics and a status
    page (docs/monitoring.md).
    """
    ctx.obj = Context(state_dir)


# ---------------------------------------------------------------- lu

@main.group()
def lu():
    """Create, list, resize and delete Source LUs."""


@lu.command("create")
@click.argument("name")
@click.option("--size", metavar="SIZE",
              help="Size of the LU: bytes or a number with K, M, G, T, P "
                   "(powers of 1024), a multiple of 512. Required unless "
                   "--file names an existing file or device, whose size is "
                   "then used.")
@click.option("--file", "file", metavar="PATH",
              help="Use this existing regular file or block device as the "
                   "backing store, as it is (its data is served, never "
                   "erased, and it is kept when the LU is deleted). It is "
                   "refused while another program holds it for writing "
                   "(QEMU's image locks; a block device that is mounted or "
                   "held); while served, QEMU's tools cannot write it and a "
                   "block device cannot be mounted. Without --file a new "
                   "sparse file is made in the state directory.")
@click.option("--read-only", is_flag=True,
              help="Export the LU read-only: hosts can read it, every write "
                   "is refused with EPERM.")
@json_result
@pass_ctx
@handle_errors
def lu_create(ctx, name, size, file, read_only):
    """Create the LU NAME.

    NAME is 1-64 characters from A-Z a-z 0-9 . _ - and is the NBD export
    name. If a server is running, the new LU is exported at once.
    """
    with server.served_or_exclusive(ctx.state_dir) as info:
        if info is None:
            record = inventory.create_lu(ctx.state_dir, name, size=size,
                                         file=file, readonly=read_only)
            ctx.last_result = {"record": record, "error": None}
        else:
            res = _control_call(ctx, "lu_create", name=name, size=size,
                                file=os.path.abspath(file) if file else None,
                                readonly=read_only)
            record = res["record"]
    click.echo("created LU {} ({}, {}{})".format(
        name, units.format_size(record["size"]), record["file"],
        ", read-only" if read_only else ""))
    if info is None:
        return
    if res["error"]:
        click.echo("clonectl: warning: the running server does not export "
                   "it: {}".format(res["error"]), err=True)
    else:
        click.echo("exported as {}".format(info["uri"].replace("EXPORT",
                                                                name)))


def _served(ctx):
    """(serve.json of the running server, its target's status), each
    None when there is none or it does not answer."""
    info = server.read_serve_info(ctx.state_dir)
    st = control.try_call(ctx.state_dir.control_socket, "status") \
        if info else None
    return info, st


def _lu_rows(ctx, info, st):
    """(rows, problems) of the inventory's LUs; info and st: _served()."""
    doc = ctx.state_dir.load()
    live = {}
    problems = None     # unknown without a server
    if info and st:
        live = {lu["name"]: lu for lu in st["lus"]}
        problems = st.get("recovery_problems", [])
    rows = []
    for name, record in sorted(doc["lus"].items()):
        entry = {"name": name, "size": record["size"], "file": record["file"],
                 "owned": record["owned"], "readonly": record["readonly"],
                 "created": record.get("created"),
                 # What file named when it was added (target.storageid).
                 "storage": record.get("storage"),
                 "served": False, "connections": 0,
                 "gateway_connections": 0, "error": None}
        if name in live:
            entry["served"] = live[name]["exported"]
            entry["connections"] = live[name]["connections"]
            # The iSCSI gateway's own (nbdfuse's, several per mount).
            entry["gateway_connections"] = live[name]["gateway_connections"]
            entry["error"] = live[name]["error"]
            if info and entry["served"]:
                entry["uri"] = info["uri"].replace("EXPORT", name)
        rows.append(entry)
    return rows, problems


@lu.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def lu_list(ctx, as_json):
    """List the LUs of the state directory."""
    rows, _ = _lu_rows(ctx, *_served(ctx))
    if as_json:
        _print_json(rows)
        return
    _table([(r["name"], units.format_size(r["size"]),
             "ro" if r["readonly"] else "rw", r["file"]) for r in rows],
           ["NAME", "SIZE", "MODE", "BACKING"])


@lu.command("rollback")
@click.argument("name")
@click.option("--image", type=click.Choice(["consistent", "protected"]),
              help="Which image to put back: consistent (NAME@consistent-"
                   "NAME, the last consistent image a replicated group's "
                   "secondary keeps during a replay) or protected "
                   "(NAME@protected-NAME). Default: the consistent one if "
                   "NAME has it, else the protected one.")
@json_result
@pass_ctx
@handle_errors
def lu_rollback(ctx, name, image):
    """Roll LU NAME back to an image kept of it, then release that image.

    A peer clonectl protects an LU's consistent image (NAME@protected-NAME)
    before it ships out-of-order updates to it; if that transfer failed and
    the sender is gone, this puts the protected image back (only the
    extents written since), so the LU is consistent again. A secondary of
    a replicated group keeps the group's last consistent image of every
    volume (NAME@consistent-NAME, all of one point) while a replay makes it
    inconsistent; after a broken replay, rolling every volume back to it
    and then `clonectl rsg promote --force` makes the group's last
    consistent point the new primary's. Needs a running server; stop hosts
    writing to the LU first (on a secondary, detach its primary's link).

    Refused while hosts (NBD or the iSCSI gateway) are connected to NAME,
    or a clone of it runs a protected restore or a reverse sync. While it
    runs NAME is not exported (new connections are refused) and a clone
    restore or reverse sync of it is refused.
    """
    res = _control_call(ctx, "image_rollback", lu=name, image=image)
    click.echo("rolled {} back to {} ({} extents restored)".format(
        name, res["image"], res["extents_restored"]))


@lu.command("delete")
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def lu_delete(ctx, name):
    """Delete the LU NAME.

    Works while a server runs: the LU stops being exported and the other
    LUs keep serving. Refused while hosts are connected to it (disconnect
    them first) or while it has clones, sessions or belongs to a
    replicated group (remove those first). A backing file that clonectl
    created is removed; a file given with --file is kept.

    Exit status: 0 when deleted, 1 when refused (nothing changed).
    """
    with server.served_or_exclusive(ctx.state_dir) as info:
        if info is None:
            def check_busy(name, record):
                reason = inventory.lu_user(ctx.state_dir, name, record)
                if reason:
                    raise errors.LUBusy(name=name, reason=reason)
            record = inventory.delete_lu(ctx.state_dir, name,
                                         check_busy=check_busy)
        else:
            record = _control_call(ctx, "lu_delete", name=name)["record"]
    ctx.last_result = {"name": name, "record": record}
    click.echo("deleted LU {}{}".format(
        name, "" if record["owned"] else
        " (backing file {} kept)".format(record["file"])))


_ACCEPT_HELP = """Take what the --file path of {kind} NAME names now as its storage.

    When {what} was added, clonectl recorded which storage its path named
    (a device's WWID, serial, device-mapper or md UUID, a loop device's
    file, a partition's start; a file's filesystem and inode), and every
    start compares. A path that names other storage now (disks found in
    another order at boot, a loop device attached over another file, a
    symlink retargeted) is not used: {refused}. Run this after moving the
    data there on purpose (copied onto a new disk, restored from a
    backup); the copy must be exact: clonectl cannot tell. The path gets
    the checks of a new --file (not the state directory's, not another
    LU's or clone's, not held by another program), then {what} is opened
    and served. Nothing is copied.

    Also the way to open {what} again once its file is back, when it was
    missing or held by another program at the server's start.

    Example: clonectl {group} accept-storage {example}

    Exit status: 0 when recorded (if {what} still cannot be opened, a
    warning says why, and "error" with --json), 1 when refused (nothing
    changed).
    """


def _accept_storage(ctx, kind, res):
    if res["storage"]:
        click.echo("{} {}: {} is storage {}".format(
            kind, res["name"], res["file"], res["storage"]))
    else:
        click.echo("{} {}: {} has no identity to check (a device that "
                   "reports none, or a file of the state directory)".format(
                       kind, res["name"], res["file"]))
    if res["error"]:
        click.echo("clonectl: warning: {} {} is still not served: {}".format(
            kind, res["name"], res["error"]), err=True)


@lu.command("accept-storage",
            help=_ACCEPT_HELP.format(
                kind="LU", what="the LU", group="lu", example="db",
                refused="the LU is not exported, and status shows why"))
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def lu_accept_storage(ctx, name):
    _accept_storage(ctx, "LU", _target_call(ctx, "lu_accept_storage",
                                            name=name))


@lu.command("resize")
@click.argument("name")
@click.option("--size", metavar="SIZE", required=True,
              help="The new size: bytes or a number with K, M, G, T, P "
                   "(powers of 1024), a multiple of 512, larger than the "
                   "current size.")
@click.option("--file-data", type=click.Choice(inventory.FILE_DATA),
              help="For a --file longer than the LU that holds data where "
                   "the LU grows: zero those bytes of the file, or keep "
                   "them (hosts read them as the new part). Without it "
                   "such a resize is refused.")
@pass_ctx
@handle_errors
def lu_resize(ctx, name, size, file_data):
    """Grow the LU NAME to SIZE.

    Only growing is supported. A backing file (made by clonectl or given
    with --file) is extended and the new part reads as zeros; a block
    device must already have the new size (grow it first), and its new
    part shows what the device holds there. A --file longer than the LU
    that holds data where the LU grows is resized only with --file-data
    (zero or keep those bytes). Works while a
    server runs: NBD connections opened afterwards see the new size;
    connections already open keep the old size until they reconnect, and
    an iSCSI target of the LU keeps its size until the server restarts.
    Refused for an LU with clones, sessions or in a replicated group (their
    copies and maps have the LU's size): remove them, resize, add them
    again.

    Example: clonectl lu resize disk --size 20G

    Exit status: 0 when resized, 1 when refused (nothing changed).
    """
    with server.served_or_exclusive(ctx.state_dir) as info:
        if info is None:
            def check_busy(name, record):
                reason = inventory.lu_user(ctx.state_dir, name, record)
                if reason:
                    raise errors.LUResizeRefused(name=name, reason=reason)
            old, record = inventory.resize_lu(ctx.state_dir, name, size,
                                              check_busy=check_busy,
                                              file_data=file_data)
            old_size = old["size"]
        else:
            # Only when given: a server still running the version before
            # refuses an argument it does not know.
            extra = {"file_data": file_data} if file_data else {}
            res = _control_call(ctx, "lu_resize", name=name, size=size,
                                **extra)
            old_size, record = res["old_size"], res["record"]
    click.echo("resized LU {} from {} to {}".format(
        name, units.format_size(old_size), units.format_size(record["size"])))


# ---------------------------------------------------------------- clone

def _control_call(ctx, op, patience=15.0, **args):
    """A control request, retried while the target restarts (the manager
    restarts a dead nbdkit, which then resumes its work).  A request that
    changes something is sent again only if it never reached the target:
    once delivered, the target may have carried it out before it went,
    and a second one would do it twice or be refused for what the first
    did (errors.OutcomeUnknown)."""
    deadline = time.monotonic() + patience
    # An operation that waits on destinations itself (args["timeout"] per
    # destination) gets the time to report their failure.
    reply_timeout = 30.0 + 4 * float(args.get("timeout") or 0)
    while True:
        try:
            ctx.last_result = control.call(ctx.state_dir.control_socket, op,
                                           reply_timeout=reply_timeout,
                                           **args)
            return ctx.last_result
        except (OSError, errors.ProtocolError) as e:
            # Connecting has no time limit: a timeout is a reply's.
            lost = isinstance(e, (errors.ReplyLost, TimeoutError))
            if lost and operations.changes(op):
                raise errors.OutcomeUnknown(
                    op=op, log=ctx.state_dir.serve_log_file,
                    reason=e.kwargs["reason"] if isinstance(
                        e, errors.Error) else "no reply in {:.0f} s".format(
                            reply_timeout)) from e
            if time.monotonic() > deadline:
                raise errors.Reported(
                    message="the target of {} does not answer ({}); see {}"
                    .format(ctx.state_dir.path, e,
                            ctx.state_dir.serve_log_file))
            time.sleep(0.5)


def _target_call(ctx, op, **args):
    """Run op in the running server or, if none runs, in a Target of this
    process that holds run/serve.lock meanwhile: two Targets on one state
    directory would each recover and rewrite the other's maps."""
    if operations.needs_server(op) and not os.path.exists(
            ctx.state_dir.serve_lock_file):
        # No server ever ran here; do not create the directory to say so.
        raise errors.ServerNotRunning(state_dir=ctx.state_dir.path)
    with server.served_or_exclusive(ctx.state_dir) as info:
        if info is not None:
            return _control_call(ctx, op, **args)
        if operations.needs_server(op):
            raise errors.ServerNotRunning(state_dir=ctx.state_dir.path)
        from .target import Target
        target = Target(ctx.state_dir.path)
        try:
            ctx.last_result = operations.bind(target)[op](**args)
            return ctx.last_result
        finally:
            target.close()


def _left(st):
    """Extents the running operation still has to copy (a restore never
    copies the extents hosts wrote meanwhile: they are not left to do)."""
    restore = st.get("restore")
    return restore["pending_extents"] if restore else st["extents_dirty"]


def _clone_lines(st, width=80):
    """A clone's status in short lines (none wider than width)."""
    lines = ["{}: {}{}".format(st["name"], st["state"],
                               " (broken)" if st.get("broken") else "")]
    lines.append("  {} of {} extents differ from {} ({})".format(
        st["extents_dirty"], st["extents_total"], st["source"],
        units.format_size(st["bytes_dirty"])))
    job = progress.clone_job(st)
    if job is not None:
        op = st["operation"]
        lines.append("  " + progress.line(job, width - 2))
        lines.append("  {} {}, collisions {}, retries {}".format(
            op["operation"], "running" if op.get("running") else "finished",
            op.get("collisions", 0), op.get("retries", 0)))
    return lines


def _wait(ctx, name, target_state):
    """Follow an operation until it ends; exit 1 unless target_state."""
    st = progress.follow(
        lambda: _control_call(ctx, "clone_status", patience=60.0, clone=name),
        progress.clone_job,
        lambda st: (st.get("operation") or {}).get("running"))
    if st["state"] != target_state:
        _fail("clone {} is {}{}".format(
            name, st["state"], ": " + st["error"] if st.get("error") else ""))


@main.group()
def clone():
    """Clones of Source LUs: add, sync, fracture, reverse sync.

    \b
    States and the commands that move between them:
      out-of-sync   --sync-->          syncing --> synchronized
      synchronized  --fracture-->      fractured (exported under its own name)
      fractured     --sync-->          syncing (copies only changed extents)
      fractured     --reverse-sync-->  reverse-syncing --> synchronized
      fractured     --restore-->       restoring --> fractured (clone untouched)
    While synchronized, syncing or reverse-syncing, host writes to the Source
    are written to the clone too before they are acknowledged. Only one
    sync or reverse sync runs per Source at a time. sync and reverse-sync
    need a running server (`clonectl serve`).
    """


@clone.command("add")
@click.argument("source")
@click.argument("name")
@click.option("--file", metavar="PATH",
              help="Existing file or block device to hold the clone, at least "
                   "as large as SOURCE, that no other program holds for "
                   "writing (as for `lu create --file`). Without it a sparse "
                   "file is made in the state directory.")
@click.option("--granularity", metavar="SIZE",
              help="Extent size tracked by one map entry: a power of two from "
                   "2K to 1M (default 64K). Fixed per Source: every clone of "
                   "a Source shares it.")
@json_result
@pass_ctx
@handle_errors
def clone_add(ctx, source, name, file, granularity):
    """Add clone NAME of Source LU SOURCE (at most 8 per Source).

    The clone starts out-of-sync with every extent dirty; run `clonectl
    clone sync NAME` to copy the Source to it.
    """
    st = _target_call(ctx, "clone_add", source=source, clone=name, file=file,
                      granularity=granularity)
    click.echo("added clone {} of {} ({}, granularity {}), {}".format(
        name, source, st["file"], units.format_size(st["granularity"]),
        st["state"]))


@clone.command("remove")
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def clone_remove(ctx, name):
    """Remove clone NAME.

    Refused while it is syncing or reverse-syncing, or while its export has
    connections. A backing file made by clonectl is deleted; one given with
    --file is kept.
    """
    res = _target_call(ctx, "clone_remove", clone=name)
    click.echo("removed clone {}{}".format(
        name, "" if res["owned"] else " (file {} kept)".format(res["file"])))


@clone.command("accept-storage",
               help=_ACCEPT_HELP.format(
                   kind="clone", what="the clone", group="clone",
                   example="db-copy", refused="the clone is broken (its "
                   "Source is served and its writes are tracked in the "
                   "clone's map), and status shows why. Accepted, a "
                   "synchronized clone is out of sync and needs `clonectl "
                   "clone sync`; a restore or reverse sync it was running, "
                   "paused while it was broken, goes on"))
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def clone_accept_storage(ctx, name):
    _accept_storage(ctx, "clone", _target_call(
        ctx, "clone_accept_storage", clone=name))


@clone.command("list")
@click.option("--source", metavar="SOURCE", help="Only clones of SOURCE.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def clone_list(ctx, source, as_json):
    """List clones with their state and how much differs from the Source."""
    rows = _target_call(ctx, "clone_list", source=source)
    if as_json:
        _print_json(rows)
        return
    _table([(r["name"], r["source"], r["state"] + (
             " (broken)" if r.get("broken") else ""),
             units.format_size(r["bytes_dirty"]),
             units.format_size(r["granularity"]), r["file"]) for r in rows],
           ["NAME", "SOURCE", "STATE", "DIRTY", "GRAN", "BACKING"])


@clone.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def clone_status(ctx, name, as_json):
    """Show a clone's state, how much differs from its Source, and its
    running or last operation: done and total bytes, rate, time left,
    collisions and retries; during a protected restore also the extents
    still to copy and the copy-on-demand counters.  Every line fits 80
    columns; --json has every figure."""
    st = _target_call(ctx, "clone_status", clone=name)
    if as_json:
        _print_json(st)
        return
    for line in _clone_lines(st):
        click.echo(line)
    if st.get("error"):
        click.echo("  error: " + st["error"])
    if st.get("verify"):
        for line in _verify_lines(st["verify"]):
            click.echo(line)
    restore = st.get("restore")
    if restore:
        click.echo("  restore: {} extents pending, {} written by hosts".format(
            restore["pending_extents"], restore["protected_extents"]))
        click.echo("  copy on demand: {} requests, {} extents, queue {}, "
                   "wait p50 {} ms, p99 {} ms".format(
                       restore["cod_requests"], restore["cod_extents"],
                       restore["cod_queue_depth"], restore["cod_wait_p50_ms"],
                       restore["cod_wait_p99_ms"]))


_RATE_HELP = ("Copy at most this many bytes per second (e.g. 100M) so host "
              "I/O keeps priority. Default: as fast as possible.")


@clone.command("sync")
@click.argument("name")
@click.option("--wait", is_flag=True,
              help="Wait until synchronized, showing progress; exit 1 if it "
                   "fails.")
@click.option("--rate", metavar="BYTES", help=_RATE_HELP)
@json_result
@pass_ctx
@handle_errors
def clone_sync(ctx, name, wait, rate):
    """Copy the Source to clone NAME (only the dirty extents).

    The first sync copies everything; after a fracture only the extents
    written since on either side. Hosts keep using the Source meanwhile and
    their writes are mirrored. When done the clone is synchronized.
    """
    st = _target_call(ctx, "clone_sync", clone=name, rate=rate)
    click.echo("{}: sync started, {} extents to copy".format(
        name, st["extents_dirty"]))
    if wait:
        _wait(ctx, name, "synchronized")


@clone.command("fracture")
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def clone_fracture(ctx, name):
    """Split synchronized clone NAME off at a consistent point in time.

    Writes in flight finish first and new ones wait a moment, so no write is
    half-mirrored. The clone is then exported under its own name and can be
    read and written; writes to either side are tracked for a later sync or
    reverse sync.
    """
    st = _target_call(ctx, "clone_fracture", clone=name)
    click.echo("{}: {}".format(name, st["state"]))


@clone.command("reverse-sync")
@click.argument("name")
@click.option("--wait", is_flag=True,
              help="Wait until synchronized, showing progress; exit 1 if it "
                   "fails.")
@click.option("--rate", metavar="BYTES", help=_RATE_HELP)
@json_result
@pass_ctx
@handle_errors
def clone_reverse_sync(ctx, name, wait, rate):
    """Copy fractured clone NAME back to its Source (unprotected restore).

    Only extents that differ are copied, from start to end. Meanwhile host
    reads of not-yet-copied extents are served from the clone and host
    writes go to both, so the Source shows the clone's data at once. The
    clone is not protected: it receives the host writes. When done it is
    synchronized. Runs again after a failure or a restart of the server.
    """
    st = _target_call(ctx, "clone_reverse_sync", clone=name, rate=rate)
    click.echo("{}: reverse sync started, {} extents to copy".format(
        name, st["extents_dirty"]))
    if wait:
        _wait(ctx, name, "synchronized")


@clone.command("restore")
@click.argument("name")
@click.option("--full", is_flag=True,
              help="Restore every extent, not only those that differ. The "
                   "one way to resume a restore whose record of the extents "
                   "hosts wrote was lost in a crash (what they wrote since it "
                   "began is overwritten).")
@click.option("--wait", is_flag=True,
              help="Wait until the restore completes, showing progress; exit "
                   "1 if it fails.")
@click.option("--rate", metavar="BYTES", help=_RATE_HELP)
@json_result
@pass_ctx
@handle_errors
def clone_restore(ctx, name, full, wait, rate):
    """Protected restore of the Source from fractured clone NAME.

    The Source shows the clone's data at once: a host read or write of an
    extent not yet copied first has it copied from the clone (copy on
    demand) while the background copy runs from start to end. The clone is
    never modified by the restore; it stays exported, and a write to it
    first restores the extent to the Source, so the Source still gets the
    clone's point-in-time data. Extents hosts write to the Source are never
    copied over. When done the clone stays fractured and its Delta Map holds
    the extents written during the restore. After a crash the restore
    resumes by itself when the server starts.
    """
    st = _target_call(ctx, "clone_restore", clone=name, full=full, rate=rate)
    pending = (st.get("restore") or {}).get("pending_extents", 0)
    click.echo("{}: protected restore started, {} extents to copy".format(
        name, pending))
    if wait:
        _wait(ctx, name, "fractured")


@clone.command("verify")
@click.argument("name")
@click.option("--wait", is_flag=True,
              help="Wait until the verify ends, showing progress; exit 1 if "
                   "it fails or is stopped.")
@click.option("--rate", metavar="BYTES",
              help="Read at most this many bytes of the Source per second "
                   "(e.g. 100M) so host I/O keeps priority. Default: as "
                   "fast as possible.")
@click.option("--stop", is_flag=True,
              help="Stop the running verify of NAME instead; what it found "
                   "so far stays marked.")
@json_result
@pass_ctx
@handle_errors
def clone_verify(ctx, name, wait, rate, stop):
    """Compare clone NAME with its Source online, extent by extent.

    Each extent is read on both sides and compared by checksum while hosts
    keep using the Source (and a fractured clone's export). A host write
    that touches an extent while it is being compared makes the comparison
    start again, so a write in progress is never reported as a difference.

    \b
    What is compared:
      synchronized  every extent
      fractured     only the extents its Delta Map says are equal to the
                    Source (those written on either side since the fracture
                    are known to differ and are copied by the next sync)

    Extents found to differ are reported (count and first offsets) and
    marked in the clone's Delta Map, durably. A synchronized clone stays
    mirrored and is resynchronized at once (it becomes syncing): exactly
    the marked extents are copied. A fractured clone's marked extents are
    copied by its next `clonectl clone sync`. Nothing else is changed.

    One operation runs per Source at a time: sync, reverse sync and restore
    are refused while a verify runs, and the other way round. `clonectl
    clone status NAME --json` shows the last verify under "verify": start
    and end times (seconds since the epoch), extents compared, differing
    and skipped (compared again too often because hosts kept writing them),
    the first differing offsets. Needs a running server.
    """
    st = _target_call(ctx, "clone_verify", clone=name, rate=rate, stop=stop)
    if stop:
        v = st.get("verify") or {}
        click.echo("{}: verify {}".format(
            name, "stopped" if v.get("stopped") else "not running"))
        return
    click.echo("{}: verify started, {} to compare".format(
        name, units.format_size(st["verify"]["bytes_total"])))
    if wait:
        st = progress.follow(
            lambda: _control_call(ctx, "clone_status", patience=60.0,
                                  clone=name),
            progress.verify_job,
            lambda st: (st.get("verify") or {}).get("running"))
        v = st["verify"]
        for line in _verify_lines(v):
            click.echo(line)
        if v.get("error"):
            _fail("verify of clone {} failed: {}".format(name, v["error"]))
        if v.get("stopped"):
            _fail("verify of clone {} was stopped".format(name))


def _verify_lines(v):
    """A verify's result in short lines."""
    lines = ["  verify {}: {} extents compared, {} differ, {} skipped".format(
        "running" if v.get("running") else
        "stopped" if v.get("stopped") else "finished",
        v["extents_compared"], v["extents_differing"], v["extents_skipped"])]
    shown = []
    for offset in v["differing_offsets"]:
        # Within 80 columns, room left for " and N more".
        if len("  differing at " + ", ".join(shown + [str(offset)])) > 64:
            break
        shown.append(str(offset))
    if shown:
        more = v["extents_differing"] - len(shown)
        lines.append("  differing at " + ", ".join(shown) +
                     (" and {} more".format(more) if more > 0 else ""))
    return lines


# ---------------------------------------------------------------- serve

_CONFIG_HELP = (
    "Read option values from this TOML file (also from $CLONECTL_CONFIG). "
    "Its keys are the long option names without the dashes, e.g. "
    "`port = 10809`, `bind = \"0.0.0.0\"`, `allow = [\"10.0.0.0/8\"]`, "
    "`tls-verify-peer = true`; an option given on the command line wins "
    "over the file. Unknown keys and values of the wrong type are refused "
    "(exit status 1). SIGHUP re-reads the file and the inventory without "
    "dropping clients: allow, allow-export, max-connections and "
    "max-connections-per-address apply to new connections at once, other "
    "keys at the next start. See docs/service.md. Keys: ")


def _load_config(ctx, path):
    """--config: the file's values become the command's defaults
    (ctx.default_map), below the command line's."""
    if path is None:
        return None
    from . import config
    try:
        values = config.load(path, ctx.command, ctx)
    except errors.Error as e:
        _fail(str(e))
    ctx.default_map = dict(ctx.default_map or {}, **values)
    ctx.meta["clonectl.config"] = (path, values)
    return path


def _reread_config(ctx, srv):
    """serve's SIGHUP: read the configuration file again.  Allow lists and
    connection limits apply to the next connections at once; other
    changed keys are reported: nbdkit takes them when it starts, and
    restarting it would drop the clients.  A key also given on the command
    line keeps the command line's value."""
    from click.core import ParameterSource
    path, values = ctx.meta.get("clonectl.config", (None, None))
    if path is None:
        return
    from . import config
    try:
        new = config.load(path, ctx.command, ctx)
    except errors.Error as e:
        srv.say("warning: {}; the running configuration stays".format(e))
        return
    path = os.path.abspath(path)
    names = {param.name: key for key, param in
             config.keys(ctx.command).items()}
    live, restart = {}, []
    for key in config.changed_keys(values, new, ctx.command):
        name = next(n for n, k in names.items() if k == key)
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            srv.say("warning: configuration file {}: {} changed, but "
                    "--{} on the command line wins".format(path, key, key))
        elif name in server.Server.LIVE:
            live[name] = new.get(name)
        else:
            restart.append(key)
    if live:
        current = {n: ctx.params.get(n) for n in server.Server.LIVE}
        current.update(ctx.meta.get("clonectl.live", {}))
        current.update(live)
        try:
            srv.set_access(tuple(current["allow"] or ()),
                           tuple(current["allow_export"] or ()),
                           current["max_connections"],
                           current["max_per_address"])
        except (OSError, errors.Error) as e:
            srv.say("warning: configuration file {}: {}; the running "
                    "configuration stays".format(path, e))
            return
        ctx.meta["clonectl.live"] = current
        srv.say("configuration file {}: {} applied to new connections"
                .format(path, ", ".join(names[n] for n in sorted(live))))
    if restart:
        srv.say("warning: configuration file {}: {} changed; restart the "
                "server to apply".format(path, ", ".join(restart)))
    # What runs now: the keys that wait for a restart keep their values.
    running = dict(new)
    for name, key in names.items():
        if key in restart:
            running.pop(name, None)
            if name in values:
                running[name] = values[name]
    ctx.meta["clonectl.config"] = (ctx.meta["clonectl.config"][0], running)


@main.command()
@click.option("--socket", "socket_path", metavar="PATH",
              help="Listen on this Unix socket. Default when neither "
                   "--socket nor --port is given: run/nbd.sock in the state "
                   "directory.")
@click.option("--port", type=click.IntRange(1, 65535), metavar="N",
              help="Listen on this TCP port instead of a Unix socket.")
@click.option("--bind", metavar="ADDR",
              help="Address for --port (default 127.0.0.1; use 0.0.0.0 to "
                   "serve other hosts).")
@click.option("--tls-psk", metavar="FILE",
              help="Require TLS with pre-shared keys from FILE (lines of "
                   "USERNAME:HEXKEY, mode 0600; `psktool -u NAME -p FILE` "
                   "makes one). Clients without a key get nothing, not even "
                   "the list of exports.")
@click.option("--tls-certificates", metavar="DIR",
              help="Require TLS with X.509 certificates from DIR: "
                   "ca-cert.pem, server-cert.pem and server-key.pem (the key "
                   "mode 0600), as nbdkit-tls(1) describes. Clients must "
                   "trust the CA (libnbd: tls-certificates=DIR holding "
                   "ca-cert.pem; the certificate must name the address they "
                   "connect to); others get nothing. Client certificates "
                   "are not checked unless --tls-verify-peer is given. "
                   "Exclusive with --tls-psk.")
@click.option("--tls-verify-peer", is_flag=True,
              help="With --tls-certificates: also require every client to "
                   "present a certificate signed by the CA of DIR "
                   "(ca-cert.pem), as nbdkit's --tls-verify-peer does "
                   "(libnbd: client-cert.pem and client-key.pem next to "
                   "ca-cert.pem in its tls-certificates directory). Clients "
                   "without one, or with one signed by another CA, get "
                   "nothing, not even the list of exports.")
@click.option("--allow", "allow", multiple=True, metavar="ADDR[/PREFIX]",
              help="Accept NBD clients only from this IPv4 or IPv6 address or "
                   "network; repeatable. Others are disconnected before the "
                   "handshake and before TLS. Needs --port. Without it every "
                   "client that reaches the port is served.")
@click.option("--allow-export", "allow_export", multiple=True,
              metavar="EXPORT=ADDR[/PREFIX]",
              help="Let only clients from this IPv4 or IPv6 address or "
                   "network open EXPORT (an LU, a clone, or SRC@NAME); "
                   "repeatable, the networks given for one export add up. "
                   "Other clients are refused when they ask for EXPORT "
                   "(EACCES; nothing changes) and do not see it in the list "
                   "of exports. SRC@NAME exports (frozen session images) "
                   "without rules of their own follow the rules of SRC. "
                   "Exports without rules stay open. Combines with --allow: "
                   "a client must pass both. Needs --port.")
@click.option("--max-connections", type=click.IntRange(1, None),
              metavar="N",
              help="Serve at most N NBD connections at once; more are closed "
                   "before the handshake (and logged). A connection counts "
                   "from its accept, so clients that connect and send "
                   "nothing count too. Default: what the open-file limit "
                   "(raised to its hard limit at start) leaves after a "
                   "reserve for the engines' own files (a quarter, at least "
                   "128), at most 1024.")
@click.option("--max-connections-per-address", "max_per_address",
              type=click.IntRange(0, None), metavar="N",
              help="Serve at most N NBD connections at once from one client "
                   "address (0: no such limit; default 64). Loopback and "
                   "Unix socket clients, among them the iSCSI gateway, count "
                   "only against --max-connections.")
@click.option("--detach", is_flag=True,
              help="Run in the background; return once clients can connect. "
                   "The log is run/serve.log in the state directory.")
@click.option("--pidfile", metavar="FILE",
              help="Write the server's pid here (removed on exit).")
@click.option("--thread-model", hidden=True,
              type=click.Choice(["parallel", "serialize_requests",
                                 "serialize_all_requests"]),
              help="nbdkit thread model (for benchmarks; parallel is unsafe "
                   "with nbdkit 1.32, docs/known-gaps.md).")
@click.option("--threads", hidden=True, type=click.IntRange(1, 256),
              help="nbdkit worker threads per connection (for benchmarks).")
@click.option("--thread-state", hidden=True,
              type=click.Choice(["connection", "connection_thread",
                                 "request"]),
              help="How long the plugin keeps a Python thread state "
                   "(for benchmarks).")
@click.option("--peer-port", type=click.IntRange(1, 65535), metavar="N",
              help="Also listen on TCP port N for requests from other "
                   "clonectl managers that ship sessions to this target: "
                   "protect an LU's image before a transfer, release it "
                   "after (see `clonectl session create --peer-dest`). "
                   "Needs --peer-token-file.")
@click.option("--peer-bind", default="127.0.0.1", show_default=True,
              metavar="ADDR", help="Address for --peer-port.")
@click.option("--peer-token-file", metavar="FILE",
              help="File holding the shared token (16+ characters, the file "
                   "mode 0600 or it is refused) that peers must prove they "
                   "hold; others get nothing. The token never crosses the "
                   "wire: both sides prove it by challenge-response "
                   "(HMAC-SHA256 of fresh nonces).")
@click.option("--peer-tls-certificates", metavar="DIR",
              help="Require TLS on --peer-port with the X.509 certificates "
                   "of DIR, laid out as for --tls-certificates (ca-cert.pem, "
                   "server-cert.pem, server-key.pem mode 0600; it may be "
                   "the same DIR); plain clients are refused. Peers give "
                   "`session create --peer-tls-certificates` a DIR with "
                   "ca-cert.pem. Certificates only: no PSK on this port.")
@click.option("--iscsi-portal", metavar="ADDR:PORT",
              help="Also serve every LU and fractured clone as an iSCSI "
                   "target (one LUN, LUN 1) on this portal, through a private "
                   "tgtd reading our own NBD export (nbdfuse): same data "
                   "path as NBD hosts.")
@click.option("--iqn-prefix", metavar="PREFIX",
              help="Target names are PREFIX + export name (default "
                   "iqn.2026-11.org.clonectl:).")
@click.option("--iscsi-allow", "iscsi_allow", multiple=True,
              metavar="[EXPORT=]IQN",
              help="Initiator names allowed to log in (to EXPORT only, or to "
                   "every target); repeatable. Without it only loopback "
                   "initiators (127.0.0.1, ::1) may log in.")
@click.option("--iscsi-chap", metavar="USER:SECRETFILE",
              help="Initiators must log in with CHAP as USER with the secret "
                   "in SECRETFILE (one line, 12-255 characters, the file "
                   "mode 0600 or it is refused); every target gets the "
                   "account.")
@click.option("--iscsi-chap-mutual", metavar="USER:SECRETFILE",
              help="Mutual CHAP: the target also proves itself to the "
                   "initiator as USER with this secret (which must differ "
                   "from the --iscsi-chap one). Needs --iscsi-chap.")
@click.option("--replication-port", type=click.IntRange(1, 65535),
              metavar="N",
              help="Be a replication secondary: accept updates of replicated "
                   "storage groups from primaries on TCP port N (see `clonectl "
                   "rsg link`). Needs --replication-token-file.")
@click.option("--replication-bind", default="127.0.0.1", show_default=True,
              metavar="ADDR", help="Address for --replication-port.")
@click.option("--replication-token-file", metavar="FILE",
              help="File holding the shared token (16+ characters, the file "
                   "mode 0600 or it is refused) that a primary must prove it "
                   "holds; others get nothing. The token never crosses the "
                   "wire: both sides prove it by challenge-response "
                   "(HMAC-SHA256 of fresh nonces).")
@click.option("--replication-tls-certificates", metavar="DIR",
              help="Require TLS on --replication-port with the X.509 "
                   "certificates of DIR, laid out as for --tls-certificates "
                   "(ca-cert.pem, server-cert.pem, server-key.pem mode 0600; "
                   "it may be the same DIR); plain primaries are refused. "
                   "Primaries give `rsg link --tls-certificates` a DIR with "
                   "ca-cert.pem. Certificates only: no PSK on this port.")
@click.option("--metrics", metavar="[ADDR:]PORT",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics and "
                   "a read-only status page (LUs, clones with a picture of "
                   "each map, sessions, links, running jobs) at "
                   "http://ADDR:PORT/. ADDR defaults to 127.0.0.1 (the page "
                   "shows names and paths: use 0.0.0.0 or an address only "
                   "where that is fine); e.g. --metrics 9100. See "
                   "docs/monitoring.md.")
@click.option("--config", "config_file", metavar="FILE",
              envvar="CLONECTL_CONFIG", is_eager=True, expose_value=False,
              callback=lambda ctx, param, value: _load_config(ctx, value),
              help=_CONFIG_HELP)
@pass_ctx
@handle_errors
def serve(ctx, socket_path, port, bind, tls_psk, tls_certificates,
          tls_verify_peer, allow, allow_export, max_connections,
          max_per_address, detach, pidfile, thread_model, threads,
          thread_state, peer_port, peer_bind, peer_token_file,
          peer_tls_certificates, iscsi_portal, iqn_prefix, iscsi_allow, iscsi_chap,
          iscsi_chap_mutual, replication_port, replication_bind,
          replication_token_file, replication_tls_certificates, metrics):
    """Serve every LU over NBD until SIGTERM or SIGINT.

    One nbdkit server exports every LU under its own name (`nbdinfo --list`).
    LUs created while serving are exported without a restart. Unknown export
    names are refused at the handshake. If nbdkit dies it is restarted;
    SIGTERM stops it cleanly and removes the sockets. One server per state
    directory.

    With --iscsi-portal every LU and fractured clone is also an iSCSI target
    named PREFIX+NAME with one LUN (LUN 1), added and removed as exports come
    and go; read-only LUs are read-only targets. SIGTERM stops tgtd, then
    unmounts the nbdfuse mounts, then stops nbdkit. --iscsi-chap makes
    initiators log in with CHAP (one-way); adding --iscsi-chap-mutual makes
    the target prove itself to them too (mutual). The secret files must be
    mode 0600; the secrets are passed to tgtd through tgtadm's command line
    for the moment tgtadm runs (see docs/operations.md).

    Access over TCP: --tls-psk or --tls-certificates make TLS mandatory
    (clients without it get nothing, not even the export list), and
    --tls-verify-peer makes X.509 clients prove who they are with a
    certificate from the same CA; --allow keeps out clients from other
    addresses before the handshake; --allow-export keeps clients from other
    addresses away from one export, checked when they open it. They
    combine. None can be used with --iscsi-portal yet.

    Limits: --max-connections and --max-connections-per-address cap NBD
    connections, idle ones included, so that idle clients cannot use up
    the descriptors that the engines need (a flush commits maps to files).
    The replication and peer ports take, from a client that has not shown
    the token, a TLS handshake and two small messages (64 KiB at most)
    within 10 s, on at most 8 such connections at once; others are closed
    at once. The token of these ports never crosses the wire (each side
    proves it holds it); --replication-tls-certificates and
    --peer-tls-certificates encrypt them too (see docs/replication.md,
    docs/sessions.md). Repeated
    log lines are suppressed beyond 10 a minute, and counted in the next
    line that passes.

    As a service: --config FILE (or $CLONECTL_CONFIG) reads these options
    from a TOML file (keys listed under --config; the command line wins).
    Under systemd (packaging/clonectl.service, Type=notify) the server
    reports READY=1 once nbdkit completes an NBD handshake, RELOADING=1 and
    READY=1 around a reload, STOPPING=1 on SIGTERM. SIGHUP re-reads the
    configuration file and the inventory without dropping clients. The log,
    run/serve.log, has one line per event with its ISO-8601 UTC time, level
    and component, including the start, end and figures of every sync,
    restore, fracture, transfer and replay. See docs/service.md.

    \b
    Examples:
      clonectl serve --config /etc/clonectl/clonectl.toml
      clonectl serve --config /etc/clonectl/clonectl.toml --port 10900
      kill -HUP "$(cat /run/clonectl.pid)"   # with --pidfile: reload

    Exit status: 0 after a clean stop; 1 if the server cannot start or
    nbdkit keeps dying; 2 for usage errors.
    """
    if socket_path is None and port is None:
        socket_path = ctx.state_dir.default_nbd_socket
    listen = server.Listen(socket_path, port, bind, tls_psk=tls_psk,
                           tls_certificates=tls_certificates, allow=allow,
                           tls_verify_peer=tls_verify_peer,
                           allow_export=allow_export,
                           max_connections=max_connections,
                           max_per_address=max_per_address)
    peer_listen = None
    if peer_port is not None:
        if not peer_token_file:
            raise click.UsageError("--peer-port needs --peer-token-file")
        if peer_tls_certificates:
            from . import channel
            channel.server_context(peer_tls_certificates,
                                   "--peer-tls-certificates")
        peer_listen = (peer_bind, peer_port,
                       fsutil.read_token(peer_token_file, "peer"),
                       peer_tls_certificates)
    elif peer_token_file or peer_tls_certificates:
        raise click.UsageError("--peer-token-file and --peer-tls-certificates "
                               "need --peer-port")
    iscsi_conf = None
    for given, option in ((tls_psk, "--tls-psk"),
                          (tls_certificates, "--tls-certificates"),
                          (tls_verify_peer, "--tls-verify-peer"),
                          (allow, "--allow"),
                          (allow_export, "--allow-export")):
        if iscsi_portal and given:
            # The gateway's nbdfuse connects to our NBD export from
            # loopback, without TLS.
            raise click.UsageError("--iscsi-portal cannot be combined with "
                                   "{} yet".format(option))
    if iscsi_portal:
        from . import iscsi
        iscsi_conf = {"portal": iscsi.parse_portal(iscsi_portal),
                      "iqn_prefix": iqn_prefix,
                      "allow": iscsi.parse_allow(iscsi_allow)}
        if iscsi_chap_mutual and not iscsi_chap:
            raise click.UsageError("--iscsi-chap-mutual needs --iscsi-chap")
        if iscsi_chap:
            iscsi_conf["chap"] = iscsi.parse_chap(iscsi_chap, "--iscsi-chap")
        if iscsi_chap_mutual:
            iscsi_conf["chap_mutual"] = iscsi.parse_chap(
                iscsi_chap_mutual, "--iscsi-chap-mutual")
            if iscsi.read_chap_secret(iscsi_conf["chap"][1]) == \
                    iscsi.read_chap_secret(iscsi_conf["chap_mutual"][1]):
                # RFC 3720 8.2.1: one secret both ways lets a rogue
                # target replay the initiator's own answer.
                raise errors.InvalidArgument(
                    reason="--iscsi-chap and --iscsi-chap-mutual must use "
                           "different secrets")
    elif iqn_prefix or iscsi_allow or iscsi_chap or iscsi_chap_mutual:
        raise click.UsageError("--iqn-prefix, --iscsi-allow and "
                               "--iscsi-chap need --iscsi-portal")
    replication_conf = None
    if replication_port is not None:
        if not replication_token_file:
            raise click.UsageError("--replication-port needs "
                                   "--replication-token-file")
        from . import channel, replication
        replication.read_token(replication_token_file)
        if replication_tls_certificates:
            channel.server_context(replication_tls_certificates,
                                   "--replication-tls-certificates")
        replication_conf = (replication_bind, replication_port,
                            replication_token_file,
                            replication_tls_certificates)
    elif replication_token_file or replication_tls_certificates:
        raise click.UsageError("--replication-token-file and "
                               "--replication-tls-certificates need "
                               "--replication-port")
    metrics_listen = None
    if metrics is not None:
        from . import monitor
        metrics_listen = monitor.parse_address(metrics)
    srv = server.Server(ctx.state_dir, listen, thread_model=thread_model,
                        threads=threads, thread_state=thread_state,
                        pidfile=pidfile, peer=peer_listen,
                        iscsi=iscsi_conf, replication=replication_conf,
                        metrics=metrics_listen)
    click_ctx = click.get_current_context()
    srv.on_reload = lambda srv: _reread_config(click_ctx, srv)
    if detach:
        info = server.serve_detached(srv)
        click.echo("serving on {} (pid {})".format(
            info["socket"] or "{}:{}".format(info["bind"], info["port"]),
            info["pid"]))
        return

    def ready(info):
        srv.say("serving on {} (pid {}); URI {}".format(
            info["socket"] or "{}:{}".format(info["bind"], info["port"]),
            info["pid"], info["uri"]))

    srv.run(ready=ready)
    srv.say("stopped")


def _document_config_keys(command):
    from . import config
    for param in command.params:
        if param.name == "config_file":
            param.help += config.help_text(command) + "."


_document_config_keys(serve)


@main.command()
@pass_ctx
@handle_errors
def stop(ctx):
    """Stop the server of the state directory (SIGTERM, then wait).

    Engines stop where they are (they resume at the next start) and the
    maps are committed first. A server still starting is waited for (up
    to 10 s), then stopped. Succeeds (exit status 0, "no server runs")
    when no server runs: the server is stopped either way.
    """
    try:
        info = server.stop(ctx.state_dir)
    except errors.ServerNotRunning:
        click.echo("no server runs on {}".format(ctx.state_dir.path))
        return
    click.echo("stopped server pid {}".format(info["pid"]))


def _degraded(st):
    """Why a status is degraded (exit status 4): a list of reasons."""
    out = []
    for lu in st["lus"]:
        if lu.get("error"):
            out.append("LU {}: {}".format(lu["name"], lu["error"]))
    for c in st["clones"]:
        if c.get("broken"):
            out.append("clone {} is broken: {}".format(c["name"], c["error"]))
        elif c.get("error") and c["state"] == "out-of-sync":
            out.append("clone {} is out-of-sync: {}".format(c["name"],
                                                           c["error"]))
    for s in st["sessions"]:
        if s.get("failure"):
            out.append("session {}: {}".format(s["name"], s["failure"]))
    for r in st["rsgs"]:
        if r.get("loaded") is False:
            out.append("group {}: {}".format(r["name"], r.get("error")))
        for l in r.get("links") or []:
            if l["state"] == "failed":
                out.append("group {}: link to {} failed{}".format(
                    r["name"], l["secondary"], ": " + l["error"]
                    if l.get("error") else ""))
    for p in st["problems"] or []:
        what = ", ".join("{} {}".format(k, p[k]) for k in
                         ("lu", "source", "clone", "session", "rsg")
                         if p.get(k))
        out.append("recovery problem: {}: {}".format(what, p["message"]))
    return out


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: state_dir, server (null when none "
                   "runs), lus, clones, sessions, rsgs, iscsi, problems, "
                   "degraded (the reasons for exit status 4). Sizes are "
                   "bytes, times ISO 8601 UTC strings.")
@pass_ctx
@handle_errors
def status(ctx, as_json):
    """Show the server, every LU, clone, session and replicated group.

    \b
    Tables: LUs (size, mode, served, connections, backing), clones (Source,
    state, dirty bytes, running operation and its progress), sessions
    (Source, marked since, extents to send, transfer), replicated groups
    (role, SRL use, each link's state and lag), then recovery problems.
    Sizes are in IEC units (KiB, MiB, GiB: powers of 1024), times in ISO
    8601 UTC.

    \b
    Exit status:
      0  the server runs and all is well
      1  error (the status could not be read)
      2  usage error
      3  no server runs (the LUs of the inventory are still listed)
      4  degraded: an LU or a clone that is broken, a clone out-of-sync
         with an error, a session whose last transfer failed (or that
         gave up its mark), a failed replication link, a group that did
         not load, recovery problems, or a server whose target does not
         answer; the reasons are printed last ("degraded" in --json)

    \b
    Examples:
      clonectl status
      clonectl status --json | jq '.clones[] | {name, state}'
      clonectl status >/dev/null; echo $?    # for a monitoring check
    """
    info, answer = _served(ctx)
    rows, problems = _lu_rows(ctx, info, answer)
    live = answer or {}
    iscsi_targets = None
    if info and info.get("iscsi"):
        from . import iscsi
        iscsi_targets = iscsi.show_status(info["iscsi"]["control_port"])
    rsgs = []
    if info and answer is not None:
        rsgs = control.try_call(ctx.state_dir.control_socket, "rsg_list") \
            or []
    st = {"state_dir": ctx.state_dir.path, "server": info, "lus": rows,
          "clones": live.get("clones", []),
          "sessions": live.get("sessions", []), "rsgs": rsgs,
          "iscsi": iscsi_targets, "problems": problems}
    st["degraded"] = _degraded(st)
    if info and answer is None:
        # Nothing of the LUs, clones, sessions or groups is known.
        st["degraded"].insert(0, "the server (pid {}) runs but its target "
                              "does not answer on {} (nbdkit starting "
                              "again, or hung; see {})".format(
                                  info["pid"], ctx.state_dir.control_socket,
                                  ctx.state_dir.serve_log_file))
    code = EXIT_NOT_RUNNING if info is None else \
        EXIT_DEGRADED if st["degraded"] else EXIT_OK
    if as_json:
        _print_json(st)
        sys.exit(code)
    if info:
        click.echo("server: pid {}, listening on {}, started {}{}".format(
            info["pid"], info["socket"] or "{}:{}".format(info["bind"],
                                                          info["port"]),
            units.format_time(info.get("started")) or "-",
            ", metrics on http://{}/".format(info["metrics"])
            if info.get("metrics") else ""))
    else:
        click.echo("server: not running")
    _table([(r["name"], units.format_size(r["size"]),
             "ro" if r["readonly"] else "rw",
             "yes" if r["served"] else ("error" if r["error"] else "no"),
             r["connections"], r["file"]) for r in rows],
           ["NAME", "SIZE", "MODE", "SERVED", "CONNS", "BACKING"])
    for r in rows:
        if r["error"]:
            click.echo("  {}: {}".format(r["name"], r["error"]))
    if st["clones"]:
        click.echo()
        _table([_clone_row(c) for c in st["clones"]],
               ["CLONE", "SOURCE", "STATE", "DIRTY", "CONNS", "OPERATION"])
    if st["sessions"]:
        click.echo()
        _table([(x["name"], x["source"],
                 units.format_time(x["mark_time"]) if x["marked"] else "no",
                 x["extents_to_send"],
                 "running" if x["transferring"] else
                 (x["last_transfer"] or {}).get("result", "-"),
                 len(x["destinations"])) for x in st["sessions"]],
               ["SESSION", "SOURCE", "MARKED", "TO-SEND", "TRANSFER",
                "DESTS"])
    if rsgs:
        click.echo()
        for r in rsgs:
            _print_rsg(r)
    if iscsi_targets is not None:
        click.echo("iSCSI portal {}:".format(info["iscsi"]["portal"]))
        _table([(iqn, t["tid"], len(t["sessions"]), ", ".join(
                 "{} ({})".format(n["initiator"], n["address"])
                 for n in t["sessions"]))
                for iqn, t in sorted(iscsi_targets.items())],
               ["TARGET", "TID", "SESSIONS", "INITIATORS"])
    for reason in st["degraded"]:
        click.echo("degraded: " + reason)
    sys.exit(code)


def _clone_row(c):
    op = c.get("operation") or {}
    if op.get("running"):
        left = c["bytes_dirty"]
        if c.get("restore"):
            left = min(c["size"], c["restore"]["pending_extents"] *
                       c["granularity"])
        total = op.get("bytes_copied", 0) + left
        what = "{} {}/{} {}".format(
            op["operation"], units.format_size(op.get("bytes_copied", 0)),
            units.format_size(total), units.format_rate(op.get("rate")))
    else:
        what = "-"
    return (c["name"], c["source"], c["state"] + (
            " (broken)" if c.get("broken") else ""),
            units.format_size(c["bytes_dirty"]), c["connections"], what)


# ---------------------------------------------------------------- events

def _event_line(e):
    fields = " ".join("{}={}".format(k, _event_value(k, v))
                      for k, v in sorted(e.items())
                      if k not in ("seq", "time", "kind", "object", "change"))
    return "{} {} {} {}{}".format(e.get("time") or "-", e["kind"],
                                  e["object"], e["change"],
                                  " " + fields if fields else "")


def _event_value(key, value):
    if key in ("bytes_copied", "bytes_sent", "size") and \
            isinstance(value, int):
        return units.format_size(value)
    if key == "rate" and isinstance(value, (int, float)):
        return units.format_rate(value)
    if value is None:
        return "-"
    text = str(value)
    return json.dumps(text) if " " in text or not text else text


@main.command()
@click.option("--now", is_flag=True,
              help="Print the current state as events and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per line (an event), flushed at "
                   "once: for scripts and log shippers.")
@pass_ctx
@handle_errors
def events(ctx, now, as_json):
    """Print every state change of the running server, as it happens.

    First the current state, one event per object (change "state"): LUs,
    clones, running operations, sessions and their transfers, replicated
    groups and their links, recovery problems. Then, until interrupted
    (Ctrl-C), every change: clone states (synchronized, fractured,
    restoring, out-of-sync ...), operation start, progress (about once a
    second) and end, session mark and unmark, transfer start and end,
    replication link states, role changes (promote, demote), LUs and
    clones added or removed, recovery problems.

    \b
    Each event: seq (its number, counting from the server's start), time
    (ISO 8601 UTC), kind (lu, clone, operation, session, transfer, rsg,
    link, problem), object (its name; a link is GROUP->HOST:PORT), change
    (state, new, changed, removed) and the fields that changed, with their
    new values. The server keeps the last 4096 events; a reader that falls
    further behind is told how many it lost. If the server's target
    restarts, the current state is printed again.

    \b
    Examples:
      clonectl events                 # follow, as text
      clonectl events --now --json    # the state, one JSON object a line
      clonectl events --json | jq -c 'select(.kind == "clone")'

    \b
    Exit status: 0 (--now, or interrupted), 1 error, 3 no server runs or
    the server stopped.
    """
    def emit(e):
        if as_json:
            click.echo(json.dumps(units.iso_times(e), sort_keys=True))
        else:
            click.echo(_event_line(e))
        sys.stdout.flush()

    def call(**args):
        try:
            return control.call(ctx.state_dir.control_socket, "events_since",
                                reply_timeout=40.0, **args)
        except (OSError, errors.ProtocolError):
            return None

    if server.read_serve_info(ctx.state_dir) is None:
        _fail(str(errors.ServerNotRunning(state_dir=ctx.state_dir.path)),
              code=EXIT_NOT_RUNNING)
    try:
        res = None
        pid = None
        while True:
            if res is None:
                res = call()
                if res is None:
                    if server.read_serve_info(ctx.state_dir) is None:
                        _fail("the server stopped", code=EXIT_NOT_RUNNING)
                    time.sleep(0.5)     # the target restarts
                    continue
                pid = res.get("pid")
                for e in res["events"]:
                    emit(e)
                if now:
                    return
            seq = res["seq"]
            res = call(seq=seq, timeout=20.0)
            if res is None or res.get("pid") != pid:
                res = None      # a new target: its state again
                continue
            if res["lost"]:
                click.echo("clonectl: warning: {} events were lost (the "
                           "reader fell behind)".format(res["lost"]),
                           err=True)
            for e in res["events"]:
                emit(e)
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------- sessions


@main.group()
def session():
    """Incremental copy sessions: ship a Source's changes to NBD destinations.

    \b
    A session tracks which extents of its Source change. A transfer sends
    a frozen point in time of the Source to every destination:
      mark      the changes tracked so far become the transfer map, a new
                tracking map starts; the point in time is frozen (host
                writes to extents still to be sent first save the old data
                to the session's save area: copy on first write)
      transfer  sends the frozen extents to every destination (the first
                transfer to a destination sends everything), flushes it, and
                unmarks the session on success
      unmark    discards the frozen image; its extents go back to the
                tracking map, so the next transfer still sends them
      update    mark + transfer in one step (optionally --every INTERVAL)
    \b
    A destination is any NBD export of the Source's size (clonectl serve,
    qemu-nbd, nbdkit): nbd://HOST[:PORT]/EXPORT or
    nbd+unix:///EXPORT?socket=PATH. It is "consistent" (equal to the last
    marked point in time) only after a marked transfer to it completed;
    during a transfer, and after a full copy while unmarked, it is
    "inconsistent". transfer and update need a running server.
    """


def _session_line(st):
    marked = "marked" if st["marked"] else "unmarked"
    if st["marked"] and st.get("mark_time"):
        marked += " at " + units.format_time(st["mark_time"])
    if st["marked"] and st.get("frozen_export"):
        marked += " (frozen export {})".format(st["frozen_export"])
    tr = st.get("transfer") or {}
    line = "{} on {}: {}, {} extents tracked, {} to send, {} blocks " \
        "saved (COFW), save area {}/{}".format(
            st["name"], st["source"], marked, st["tracked_extents"],
            st["extents_to_send"], st["cofw_count"],
            units.format_size(st["save_area"]["used_bytes"]),
            units.format_size(st["save_area"]["size"]))
    if st.get("transferring"):
        job = progress.transfer_job(st)
        line += ", transferring: {:.1f}% ({} of {}), {} sent, {}".format(
            job.percent, units.format_size(job.done),
            units.format_size(job.total),
            units.format_size(tr.get("bytes_sent", 0)), units.format_rate(
                job.rate))
    return line


def _print_session(st):
    click.echo(_session_line(st))
    if st.get("error"):
        click.echo("  error: " + st["error"])
    for p in st.get("problems") or []:
        click.echo("  recovery: " + p)
    last = st.get("last_transfer")
    if last:
        click.echo("  last transfer: {}, {} sent, {} zeroed, {} s, finished "
                   "{}".format(last["result"],
                               units.format_size(last["bytes_sent"]),
                               units.format_size(last["bytes_zeroed"]),
                               last["seconds"],
                               units.format_time(last.get("finished")) or "-"))
    for d in st["destinations"]:
        when = units.format_time(d["last_success"]) if d["last_success"] \
            else "never"
        click.echo("  -> {}: {}, {} extents pending{}, {} sent, last success "
                   "{}{}".format(d["uri"], d["state"], d["pending_extents"],
                                 " (next transfer is full)" if d["needs_full"]
                                 else "", units.format_size(d["bytes_sent"]),
                                 when, ", error: " + d["last_error"]
                                 if d["last_error"] else ""))


def _wait_transfer(ctx, name, st):
    """Follow the transfer of st (the session's status once it began)
    until it ends; exit 1 unless that transfer completed.  Told apart by
    its start: a target that went away meanwhile (restarted) has an older
    transfer as its last."""
    started = (st.get("transfer") or {}).get("started")
    if started is None:
        _fail("session {} has run no transfer since the server started"
              .format(name))
    st = progress.follow(
        lambda: _control_call(ctx, "session_status", patience=60.0,
                              name=name),
        progress.transfer_job, lambda st: st.get("transferring"))
    last = st.get("last_transfer") or {}
    if last.get("started") != started:
        _fail("session {}: the transfer begun {} did not end: the target "
              "went away meanwhile (see `clonectl status`); what it did not "
              "send is still to send: `clonectl session transfer {}` sends "
              "it (a transfer running now: `clonectl wait {}`)".format(
                  name, units.format_time(started), name, name))
    result = last.get("result", "unknown")
    if result != "completed":
        _fail("session {}: transfer {}".format(name, result))
    click.echo("session {}: transfer completed, {} sent".format(
        name, units.format_size(st["last_transfer"]["bytes_sent"])))


@session.command("create")
@click.argument("source")
@click.argument("name")
@click.option("--dest", "dests", multiple=True, metavar="URI",
              help="A destination NBD URI (repeat for several). It must "
                   "answer, be writable and have the Source's size; nothing "
                   "is written to it until the first transfer.")
@click.option("--peer-dest", "peer_dests", multiple=True, nargs=2,
              metavar="URI HOST:PORT",
              help="A destination served by another clonectl whose manager "
                   "takes peer requests at HOST:PORT (its `serve "
                   "--peer-port`): before each transfer its consistent image "
                   "is protected there, and released after success. A "
                   "failed transfer leaves it protected; the admin there can "
                   "`clonectl lu rollback` to it.")
@click.option("--peer-token-file", metavar="FILE",
              help="The token shared with the peers (same file content as "
                   "their --peer-token-file; the file mode 0600 or it is "
                   "refused). It is proven, never sent.")
@click.option("--peer-tls-certificates", metavar="DIR",
              help="Talk to the peers with TLS: DIR holds ca-cert.pem, the "
                   "CA that signed their --peer-tls-certificates (the "
                   "certificate must name the HOST of --peer-dest), and "
                   "optionally client-cert.pem and client-key.pem (mode "
                   "0600). The NBD data itself goes by the URI (nbds:// for "
                   "TLS).")
@click.option("--granularity", metavar="SIZE",
              help="Extent size tracked by one map entry: a power of two "
                   "from 2K to 1M. Default 64K.")
@click.option("--save-area", metavar="SIZE",
              help="Room for old data saved by copy on first write while "
                   "marked (a sparse file in the state directory). If it "
                   "fills, the session is unmarked, the error is shown in "
                   "its status and nothing is lost from the next transfer. "
                   "Default: the Source's size (it can never fill).")
@click.option("--timeout", default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for each destination to answer.")
@json_result
@pass_ctx
@handle_errors
def session_create(ctx, source, name, dests, peer_dests, peer_token_file,
                   peer_tls_certificates, granularity, save_area, timeout):
    """Create session NAME on SOURCE, shipping to one or more destinations.

    From now on writes to SOURCE are tracked. The first transfer to each
    destination copies the whole Source.
    """
    if not dests and not peer_dests:
        raise click.UsageError("give at least one --dest or --peer-dest")
    st = _target_call(ctx, "session_create", source=source, name=name,
                      dests=list(dests), peer_dests=[list(p) for p in
                                                     peer_dests],
                      peer_token_file=peer_token_file,
                      peer_tls_certificates=peer_tls_certificates,
                      granularity=granularity, save_area=save_area,
                      timeout=timeout)
    n = len(st["destinations"])
    click.echo("created session {} on {} ({} destination{}, granularity {})"
               .format(name, source, n, "" if n == 1 else "s",
                       units.format_size(st["granularity"])))


@session.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even while marked.")
@json_result
@pass_ctx
@handle_errors
def session_delete(ctx, name, force):
    """Delete session NAME, its maps and its save area.

    Refused while a transfer runs, and while marked unless --force, which
    unmarks it first: the reads of hosts still connected to its frozen
    export fail from then on, never showing the Source's newer data. The
    destinations are left as they are.
    """
    res = _target_call(ctx, "session_delete", name=name, force=force)
    click.echo("deleted session {} of {}".format(name, res["source"]))


@session.command("list")
@click.option("--source", metavar="SOURCE", help="Only sessions of SOURCE.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def session_list(ctx, source, as_json):
    """List sessions: marked or not, extents tracked and still to send."""
    rows = _target_call(ctx, "session_list", source=source)
    if as_json:
        _print_json(rows)
        return
    _table([(r["name"], r["source"], "yes" if r["marked"] else "no",
             r["tracked_extents"], r["extents_to_send"],
             "running" if r["transferring"] else
             (r["last_transfer"] or {}).get("result", "-"),
             len(r["destinations"])) for r in rows],
           ["NAME", "SOURCE", "MARKED", "TRACKED", "TO-SEND", "TRANSFER",
            "DESTS"])


@session.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def session_status(ctx, name, as_json):
    """Show a session and each destination.

    Marked or not, extents tracked and still to send, copy-on-first-write
    count, save-area use, the running or last transfer (bytes sent, bytes
    sent as write-zeroes, bytes per second), and per destination: consistent,
    inconsistent (protected or unprotected while a transfer writes to it),
    pending extents, bytes sent, last success and last error.
    """
    st = _target_call(ctx, "session_status", name=name)
    if as_json:
        _print_json(st)
        return
    _print_session(st)


@session.command("mark")
@click.argument("name")
@click.option("--export", is_flag=True,
              help="Also serve the frozen image, read-only, as the export "
                   "SOURCE@NAME (every extent's first write then saves its "
                   "old data, not only extents still to send).")
@json_result
@pass_ctx
@handle_errors
def session_mark(ctx, name, export):
    """Freeze the point in time of session NAME's Source.

    Atomic with respect to host writes: writes in flight finish, new ones
    wait a moment, and the changes tracked so far become the transfer map.
    """
    st = _target_call(ctx, "session_mark", name=name, export=export)
    click.echo("session {}: marked, {} extents to send{}".format(
        name, st["extents_to_send"], "; frozen image exported as " +
        st["frozen_export"] if st.get("frozen_export") else ""))


@session.command("unmark")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Unmark even while the frozen export has connections "
                   "(their reads then fail with ESTALE).")
@json_result
@pass_ctx
@handle_errors
def session_unmark(ctx, name, force):
    """Discard session NAME's frozen image and saved data.

    A running transfer is stopped. The extents not yet sent go back into
    the tracking map, so the next transfer sends them: nothing is lost.
    """
    st = _target_call(ctx, "session_unmark", name=name, force=force)
    click.echo("session {}: unmarked, {} extents tracked".format(
        name, st["tracked_extents"]))


_TIMEOUT_HELP = ("Fail a destination that does not answer for this long "
                 "(connect or reply).")


@session.command("transfer")
@click.argument("name")
@click.option("--full", is_flag=True,
              help="Send every extent, not only the changed ones. An "
                   "unmarked session is marked first (every extent frozen).")
@click.option("--unmarked", is_flag=True,
              help="With --full: copy the live Source without marking (no "
                   "copy on first write, faster); the destinations stay "
                   "inconsistent until the next marked transfer completes.")
@click.option("--wait", is_flag=True,
              help="Wait until done, showing progress; exit 1 if it fails.")
@click.option("--timeout", default=30.0, show_default=True,
              metavar="SECONDS", help=_TIMEOUT_HELP)
@json_result
@pass_ctx
@handle_errors
def session_transfer(ctx, name, full, unmarked, wait, timeout):
    """Send marked session NAME's frozen image to its destinations.

    Sends the extents of the transfer map (saved data where a host wrote
    since the mark, else the Source), with several requests in flight per
    destination and all-zero extents as write-zeroes. Each destination is
    flushed before its extents count as sent. On success the session is
    unmarked; after a failure or a crash, running transfer again sends only
    what is left.
    """
    st = _target_call(ctx, "session_transfer", name=name, full=full,
                      unmarked=unmarked, timeout=timeout)
    tr = st.get("transfer") or {}
    click.echo("session {}: transfer started, {} extents to send".format(
        name, tr.get("extents_total")))
    if wait:
        _wait_transfer(ctx, name, st)


@session.command("update")
@click.argument("name")
@click.option("--every", metavar="INTERVAL",
              help="Repeat forever: start an update every INTERVAL (e.g. "
                   "30s, 15m, 1h), in the foreground. A failed update is "
                   "reported and retried at the next interval.")
@click.option("--timeout", default=30.0, show_default=True,
              metavar="SECONDS", help=_TIMEOUT_HELP)
@json_result
@pass_ctx
@handle_errors
def session_update(ctx, name, every, timeout):
    """Mark, transfer and unmark session NAME: one periodic update.

    Waits until the transfer ends; exit 1 if it fails. A second update
    while one runs is refused (and logged by the server). If a failed or
    interrupted transfer left the session marked, the update resumes it
    instead of marking again.
    """
    interval = _parse_interval(every) if every else None
    while True:
        started = time.monotonic()
        try:
            _wait_transfer(ctx, name, _target_call(
                ctx, "session_update", name=name, timeout=timeout))
        except (errors.Error, SystemExit) as e:
            if interval is None:
                raise
            click.echo("{} update failed: {}".format(
                units.format_time(time.time()),
                e if isinstance(e, errors.Error) else "see above"), err=True)
        if interval is None:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _parse_interval(text):
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise click.BadParameter("use a number with s, m, h or d, e.g. 15m",
                                 param_hint="--every")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600,
                                "d": 86400}[m.group(2)]


# ---------------------------------------------------------------- rsg

@main.group()
def rsg():
    """Replicate groups of LUs to secondary nodes, in write order.

    \b
    On each secondary (same LU names and sizes):
      clonectl lu create db1 --size 10G; clonectl lu create log1 --size 1G
      clonectl serve --port 10809 --bind 0.0.0.0 --replication-port 7000 \\
          --replication-bind 0.0.0.0 --replication-token-file token
    On the primary:
      clonectl rsg create app --volume db1 --volume log1 --srl-size 1G
      clonectl rsg link app --secondary dr1:7000 --mode async --token-file token
      clonectl rsg status app

    Every change to a volume of the group is appended to the group's storage
    replicator log (SRL) and applied to the volume in the same order; each
    link sends the SRL to its secondary at its own pace. A secondary applies
    whole batches in order (after a crash, the last unacknowledged batch is
    applied again as one unit), so it always holds the primary's state at
    some update number. A sync link acknowledges a host write only after the
    secondary has applied it, and a host flush only after the secondary has
    made every write before it durable; an async link acknowledges a write
    once the SRL has it. When a link cannot
    keep up and the SRL would overflow, or the link is detached, the link's
    changes are tracked in a data change map (DCM) and replayed later (the
    secondary is inconsistent meanwhile and keeps its last consistent image
    of every volume readable as LU@consistent-LU; `clonectl lu rollback LU`
    puts it back). A protected restore or reverse sync of a
    replicated volume reaches the secondaries the same way: only the regions
    it changed. After a crash or power cut of the primary, the regions
    written in the last moments (its activity log, 4 MiB regions) are
    replayed to every link, since the SRL may have lost their last entries.
    After a role change (promote, demote) only the regions either side
    changed since the two last agreed are copied; when both changed data (a
    split brain) the group's --after-split-brain policy decides (rsg create,
    rsg set). Link states: connecting, replicating, dcm-logging, dcm-replay, failed
    (retried every second unless stopped with an error), diverged, detached.
    """


_AFTER_SPLIT_BRAIN_OPT = click.option(
    "--after-split-brain", metavar="POLICY",
    type=click.Choice(["disconnect", "discard-zero-changes",
                       "discard-secondary"]),
    help="What a primary does when a node it links to changed data on its "
         "own since the two last agreed (a split brain). disconnect (the "
         "default): nothing is discarded; the link waits for `rsg attach "
         "--discard-secondary-changes` or a demotion. discard-zero-changes: "
         "if this node changed nothing since then, it takes the other "
         "node's changes; otherwise disconnect. discard-secondary: this "
         "node's data wins, the other node's changes are overwritten. Only "
         "the regions either side changed are copied.")


@rsg.command("create")
@click.argument("name")
@click.option("--volume", "volumes", multiple=True, required=True,
              metavar="LU", help="An LU of the group (repeatable); write "
              "order is kept across all of them.")
@click.option("--srl-size", required=True, metavar="SIZE",
              help="Size of the storage replicator log (at least 1M), in the "
                   "state directory. It holds the updates a link has not yet "
                   "acknowledged; when it fills up, the slowest link falls "
                   "back to its DCM.")
@click.option("--granularity", metavar="SIZE",
              help="Extent size of the DCMs (default 64K).")
@_AFTER_SPLIT_BRAIN_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_create(ctx, name, volumes, srl_size, granularity, after_split_brain):
    """Make a replicated storage group of LUs on this (primary) node."""
    st = _target_call(ctx, "rsg_create", name=name, volumes=list(volumes),
                      srl_size=srl_size, granularity=granularity,
                      after_split_brain=after_split_brain)
    click.echo("replicated group {}: {} volume(s), SRL {}".format(
        name, len(st["volumes"]), units.format_size(st["srl"]["size"])))


@rsg.command("delete")
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def rsg_delete(ctx, name):
    """Delete a group (its links, SRL and DCMs, and on a secondary the last
    consistent images LU@consistent-LU it keeps; the LUs stay)."""
    _target_call(ctx, "rsg_delete", name=name)
    click.echo("replicated group {} deleted".format(name))


@rsg.command("set")
@click.argument("name")
@_AFTER_SPLIT_BRAIN_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_set(ctx, name, after_split_brain):
    """Change a group's settings (saved in its record).

    On a secondary the setting is kept for when it is promoted; a primary
    sends its own to its secondaries.
    """
    st = _target_call(ctx, "rsg_set", name=name,
                      after_split_brain=after_split_brain)
    click.echo("group {}: after a split brain: {}".format(
        name, st["after_split_brain"]))


_REPLAY_RATE_OPT = click.option(
    "--rate", metavar="BYTES",
    help="Send a DCM replay (the first copy, and the catch-up after a "
         "fallback to the DCM) at most this many bytes per second (e.g. "
         "100M), so that host writes and the ordered stream keep the "
         "bandwidth they need; \"0\" for no limit. Kept in the link's "
         "record. Default: as fast as possible (on attach: unchanged).")
_LINK_WAIT_OPT = click.option(
    "--wait", is_flag=True,
    help="Wait until the link replicates (its first replay completed), "
         "showing the replay's progress; exit 1 with the link's error if it "
         "fails, diverges or is detached meanwhile (a failed link keeps "
         "retrying in the server).")
_SECONDARY_OPT = click.option("--secondary", required=True, metavar="HOST:PORT",
                              help="The secondary's --replication-port.")


@rsg.command("link")
@click.argument("name")
@_SECONDARY_OPT
@click.option("--mode", type=click.Choice(["sync", "async"]), default="async",
              show_default=True,
              help="sync: a host write is acknowledged once the secondary "
                   "has it (it waits one round trip); async: once the SRL "
                   "has it.")
@click.option("--token-file", required=True, metavar="FILE",
              help="The token the secondary was started with (the file mode "
                   "0600 or it is refused). It is proven, never sent.")
@click.option("--tls-certificates", metavar="DIR",
              help="Connect with TLS: DIR holds ca-cert.pem, the CA that "
                   "signed the secondary's --replication-tls-certificates "
                   "(its certificate must name the address of --secondary), "
                   "and optionally client-cert.pem and client-key.pem (mode "
                   "0600), as libnbd's tls-certificates directory.")
@_REPLAY_RATE_OPT
@_LINK_WAIT_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_link(ctx, name, secondary, mode, token_file, tls_certificates, rate,
             wait):
    """Add a link to a secondary and start replicating to it.

    The first contact copies every extent (the secondary's content is
    unknown) unless the secondary is a former member of the group, in which
    case only the regions that may differ are copied. That copy is a DCM
    replay, like the one after any fallback from the SRL to the DCM; a
    replay broken off (a crash of either node, a lost connection) resumes
    from what the secondary acknowledged. --rate limits the replays; with
    --wait the command returns once the link replicates.

    Each connection starts with both sides proving they hold the token
    (challenge-response); a secondary that cannot prove it gets nothing.
    With --tls-certificates the link is encrypted (needed on any network
    you do not trust: without TLS the volumes' data crosses it in clear).
    """
    st = _target_call(ctx, "rsg_link", name=name, secondary=secondary,
                      mode=mode, token_file=token_file,
                      tls_certificates=tls_certificates, rate=rate)
    click.echo("group {}: link to {} ({}) added".format(name, secondary,
                                                        mode))
    if wait:
        _wait_link(ctx, name, secondary, st)


@rsg.command("unlink")
@click.argument("name")
@_SECONDARY_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_unlink(ctx, name, secondary):
    """Remove a link (the secondary keeps what it has)."""
    _target_call(ctx, "rsg_unlink", name=name, secondary=secondary)
    click.echo("group {}: link to {} removed".format(name, secondary))


@rsg.command("detach")
@click.argument("name")
@_SECONDARY_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_detach(ctx, name, secondary):
    """Stop a link; its changes are tracked in its DCM until attach."""
    _target_call(ctx, "rsg_detach", name=name, secondary=secondary)
    click.echo("group {}: link to {} detached".format(name, secondary))


@rsg.command("verify")
@click.argument("name")
@click.option("--secondary", metavar="HOST:PORT",
              help="Verify only the link to this secondary. Default: every "
                   "link of the group.")
@click.option("--wait", is_flag=True,
              help="Wait until the verify ends, showing progress; exit 1 if "
                   "it stopped early.")
@click.option("--rate", metavar="BYTES",
              help="Compare at most this many bytes per second per link "
                   "(e.g. 100M). Default: as fast as possible.")
@click.option("--stop", is_flag=True,
              help="Stop the running verify instead; what it found so far "
                   "stays marked.")
@json_result
@pass_ctx
@handle_errors
def rsg_verify(ctx, name, secondary, wait, rate, stop):
    """Compare the volumes of primary group NAME with its secondaries,
    online, extent by extent.

    For each region of each volume the primary computes the checksum of
    every extent and asks the secondary for the same region's checksums
    through the replication stream, after the updates that precede it:
    both sides answer for the same point in the stream, so host writes
    keep going and are never reported as differences. The stream waits
    for each answer (one round trip per 1 MiB region).

    Extents that differ are reported (count and first volumes and offsets)
    and marked in the link's DCM; when the pass ends the link switches to
    DCM logging and its replay copies exactly them (and the updates it had
    not delivered yet). A link that stops replicating during the verify
    (a failure, an SRL overflow, a detach) ends it; what it marked stays.

    `clonectl rsg status NAME --json` shows each link's last verify under
    "verify": start and end times (seconds since the epoch), extents
    compared and differing, the first differing [volume, offset] pairs.
    Only a primary verifies; the link must be replicating. Needs a running
    server.
    """
    st = _target_call(ctx, "rsg_verify", name=name, secondary=secondary,
                      rate=rate, stop=stop)
    if stop:
        click.echo("group {}: verify stopped".format(name))
        return
    click.echo("group {}: verify started".format(name))
    if not wait:
        return
    st = progress.follow(
        lambda: _control_call(ctx, "rsg_status", patience=60.0, name=name),
        lambda st: _rsg_verify_job(st, secondary),
        lambda st: any((l.get("verify") or {}).get("running")
                       for l in _verified_links(st, secondary)))
    stopped = False
    for link in _verified_links(st, secondary):
        v = link.get("verify") or {}
        click.echo("  {}: {} extents compared, {} differ{}".format(
            link["secondary"], v.get("extents_compared", 0),
            v.get("extents_differing", 0),
            ", stopped: " + (v.get("error") or "asked")
            if v.get("stopped") else ""))
        for vol, off in v.get("differing") or []:
            click.echo("    differing: {} at {}".format(vol, off))
        stopped = stopped or v.get("stopped")
    if stopped:
        _fail("the verify of group {} stopped early".format(name))


def _verified_links(st, secondary):
    return [l for l in st.get("links") or []
            if secondary is None or l["secondary"] == secondary]


def _rsg_verify_job(st, secondary):
    """One Job summing the verifies of the links."""
    links = [l["verify"] for l in _verified_links(st, secondary)
             if l.get("verify")]
    if not links:
        return None
    return progress.Job(
        st.get("name", "group"), "verify",
        sum(v["bytes_done"] for v in links),
        sum(v["bytes_total"] for v in links),
        sum(v["rate"] for v in links),
        max((v["eta"] or 0) for v in links),
        any(v["running"] for v in links))


@rsg.command("attach")
@click.argument("name")
@_SECONDARY_OPT
@click.option("--discard-secondary-changes", is_flag=True,
              help="After a split brain: this node wins; the secondary's "
                   "diverged regions are overwritten (only those, and what "
                   "this node changed since the two last agreed, are "
                   "copied).")
@_REPLAY_RATE_OPT
@_LINK_WAIT_OPT
@json_result
@pass_ctx
@handle_errors
def rsg_attach(ctx, name, secondary, discard_secondary_changes, rate, wait):
    """Start a detached (or stopped) link again: DCM replay, then ordered
    replication.

    The replay copies the regions marked in the link's DCM while it was
    detached; one that was broken off resumes where the secondary's
    acknowledgements left it. --rate changes the link's replay rate (kept
    in its record; "0" removes the limit). On a link that is not detached,
    attach reconnects it (a running replay resumes, at the new rate).
    """
    st = _target_call(ctx, "rsg_attach", name=name, secondary=secondary,
                      discard_secondary_changes=discard_secondary_changes,
                      rate=rate)
    click.echo("group {}: link to {} attached".format(name, secondary))
    if wait:
        _wait_link(ctx, name, secondary, st)


_LINK_DONE = "replicating"
_LINK_FAILED = ("failed", "diverged", "detached")


def _link_of(st, secondary):
    for link in st.get("links") or []:
        if link["secondary"] == secondary:
            return link
    _fail("group {} has no link to {} any more".format(st.get("name"),
                                                       secondary))


def _wait_link(ctx, name, secondary, st):
    """Follow a link until it replicates (exit 0) or fails, diverges or
    is detached (exit 1 with its error), showing its replay's progress."""
    from .replication import parse_secondary
    # The address as the group spells it.
    secondary = parse_secondary(secondary)
    first = _link_of(st, secondary)["replays"]

    def job(st):
        link = _link_of(st, secondary)
        replay = link.get("replay")
        if link["replays"] <= first or not replay:
            return progress.Job("{} -> {}".format(name, secondary),
                                link["state"], 0, 0, 0, None, True)
        return progress.Job("{} -> {}".format(name, secondary), "replay",
                            replay["bytes_done"], replay["bytes_total"],
                            replay["rate"], replay["eta"],
                            replay["running"], link["state"])

    def running(st):
        state = _link_of(st, secondary)["state"]
        return state != _LINK_DONE and state not in _LINK_FAILED

    st = progress.follow(
        lambda: _control_call(ctx, "rsg_status", patience=60.0, name=name),
        job, running)
    link = _link_of(st, secondary)
    if link["state"] != _LINK_DONE:
        _fail("group {}: link to {} is {}{}".format(
            name, secondary, link["state"],
            ": " + link["error"] if link.get("error") else ""))
    click.echo("group {}: link to {} is replicating".format(name, secondary))


@rsg.command("promote")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Promote even an inconsistent secondary: its volumes as "
                   "they are (roll them back to LU@consistent-LU first to "
                   "promote the group's last consistent point); the last "
                   "consistent images it kept are released.")
@json_result
@pass_ctx
@handle_errors
def rsg_promote(ctx, name, force):
    """Make this secondary the primary (a new generation).

    Allowed only while no primary replicates to it (link detached, primary
    down or unreachable). Its volumes become writable. Link it to the old
    primary once that one is demoted; a split brain is detected then.
    """
    st = _target_call(ctx, "rsg_promote", name=name, force=force)
    click.echo("group {}: this node is the primary (generation {})".format(
        name, st["generation"]))


@rsg.command("demote")
@click.argument("name")
@json_result
@pass_ctx
@handle_errors
def rsg_demote(ctx, name):
    """Make this primary a secondary (hosts must be disconnected).

    It keeps the regions it wrote that no secondary acknowledged, so that
    the new primary can copy back only what diverged.
    """
    _target_call(ctx, "rsg_demote", name=name)
    click.echo("group {}: this node is now a secondary".format(name))


def _print_rsg(st):
    if st.get("loaded") is False:
        click.echo("{}: {}".format(st["name"], st["error"]))
        click.echo("  files: " + (", ".join(st["files"]) or "none"))
        return
    if st["role"] == "primary":
        click.echo("{}: primary, generation {}, last update #{}, SRL {} of {} "
                   "used ({}%), activity log {} region(s) of 4MiB".format(
                       st["name"], st["generation"], st["last_seq"],
                       units.format_size(st["srl"]["used"]),
                       units.format_size(st["srl"]["size"]),
                       st["srl"]["used_percent"],
                       st["activity_log_regions"]))
        click.echo("  volumes: " + ", ".join(v["lu"] for v in st["volumes"]))
        click.echo("  after a split brain: " + st.get("after_split_brain",
                                                     "disconnect"))
        for p in st.get("problems") or []:
            click.echo("  recovery: " + p)
        for l in st["links"]:
            extra = ""
            if l["state"] == "dcm-replay":
                extra = ", replay {}/{} extents".format(l["replay_done"],
                                                        l["replay_total"])
            elif l["dcm_logging"]:
                extra = ", {} extents in DCM".format(l["dcm_extents"])
            if l.get("replay_reason"):
                extra += (", replaying the regions of {}" if l["state"] ==
                          "dcm-replay" else ", the regions of {} to replay"
                          ).format(l["replay_reason"])
            if (l.get("durable_seq") or 0) < (l.get("acked_seq") or 0):
                # A sync link's updates applied there, made durable at
                # the next host flush (or within a second).
                extra += ", {} update(s) not yet durable there".format(
                    l["acked_seq"] - l["durable_seq"])
            if l.get("replay_rate_limit"):
                extra += ", replay rate {}".format(
                    units.format_rate(l["replay_rate_limit"]))
            lag = "-" if l["lag_updates"] is None else "{} updates, {}".format(
                l["lag_updates"], units.format_size(l["lag_bytes"]))
            click.echo("  -> {} ({}): {}, lag {}{}, sent {}{}".format(
                l["secondary"], l["mode"], l["state"], lag, extra,
                units.format_size(l.get("bytes_sent") or 0),
                ", error: " + l["error"] if l["error"] else ""))
            sb = l.get("split_brain")
            if sb:
                click.echo("     split brain: this node changed {} extent(s) "
                           "({}), the secondary {} ({})".format(
                               sb["primary"]["extents"],
                               units.format_size(sb["primary"]["bytes"]),
                               sb["secondary"]["extents"],
                               units.format_size(sb["secondary"]["bytes"])))
            v = l.get("verify")
            if v:
                click.echo("     verify {}: {} of {}, {} extents compared, {} "
                           "differ".format(
                               "running" if v["running"] else "stopped"
                               if v["stopped"] else "finished",
                               units.format_size(v["bytes_done"]),
                               units.format_size(v["bytes_total"]),
                               v["extents_compared"],
                               v["extents_differing"]))
    else:
        click.echo("{}: secondary of {}, {}, applied update #{}{}".format(
            st["name"], st["primary"] or "-", "consistent" if st["consistent"]
            else "INCONSISTENT ({})".format(st["reason"]), st["applied_seq"],
            ", connected" if st["connected"] else ""))
        click.echo("  volumes: " + ", ".join(v["lu"] for v in st["volumes"]))
        if st.get("images"):
            click.echo("  last consistent image: {} (`clonectl lu rollback "
                       "LU` puts it back)".format(", ".join(st["images"])))
        if st.get("error"):
            click.echo("  error: " + st["error"])


@rsg.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def rsg_status(ctx, name, as_json):
    """Show groups: role, generation, SRL use, and per link its mode, state
    (replicating, dcm-logging, dcm-replay, failed, diverged, detached), lag
    in updates and bytes, DCM extents, replay progress, last error and last
    verify (`clonectl rsg verify`); on a
    secondary whether it is consistent and the last update applied."""
    rows = [_target_call(ctx, "rsg_status", name=name)] if name else \
        _target_call(ctx, "rsg_list")
    if as_json:
        _print_json(rows[0] if name else rows)
        return
    if not rows:
        click.echo("no replicated groups")
    for st in rows:
        _print_rsg(st)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- maps

def _print_map(res, as_json):
    if as_json:
        _print_json(res)
        return
    # The columns of `nbdinfo --map`: offset, length, what the run is.
    for offset, length, kind in res["runs"]:
        click.echo("{:>20} {:>20}  {}".format(offset, length, kind))


@clone.command("map")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"granularity", "size", "runs": [[offset, length, '
                   'kind], ...]} and the clone\'s name, source and state.')
@pass_ctx
@handle_errors
def clone_map(ctx, name, as_json):
    """Print which extents of clone NAME differ from its Source.

    One line per run of extents of one kind, like `nbdinfo --map`: offset
    and length in bytes, then the kind: clean (the clone holds what the
    Source holds) or dirty (they differ: a sync copies it, a reverse sync
    copies it back). While the clone restores the Source, pending extents
    are still to be copied to the Source; dirty ones were written by a host
    since the restore began (they are never copied and differ from the
    clone afterwards); clean ones are the same on both (restored already
    or never different). Runs are whole extents of the group's
    granularity; the last ends at the LU's size.

    Example: clonectl clone map c1

    Exit status: 0, or 1 if there is no such clone.
    """
    _print_map(_target_call(ctx, "clone_map", clone=name), as_json)


@session.command("map")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"granularity", "size", "runs": [[offset, length, '
                   'kind], ...]} and the session\'s name, source and '
                   'whether it is marked.')
@pass_ctx
@handle_errors
def session_map(ctx, name, as_json):
    """Print the Source extents that session NAME tracks, sends and saved.

    One line per run of extents of one kind, like `nbdinfo --map`: offset
    and length in bytes, then the kind: clean, or one or more of changed
    (written since the mark: the next transfer sends it), transfer (part of
    the marked image and still to send) and saved (its marked data is in
    the save area because a host wrote it since the mark), separated by
    commas. Runs are whole extents of the session's granularity; the last
    ends at the LU's size.

    Example: clonectl session map nightly

    Exit status: 0, or 1 if there is no such session.
    """
    _print_map(_target_call(ctx, "session_map", name=name), as_json)


# ---------------------------------------------------------------- wait

# The state a clone's operation leaves it in when it succeeds.
_SUCCEEDED = {"sync": "synchronized", "reverse-sync": "synchronized",
              "restore": "fractured"}


@main.command("wait")
@click.argument("name")
@pass_ctx
@handle_errors
def wait_job(ctx, name):
    """Follow the job of clone or session NAME until it ends.

    The job is a clone's sync, reverse sync or protected restore, or a
    session's transfer or update, started earlier (for example without
    --wait, or by another admin). Shows the same progress as --wait: bytes
    done of this job's total, percentage, rate and time left; on a terminal
    one line rewritten in place, otherwise a line every 5 seconds and a
    last line when the job ends. If the job has already ended, its result
    is reported at once.

    Example: clonectl clone sync c1; clonectl wait c1

    Exit status: 0 when the job succeeded, 1 when it failed (the error is
    printed), when NAME has never run a job, or when there is no clone or
    session of that name. Needs a running server.
    """
    if server.read_serve_info(ctx.state_dir) is None:
        raise errors.ServerNotRunning(state_dir=ctx.state_dir.path)
    try:
        st = _control_call(ctx, "clone_status", clone=name)
    except errors.ControlError as e:
        if e.code != "UnknownClone":
            raise
        st = None
    if st is not None:
        op = st.get("operation")
        if not op:
            _fail("clone {} has run no sync, reverse sync or restore since "
                  "the server started (it is {})".format(name, st["state"]))
        _wait(ctx, name, _SUCCEEDED[op["operation"]])
        return
    try:
        st = _control_call(ctx, "session_status", name=name)
    except errors.ControlError as e:
        if e.code != "UnknownSession":
            raise
        _fail("no clone or session named {!r}".format(name))
    _wait_transfer(ctx, name, st)
