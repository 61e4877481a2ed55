"""JSON read as serde_json reads it, for headers that stock Rust readers (the safetensors library) must
accept too.

Python's ``json.loads`` is more lenient than serde_json in ways that change what a file means to
other tools: it guesses UTF-16/UTF-32 from ``bytes``, accepts ``NaN``/``Infinity`` and numbers no
64-bit float holds, lone surrogate escapes (``"\\ud800"``), any nesting its stack allows, and keeps
only the last of repeated keys. Here the bytes must be UTF-8 (no BOM), those values are refused,
nesting stops at serde_json's limit, every object keeps all its pairs in order (so a caller can
refuse a repeated field as serde does) and numbers keep serde_json's kinds: an integer in
[-2**63, 2**64) is an ``int``, any other number (``-0`` included) a ``float``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays or objects are refused
_SURROGATE = re.compile("[\ud800-\udfff]")  # only an escape can produce one once the bytes decoded as UTF-8
_I64_MIN, _U64_END = -(2**63), 2**64


class Object(list):
    """A JSON object: its (key, value) pairs in order, repeated keys kept."""


def loads(data: bytes) -> Any:
    """Parse ``data`` as serde_json parses it (see the module docstring).

    Returns:
        The value; objects as :class:`Object`, arrays as ``list``.

    Raises:
        ValueError: not what serde_json accepts (``UnicodeDecodeError`` and ``JSONDecodeError`` included).
    """
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=Object, parse_int=_integer,
                           parse_float=_float, parse_constant=_constant)
    except RecursionError:  # deeper than Python's stack, far deeper than serde_json's limit
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    _check_tree(value)
    return value


def _integer(text: str) -> int | float:
    number = int(text)
    if text == "-0" or not _I64_MIN <= number < _U64_END:  # serde_json reads these as a float
        return _float(text)
    return number


def _float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number out of range: {text[:40]}")
    return number


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _check_tree(value: Any) -> None:
    """Nesting within serde_json's limit and no lone surrogate in any string (key or value);
    iterative, so a deep document costs no stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise ValueError("lone surrogate in a string escape")
        elif isinstance(item, list):  # an Object too
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            for element in item:
                if isinstance(item, Object):
                    key, element = element
                    stack.append((key, depth))
                stack.append((element, depth + 1))
