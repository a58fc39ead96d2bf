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
