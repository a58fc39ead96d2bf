"""Helpers for tests of network listeners: free ports, and whether the
other end closed a connection."""

import socket
import threading
import time


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_by_server(sock, timeout):
    """True if the other end closed sock (EOF or reset) within timeout;
    whatever it sent before is read and dropped."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def closed_while_trickling(sock, data, timeout, interval=0.2):
    """Send data a byte every interval (a slow client) until the other end
    closes sock; return how many seconds that took, or None if it did not
    close it within timeout."""
    stop = threading.Event()

    def trickle():
        try:
            for byte in data:
                if stop.wait(interval):
                    return
                sock.send(bytes([byte]))
        except OSError:
            pass
    th = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    th.start()
    try:
        if not closed_by_server(sock, timeout):
            return None
        return time.monotonic() - t0
    finally:
        stop.set()
        th.join()
