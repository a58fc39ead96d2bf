"""A sniffing TCP relay: listens on 127.0.0.1, forwards every connection to
a target address and records every byte that passes, both ways (what an
eavesdropper on the network sees)."""

import socket
import threading


class SniffingRelay:
    """relay.addr is "127.0.0.1:PORT" to give clients instead of the
    target; relay.captured() is every byte seen so far (both directions);
    relay.to_server() and relay.to_client() one direction each.  stop()
    closes the listener and every relayed connection."""

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.addr = "127.0.0.1:{}".format(self.port)
        self.lock = threading.Lock()
        self.up = bytearray()       # client -> server
        self.down = bytearray()     # server -> client
        self.connections = 0
        self.sockets = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True,
                                       name="sniffing-relay")
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.connections += 1
                self.sockets += [client, server]
            for src, dst, buf in ((client, server, self.up),
                                  (server, client, self.down)):
                threading.Thread(target=self._pump, args=(src, dst, buf),
                                 daemon=True).start()

    def _pump(self, src, dst, buf):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def to_server(self):
        with self.lock:
            return bytes(self.up)

    def to_client(self):
        with self.lock:
            return bytes(self.down)

    def captured(self):
        with self.lock:
            return bytes(self.up) + bytes(self.down)

    def stop(self):
        self.stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            sockets = list(self.sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.thread.join(5)
