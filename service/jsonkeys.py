"""Duplicate keys in a JSON request body, found without a second full parse.

msgspec, like most JSON decoders, keeps the last of duplicate keys silently.
RFC 8259 leaves duplicates open; we refuse them (422 naming the key), since
``{"labels": [...], "labels": [...]}`` is a client bug whichever one wins.

The check costs one pass of msgspec over the body into ``dict[str, Raw]``
(about 18 ms for 20 MB of JSON, a tenth of decoding it): ``msgspec.Raw``
values are views into the body, so their addresses give where each kept
value lies. Between two kept values there may be only ``, "key" :`` (and
whitespace); a duplicate leaves its whole ``"key": value`` in such a gap. The
top-level object and the ``options`` object (and the objects inside it,
``thresholds``) are checked; arrays are not entered.
"""

from __future__ import annotations

import re

import msgspec
import numpy as np

_STRING = rb'"(?:[^"\\]|\\.)*"'
_FIRST_GAP = re.compile(rb"\s*\{\s*" + _STRING + rb"\s*:\s*", re.DOTALL)
_GAP = re.compile(rb"\s*,\s*" + _STRING + rb"\s*:\s*", re.DOTALL)
_TAIL = re.compile(rb"\s*\}\s*")
_KEY_AT = re.compile(rb"\s*[{,]\s*(" + _STRING + rb")\s*:", re.DOTALL)
_OBJECT = dict[str, msgspec.Raw]
_NESTED = frozenset({"options"})


def find_duplicate_key(body: bytes) -> str | None:
    """The dotted path of the first key that occurs twice in the top-level
    object or in ``options`` (e.g. ``"labels"``, ``"options.rank_by"``), or
    None. A body that is not a JSON object is left to the decoder (None)."""
    return _check(body, "", _NESTED)


def _address(buf: object) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data)  # type: ignore[call-overload]


def _check(buf: bytes, prefix: str, nested: frozenset[str] | None) -> str | None:
    """Check one object; ``nested``: the keys whose object values are checked too (None: all)."""
    try:
        obj = msgspec.json.decode(buf, type=_OBJECT)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None  # not a JSON object: the request's decoder says what is wrong
    if not obj:
        return None
    base = _address(buf)
    spans = []
    for key, raw in obj.items():
        view = memoryview(raw)
        start = _address(raw) - base
        if not 0 <= start <= len(buf) - view.nbytes or buf[start : start + 1] != view[:1].tobytes():
            return _slow_check(buf, prefix)  # msgspec did not hand out views: check the slow way
        spans.append((start, view.nbytes, key))
    spans.sort()
    pos = 0
    for i, (start, length, _key) in enumerate(spans):
        gap = (_FIRST_GAP if i == 0 else _GAP).fullmatch(buf, pos, start)
        if gap is None:
            return prefix + _first_key(buf[pos:start])
        pos = start + length
    if _TAIL.fullmatch(buf, pos) is None:
        return prefix + _first_key(buf[pos:])
    for key, raw in obj.items():
        if nested is None or key in nested:
            inner = bytes(raw)
            if inner[:1] == b"{":
                found = _check(inner, f"{prefix}{key}.", None)
                if found is not None:
                    return found
    return None


def _first_key(gap: bytes) -> str:
    """The key that opens an entry in a gap between kept values: a duplicate."""
    match = _KEY_AT.match(gap)
    if match is None:
        return "body"
    try:
        return str(msgspec.json.decode(match.group(1), type=str))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return "body"


def _slow_check(buf: bytes, prefix: str) -> str | None:
    """The same check with the standard library's parser (every object)."""
    import json

    found: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(items)

    try:
        json.loads(buf, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None
    return prefix + found[0] if found else None
