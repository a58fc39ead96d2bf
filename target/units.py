"""Parsing and printing of sizes, times and names given by users.

Humans read sizes in IEC units (KiB, MiB, GiB: powers of 1024, which is what
every size here is) and times in ISO 8601, UTC; JSON carries sizes in bytes
and times as ISO 8601 strings (iso_times converts a status object at the
boundary, so internal records keep their epoch floats).
"""

import datetime
import re

from . import errors

_SUFFIXES = {
    "": 1, "B": 1,
    "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
    "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
    "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
    "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40,
    "P": 1 << 50, "PB": 1 << 50, "PIB": 1 << 50,
}

_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# NBD sizes are bytes, but the kernel's nbd driver and every hypervisor expect
# whole 512-byte sectors; a size that is not one is a typo more often than not.
SECTOR = 512

# The largest offset a file can have (off_t); a file system may allow less
# (ext4: 16 TiB - 4 KiB with 4 KiB blocks), which creating the file reports.
MAX_SIZE = (1 << 63) - 1
_MAX_DIGITS = len(str(MAX_SIZE)) + 1


def parse_size(value):
    """Parse "1G", "512M", "64K", "4096" or "1.5G" (binary units) to bytes.

    Exact: the decimal digits are read as an integer and a power of ten,
    never through a float, so "1.0000000000000001K" is refused as not a
    whole number of bytes instead of rounded.  Sizes beyond MAX_SIZE (what
    off_t can address) are refused.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif not isinstance(value, str):
        raise errors.InvalidSize(value=value, reason="not a size")
    else:
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise errors.InvalidSize(
                value=value, reason="expected a number with an optional unit "
                "K, M, G, T or P (powers of 1024), e.g. 1G or 512M")
        whole, frac, unit = m.groups()
        unit = unit.upper()
        if unit not in _SUFFIXES:
            raise errors.InvalidSize(value=value,
                                     reason="unknown unit {!r}".format(unit))
        whole = whole.lstrip("0")
        frac = (frac or "").rstrip("0")
        # Digits beyond these cannot make a size below MAX_SIZE (and Python
        # refuses to convert very long digit strings at all).
        if len(whole) > _MAX_DIGITS:
            raise _too_large(value)
        if len(frac) > _MAX_DIGITS:
            raise errors.InvalidSize(value=value,
                                     reason="not a whole number of bytes")
        numerator = int(whole + frac or "0") * _SUFFIXES[unit]
        size, rest = divmod(numerator, 10 ** len(frac))
        if rest:
            raise errors.InvalidSize(value=value,
                                     reason="not a whole number of bytes")
    if size <= 0:
        raise errors.InvalidSize(value=value, reason="must be larger than 0")
    if size > MAX_SIZE:
        raise _too_large(value)
    return size


def _too_large(value):
    return errors.InvalidSize(
        value=value, reason="too large: at most {} bytes ({})".format(
            MAX_SIZE, format_size(MAX_SIZE)))


def parse_lu_size(value):
    size = parse_size(value)
    if size % SECTOR:
        raise errors.InvalidSize(
            value=value, reason="must be a multiple of {} bytes".format(SECTOR))
    return size


def format_size(n):
    """1073741824 -> '1GiB', 1536 -> '1.5KiB', 100 -> '100B' (for humans;
    --json prints bytes).  parse_size reads it back."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40),
                         ("GiB", 1 << 30), ("MiB", 1 << 20),
                         ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            text = "{:.1f}".format(value).rstrip("0").rstrip(".")
            return text + unit
    return "{}B".format(int(n))


def format_duration(seconds):
    """A duration for humans: 45s, 3m 05s, 2h 07m, 3d 04h; None -> '?'."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return "{}s".format(s)
    if s < 3600:
        return "{}m {:02d}s".format(s // 60, s % 60)
    if s < 86400:
        return "{}h {:02d}m".format(s // 3600, s // 60 % 60)
    return "{}d {:02d}h".format(s // 86400, s // 3600 % 24)


def format_rate(n):
    """Bytes per second for humans: '12.5MiB/s'."""
    return format_size(n or 0) + "/s"


def format_time(t):
    """An epoch time (or an ISO 8601 string) as ISO 8601 UTC to the second,
    e.g. '2026-12-04T14:04:20Z'; None stays None."""
    if t is None:
        return None
    if isinstance(t, str):
        try:
            when = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            return t
        if when.tzinfo is None:
            return t
    else:
        when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def iso_time(t):
    """An epoch time as ISO 8601 UTC with milliseconds (for JSON: exact
    enough to order two events, and still sorted as text)."""
    if t is None or isinstance(t, str):
        return t
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


# Fields of status objects that hold an epoch time internally.
TIME_FIELDS = frozenset({"mark_time", "last_success", "connected_since",
                         "since", "started", "finished", "time"})


def iso_times(obj):
    """A copy of a status object (dicts and lists) with every TIME_FIELDS
    value that is an epoch number turned into an ISO 8601 string."""
    if isinstance(obj, dict):
        return {k: iso_time(v) if k in TIME_FIELDS and
                isinstance(v, (int, float)) and not isinstance(v, bool)
                else iso_times(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [iso_times(v) for v in obj]
    return obj


def check_name(name):
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise errors.InvalidName(name=name)
    return name
