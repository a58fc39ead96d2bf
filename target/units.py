"""Parsing and printing of sizes and names given by users."""

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
    """1073741824 -> '1G', 1536 -> '1.5K' (for humans; --json prints bytes)."""
    for unit, factor in (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30),
                         ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            value = n / factor
            text = "{:.1f}".format(value).rstrip("0").rstrip(".")
            return text + unit
    return str(n)


def check_name(name):
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise errors.InvalidName(name=name)
    return name
