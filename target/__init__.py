"""clonectl target: Source LUs served over NBD, with protected clones.

Everything under this package is plain Python with no third-party imports, so
that the nbdkit python plugin (which embeds /usr/bin/python3 and does not see
the virtual environment) can import it.  The CLI in target.cli is the one
exception: it needs click and is only imported by the manager.
"""

__version__ = "0.1.0"
