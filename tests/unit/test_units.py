"""target.units: sizes and names given by users."""

import pytest

from target import errors, units


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096),
    ("1", 1),
    ("512B", 512),
    ("64K", 64 << 10),
    ("64k", 64 << 10),
    ("64KiB", 64 << 10),
    ("64KB", 64 << 10),
    ("512M", 512 << 20),
    ("1G", 1 << 30),
    ("1g", 1 << 30),
    ("2T", 2 << 40),
    ("1P", 1 << 50),
    ("1.5G", 3 << 29),
    ("0.5K", 512),
    (" 8M ", 8 << 20),
    ("8 M", 8 << 20),
    (4096, 4096),
])
def test_parse_size_valid(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "abc", "G", "1X", "1KX", "-1", "-1G", "+1G", "1e3", "0x10",
    "1,5G", "1.G", ".5G", "1 2", "0", "0G", "0.0", "1.5", "0.1K",
])
def test_parse_size_invalid(text):
    with pytest.raises(errors.InvalidSize) as info:
        units.parse_size(text)
    message = str(info.value)
    assert repr(text) in message
    assert info.value.errno == 22


@pytest.mark.parametrize("value", [0, -1, -4096])
def test_parse_size_rejects_non_positive_ints(value):
    with pytest.raises(errors.InvalidSize, match="larger than 0"):
        units.parse_size(value)


def test_parse_size_unknown_unit_is_named():
    with pytest.raises(errors.InvalidSize, match="unknown unit 'X'"):
        units.parse_size("1X")


@pytest.mark.parametrize("text, expected", [
    ("512", 512), ("1K", 1024), ("64M", 64 << 20), ("1.5K", 1536),
    ("0.5K", 512), ("1G", 1 << 30),
])
def test_parse_lu_size_sector_multiples(text, expected):
    assert units.parse_lu_size(text) == expected


@pytest.mark.parametrize("text", ["1", "511", "513", "1000", "1.25K",
                                  "4097"])
def test_parse_lu_size_rejects_non_sector_multiples(text):
    with pytest.raises(errors.InvalidSize, match="multiple of 512"):
        units.parse_lu_size(text)


@pytest.mark.parametrize("text", ["abc", "0", "-1G", ""])
def test_parse_lu_size_rejects_bad_sizes(text):
    with pytest.raises(errors.InvalidSize):
        units.parse_lu_size(text)


@pytest.mark.parametrize("n, text", [
    (0, "0B"), (1, "1B"), (1023, "1023B"), (1024, "1KiB"), (1536, "1.5KiB"),
    (64 << 20, "64MiB"), (1 << 30, "1GiB"), (3 << 29, "1.5GiB"),
    (1 << 40, "1TiB"), (1 << 50, "1PiB"),
])
def test_format_size(n, text):
    """IEC units, read back by parse_size (whole units exactly)."""
    assert units.format_size(n) == text
    if n and "." not in text:
        assert units.parse_size(text) == n


def test_format_rate():
    assert units.format_rate(3 << 19) == "1.5MiB/s"
    assert units.format_rate(None) == "0B/s"


def test_format_time_is_iso_8601_utc():
    assert units.format_time(0) == "1970-01-01T00:00:00Z"
    assert units.format_time(1800000000.75) == "2027-01-15T08:00:00Z"
    assert units.format_time("2026-12-04T14:09:41+00:00") == \
        "2026-12-04T14:09:41Z"
    assert units.format_time("2026-12-04T15:09:41+01:00") == \
        "2026-12-04T14:09:41Z"
    assert units.format_time(None) is None


def test_iso_times_converts_epoch_fields_only():
    st = {"mark_time": 1800000000.5, "size": 1800000000, "started": "x",
          "destinations": [{"last_success": 0, "last_error": None}],
          "last_transfer": {"finished": None, "seconds": 12.5},
          "connected_since": True}
    assert units.iso_times(st) == {
        "mark_time": "2027-01-15T08:00:00.500Z", "size": 1800000000,
        "started": "x",
        "destinations": [{"last_success": "1970-01-01T00:00:00.000Z",
                          "last_error": None}],
        "last_transfer": {"finished": None, "seconds": 12.5},
        "connected_since": True}
    assert st["mark_time"] == 1800000000.5     # a copy: the original stays


@pytest.mark.parametrize("name", [
    "a", "A", "0", "db1", "disk.img", "a_b-c.d", "x" * 64, "1-2",
])
def test_check_name_valid(name):
    assert units.check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "x" * 65, "a/b", "../a", ".hidden", "-a", "_a", "a b", "a:b",
    "a\x00", "é", "a\tb", None, 5, b"abc",
])
def test_check_name_invalid(name):
    with pytest.raises(errors.InvalidName) as info:
        units.check_name(name)
    assert repr(name) in str(info.value)
    assert info.value.errno == 22


@pytest.mark.parametrize("name", ["a\n", "disk\n"])
def test_check_name_rejects_trailing_newline(name):
    with pytest.raises(errors.InvalidName):
        units.check_name(name)


@pytest.mark.parametrize("text, expected", [
    ("1.5K", 1536),
    ("0.25M", 256 << 10),
    ("1.0000000000000000000000000G", 1 << 30),
    ("8P", 8 << 50),
    ("9223372036854775807", (1 << 63) - 1),
])
def test_parse_size_is_exact(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("1.0000000000000001K", "whole number"),
    ("4097.0000000000000001", "whole number"),
    ("99999999999999P", "too large"),
    ("8192P", "too large"),
    ("9223372036854775808", "too large"),
    pytest.param("1" + "0" * 400, "too large", id="401-digits"),
    pytest.param("1" + "0" * 5000 + "K", "too large", id="5001-digits-K"),
])
def test_parse_size_refuses_inexact_and_huge(text, fragment):
    with pytest.raises(errors.InvalidSize, match=fragment):
        units.parse_size(text)


@pytest.mark.parametrize("value", [True, 1.5, None, [4096], 1 << 63])
def test_parse_size_refuses_other_types_and_huge_ints(value):
    with pytest.raises(errors.InvalidSize):
        units.parse_size(value)
