"""Plugin: short failure explanations for == of large byte strings."""

_BYTES = (bytes, bytearray, memoryview)
_BIG = 256


def _first_difference(left, right):
    n = min(len(left), len(right))
    step = 4096
    for start in range(0, n, step):
        if left[start:start + step] != right[start:start + step]:
            for i in range(start, min(n, start + step)):
                if left[i] != right[i]:
                    return i
    return n


def pytest_assertrepr_compare(config, op, left, right):
    """A short explanation for == of large byte strings (or lists of them):
    pytest's own diffs them with difflib, which took more than 300 s on
    two 64 KiB images in CI (tests/engine/test_powerloss.py) and turned a
    twin that caught its fault into a timeout."""
    if op != "==":
        return None
    if isinstance(left, _BYTES) and isinstance(right, _BYTES):
        if max(len(left), len(right)) <= _BIG:
            return None
        left, right = bytes(left), bytes(right)
        at = _first_difference(left, right)
        return ["byte strings differ (lengths {} and {}), first at offset "
                "{}".format(len(left), len(right), at),
                "left[{0}:{1}] = {2!r}".format(at, at + 16, left[at:at + 16]),
                "right[{0}:{1}] = {2!r}".format(at, at + 16,
                                                right[at:at + 16])]
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)) \
            and any(isinstance(x, _BYTES) and len(x) > _BIG
                    for x in list(left) + list(right)):
        out = ["sequences of byte strings differ (lengths {} and {})".format(
            len(left), len(right))]
        for i, (a, b) in enumerate(zip(left, right)):
            if a != b:
                if isinstance(a, _BYTES) and isinstance(b, _BYTES):
                    out.append("item {}: first difference at offset {}".format(
                        i, _first_difference(bytes(a), bytes(b))))
                else:
                    out.append("item {} differs".format(i))
        return out
    return None
