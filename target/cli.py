"""clonectl: the manager CLI."""

import functools
import json
import os
import sys

import click

from . import control, errors, server, state, units

DEFAULT_STATE_DIR = "/var/lib/clonectl"


def _fail(message, code=1):
    click.echo("clonectl: error: {}".format(message), err=True)
    sys.exit(code)


def handle_errors(func):
    """Turn our errors into a message on stderr and exit status 1."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except errors.Error as e:
            _fail(str(e))
    return wrapper


def _print_json(obj):
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


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
        self.state_dir = state.StateDir(state_dir)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"],
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
    usage errors). Status commands accept --json.
    """
    ctx.obj = Context(state_dir)


# ---------------------------------------------------------------- lu

@main.group()
def lu():
    """Create, list and delete Source LUs."""


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
                   "erased, and it is kept when the LU is deleted). Without "
                   "--file a new sparse file is made in the state directory.")
@click.option("--read-only", is_flag=True,
              help="Export the LU read-only: hosts can read it, every write "
                   "is refused with EPERM.")
@pass_ctx
@handle_errors
def lu_create(ctx, name, size, file, read_only):
    """Create the LU NAME.

    NAME is 1-64 characters from A-Z a-z 0-9 . _ - and is the NBD export
    name. If a server is running, the new LU is exported at once.
    """
    record = state.create_lu(ctx.state_dir, name, size=size, file=file,
                             readonly=read_only)
    click.echo("created LU {} ({}, {}{})".format(
        name, units.format_size(record["size"]), record["file"],
        ", read-only" if read_only else ""))
    info = server.read_serve_info(ctx.state_dir)
    if info:
        try:
            control.call(ctx.state_dir.control_socket, "reload")
        except (errors.Error, OSError) as e:
            click.echo("clonectl: warning: the running server did not reload "
                       "its LUs: {}".format(e), err=True)
        else:
            click.echo("exported as {}".format(
                info["uri"].replace("EXPORT", name)))


def _lu_rows(ctx):
    doc = ctx.state_dir.load()
    info = server.read_serve_info(ctx.state_dir)
    live = {}
    if info:
        st = control.try_call(ctx.state_dir.control_socket, "status")
        if st:
            live = {lu["name"]: lu for lu in st["lus"]}
    rows = []
    for name, record in sorted(doc["lus"].items()):
        entry = {"name": name, "size": record["size"], "file": record["file"],
                 "owned": record["owned"], "readonly": record["readonly"],
                 "created": record.get("created"),
                 "served": False, "connections": 0, "error": None}
        if name in live:
            entry["served"] = live[name]["exported"]
            entry["connections"] = live[name]["connections"]
            entry["error"] = live[name]["error"]
            if info and entry["served"]:
                entry["uri"] = info["uri"].replace("EXPORT", name)
        rows.append(entry)
    return rows, info


@lu.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def lu_list(ctx, as_json):
    """List the LUs of the state directory."""
    rows, _ = _lu_rows(ctx)
    if as_json:
        _print_json(rows)
        return
    _table([(r["name"], units.format_size(r["size"]),
             "ro" if r["readonly"] else "rw", r["file"]) for r in rows],
           ["NAME", "SIZE", "MODE", "BACKING"])


@lu.command("delete")
@click.argument("name")
@pass_ctx
@handle_errors
def lu_delete(ctx, name):
    """Delete the LU NAME.

    Refused while a running server exports it (stop the server first). A
    backing file that clonectl created is removed; a file given with --file
    is kept.
    """
    def check_busy(name, record):
        info = server.read_serve_info(ctx.state_dir)
        if info:
            raise errors.LUBusy(
                name=name, reason="it is served by the running server (pid "
                "{}); stop it first with `clonectl stop`".format(info["pid"]))

    record = state.delete_lu(ctx.state_dir, name, check_busy=check_busy)
    click.echo("deleted LU {}{}".format(
        name, "" if record["owned"] else
        " (backing file {} kept)".format(record["file"])))


# ---------------------------------------------------------------- serve

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
@click.option("--detach", is_flag=True,
              help="Run in the background; return once clients can connect. "
                   "The log is run/serve.log in the state directory.")
@click.option("--pidfile", metavar="FILE",
              help="Write the server's pid here (removed on exit).")
@click.option("--thread-model", hidden=True,
              type=click.Choice(["parallel", "serialize_requests",
                                 "serialize_all_requests"]),
              help="nbdkit thread model (for benchmarks).")
@click.option("--threads", hidden=True, type=click.IntRange(1, 256),
              help="nbdkit worker threads per connection (for benchmarks).")
@pass_ctx
@handle_errors
def serve(ctx, socket_path, port, bind, detach, pidfile, thread_model,
          threads):
    """Serve every LU over NBD until SIGTERM or SIGINT.

    One nbdkit server exports every LU under its own name (`nbdinfo --list`).
    LUs created while serving are exported without a restart. Unknown export
    names are refused at the handshake. If nbdkit dies it is restarted;
    SIGTERM stops it cleanly and removes the sockets. One server per state
    directory.
    """
    if socket_path is None and port is None:
        socket_path = ctx.state_dir.default_nbd_socket
    listen = server.Listen(socket_path, port, bind)
    srv = server.Server(ctx.state_dir, listen, thread_model=thread_model,
                        threads=threads, pidfile=pidfile)
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


@main.command()
@pass_ctx
@handle_errors
def stop(ctx):
    """Stop the server of the state directory (SIGTERM, then wait)."""
    info = server.stop(ctx.state_dir)
    click.echo("stopped server pid {}".format(info["pid"]))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
@handle_errors
def status(ctx, as_json):
    """Show the server and every LU: size, backing, served, connections."""
    rows, info = _lu_rows(ctx)
    if as_json:
        _print_json({"state_dir": ctx.state_dir.path, "server": info,
                     "lus": rows})
        return
    if info:
        click.echo("server: pid {}, listening on {}".format(
            info["pid"], info["socket"] or "{}:{}".format(info["bind"],
                                                          info["port"])))
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


if __name__ == "__main__":
    main()
