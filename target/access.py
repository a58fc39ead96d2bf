"""The export allow-list of `clonectl serve --allow ADDR[/PREFIX]`.

Design note.  nbdkit's ip filter (`--filter=ip allow=... deny=all`) was the
first choice, but the Debian 12 build here (nbdkit 1.32.5-1) cannot use it:
its nbdkit-ip-filter.so imports no inet_pton and answers every address rule,
the manual's own `allow=127.0.0.1,::1` included, with "don't know how to
parse rule" (only keywords such as anyipv4 and uid:/gid:/pid: work).  So
the plugin does what the filter does, in its preconnect callback: it asks
nbdkit for the client's address (nbdkit_peer_name, exported by the nbdkit
binary for plugins; called through ctypes) and refuses a client whose
address is not allowed before the NBD handshake and before TLS, so such a
client gets nothing, not even the list of exports.  The check runs once per
connection; requests pay nothing.  IPv4-mapped IPv6 addresses (a dual-stack
`--bind ::`) are compared as the IPv4 address they carry.

Per-export rules (`--allow-export EXPORT=ADDR[/PREFIX]`, ExportRules) cannot
be checked there: the export name is not known before the handshake.  The
plugin checks them in open, when the client asks for an export by name
(NBD_OPT_GO or NBD_OPT_INFO), before the target counts a connection, so a
refusal changes nothing; list_exports leaves out the exports the client may
not open, so their names are not revealed either.  The server-wide list still
runs first, in preconnect: a client must pass both.  Which rules apply to an
export: those given for its exact name; an export without rules of its own
takes those of the export whose data it shows (rules_source, the one place
that says which): SRC for SRC@NAME (a session's frozen image, a replica's
protected image), the Source for a clone (exported under its own name once
fractured), NAME for the iSCSI gateway's name for NAME; and so on up the
chain.  Exports without any rule on their chain are open to every client the
server-wide list admits.

A refusal raises ExportRefused (EACCES, worded in run/serve.log), but nbdkit
1.32 answers every failed open with NBD_REP_ERR_UNKNOWN, which libnbd shows
as "No such file or directory": the client cannot tell a refused export
from a missing one.  The rule is looked up before the export, so a refused
name is refused whether or not it exists.

Why a separate option and not `--allow EXPORT=ADDR`: the two differ in when
they are checked (before the handshake, for everything; at open, for one
export) and they intersect (a client must pass both), while the
`[EXPORT=]` values of `--iscsi-allow` add up; sharing one option would
invite reading `--allow db1=10.1.0.0/16 --allow 10.2.0.0/16` as "db1 from
10.1 as well", which it would not be.
"""

import ctypes
import errno
import ipaddress
import socket
import struct

from . import errors


def parse(value):
    """ADDR[/PREFIX] -> an ipaddress network; InvalidAllow if it is not one."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise errors.InvalidAllow(value=value, reason=str(e))


def parse_export_rules(values):
    """--allow-export EXPORT=ADDR[/PREFIX]... -> {export: [network, ...]}"""
    from . import units
    rules = {}
    for value in values:
        name, sep, net = value.partition("=")
        if not sep or not name:
            raise errors.InvalidAllowExport(
                value=value, reason="EXPORT= is missing")
        try:
            for part in name.split("@", 1):
                units.check_name(part)
        except errors.InvalidName as e:
            raise errors.InvalidAllowExport(value=value, reason=str(e))
        try:
            network = parse(net)
        except errors.InvalidAllow as e:
            raise errors.InvalidAllowExport(value=value,
                                            reason=e.kwargs["reason"])
        rules.setdefault(name, []).append(network)
    return rules


def show(network):
    """A network as users write it: a single address without /32 or /128."""
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


def to_param(networks):
    """The plugin parameter value: comma-separated networks."""
    return ",".join(show(n) for n in networks)


class AllowList:

    def __init__(self, param):
        self.networks = [parse(v) for v in param.split(",") if v]

    def permits(self, address):
        if isinstance(address, ipaddress.IPv6Address) and \
                address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in n for n in self.networks)

    def check_peer(self):
        """In nbdkit's connection thread: raise ClientRefused unless the
        connected client's address is allowed."""
        address = peer_address()
        if address is None or not self.permits(address):
            raise errors.ClientRefused(
                address=address if address is not None else "a non-IP socket")


def rules_source(export, clone_sources):
    """The export whose data export shows and whose rules it follows when
    it has none of its own, or None.  clone_sources: {clone: Source}."""
    from .iscsi import gateway_route
    route = gateway_route(export)
    if route is not None:
        # [SECRET:] NAME; names hold no ':'.
        return route.rpartition(":")[2]
    source, at, _ = export.partition("@")
    if at:
        return source
    return clone_sources.get(export)


class ExportRules:
    """The per-export allow-lists of the plugin's allow_export=EXPORT=NETS
    parameters.  clone_sources() -> {clone: Source} of the clones now
    defined (target.target.Target.clone_sources)."""

    def __init__(self, params=(), clone_sources=dict):
        self.clone_sources = clone_sources
        self.lists = {}
        for param in params:
            name, _, nets = param.partition("=")
            self.lists.setdefault(name, AllowList("")).networks.extend(
                AllowList(nets).networks)

    def rule_for(self, export):
        """(name the rule was given for, AllowList), or (None, None)."""
        sources = None
        seen = set()
        name = export
        while name and name not in seen:
            if name in self.lists:
                return name, self.lists[name]
            seen.add(name)
            if sources is None:
                sources = self.clone_sources()
            name = rules_source(name, sources)
        return None, None

    def permits(self, export, address):
        rule = self.rule_for(export)[1]
        return rule is None or (address is not None and rule.permits(address))

    def check_peer(self, export):
        """In nbdkit's connection thread: raise ExportRefused unless the
        connected client may open export."""
        rule_name, rule = self.rule_for(export)
        if rule is None:
            return
        address = peer_address()
        if address is None or not rule.permits(address):
            raise errors.ExportRefused(
                address=address if address is not None else "a non-IP socket",
                export=export, rule=rule_name)

    def visible(self, exports):
        """The (name, description) pairs of exports the connected client may
        open."""
        if not self.lists:
            return exports
        address = peer_address()
        return [e for e in exports if self.permits(e[0], address)]


_peer_name = None


def peer_address():
    """The current nbdkit connection's peer as an ipaddress address, or
    None if it is not an IP socket.  Only valid inside nbdkit."""
    global _peer_name
    if _peer_name is None:
        fn = ctypes.CDLL(None, use_errno=True).nbdkit_peer_name
        fn.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
        fn.restype = ctypes.c_int
        _peer_name = fn
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(len(buf))
    if _peer_name(buf, ctypes.byref(size)) == -1:
        raise OSError(errno.EIO, "nbdkit_peer_name failed")
    raw = buf.raw[:size.value]
    family, = struct.unpack_from("=H", raw, 0)
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[4:8])
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(raw[8:24])
    return None
