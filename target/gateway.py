"""The iSCSI gateway's route into the target: which connections are the
gateway's, how many it holds on each export, and taking an export away
from it (withdraw) until it has let go, or from every new connection for
the length of an operation (hold: a rollback).  Several operations may
hold one export; it is exported again once each has given it back.

The gateway opens exports under names only this server start's secret
makes valid (the name format is target/iscsi.py's: iscsi.gateway_route).
Its connections pass the same checks as a host's but are counted here,
apart from host connections, so that clone sync is not refused because
of them.  Everything here runs under the Target's lock (passed in).
"""

import collections
import errno
import hmac
import threading

from . import errors, iscsi

# How long a withdrawal waits for the iSCSI gateway to let go of an export:
# the manager looks at the exports every second (server.ISCSI_POLL) and
# removes a target in well under one.
GATEWAY_LET_GO_TIMEOUT = 10.0


class GatewayHolds(errors.Error):
    msg = ("the iSCSI gateway did not let go of export {name!r} within "
           "{timeout:.0f} s; nothing was changed; see run/serve.log")
    errno = errno.EBUSY


class GatewayRoute:

    def __init__(self, lock, secret=None):
        self.lock = lock
        # Usable only with the secret of this server start; None: no route.
        self.secret = secret
        # Export object -> the gateway's connections to it; let_go is
        # notified when one ends.
        self.held = collections.Counter()
        self.let_go = threading.Condition(lock)
        # Export name -> why it is withdrawn, one entry per operation
        # holding it (None: no reason to give, it is going away): not
        # exported while any holds it, each giving back its own.
        self.withdrawn = {}

    def export_of(self, name):
        """The export a gateway name asks for, or None for a host's name.
        Without this server start's secret a gateway name is unknown: the
        route is the gateway's alone."""
        route = iscsi.gateway_route(name)
        if route is None:
            return None
        secret, sep, export = route.partition(":")
        if self.secret is None or not sep or not hmac.compare_digest(
                secret.encode(), self.secret.encode()):
            raise errors.UnknownLU(name=name)
        return export

    def opened(self, obj):
        """A gateway connection to obj opened; under the lock."""
        self.held[obj] += 1

    def closed(self, obj):
        """A gateway connection to obj ended; under the lock."""
        self.held[obj] -= 1
        if not self.held[obj]:
            del self.held[obj]
        self.let_go.notify_all()

    def reason(self, name):
        """Why export name is withdrawn (None if no holder said)."""
        return next((why for why in self.withdrawn.get(name, ())
                     if why is not None), None)

    def hold(self, name, why=None):
        """Withdraw export name without waiting; under the lock (the
        caller checks the connections it refuses under the same lock, so
        that none opens in between).  Given back with give_back."""
        self.withdrawn.setdefault(name, []).append(why)

    def unhold(self, name, why=None):
        """Give back one hold of name with why; under the lock."""
        held = self.withdrawn.get(name)
        if held is not None and why in held:
            held.remove(why)
            if not held:
                del self.withdrawn[name]

    def withdraw(self, name, obj):
        """Take export name (served by obj) away from the iSCSI gateway and
        wait until its connections to it have ended; the caller gives it
        back with give_back(name) when done.

        While withdrawn the export is not exported (no new host or gateway
        connection, and export_modes stops naming it), so the manager
        removes its iSCSI target within its poll interval
        (Server._sync_gateway).  The wait holds no lock the gateway's path
        needs (let_go releases the Target's lock), so it cannot deadlock
        the manager's sync; if the gateway has not let go within
        GATEWAY_LET_GO_TIMEOUT the export is given back and GatewayHolds
        is raised."""
        with self.lock:
            self.hold(name)
            if self.let_go.wait_for(lambda: not self.held[obj],
                                    GATEWAY_LET_GO_TIMEOUT):
                return
            self.unhold(name)
            raise GatewayHolds(name=name, timeout=GATEWAY_LET_GO_TIMEOUT)

    def give_back(self, names, why=None):
        """Give back names (withdrawn, or held with why): exported again
        once no other operation holds them."""
        with self.lock:
            for name in names:
                self.unhold(name, why)

