"""Our safetensors reader and the library agree on every file: both load it (the same tensors, bit for
bit) or both refuse it.

The reader (``lightning_ckpt.format.safetensors_view``) exists to load without copying, so what it
accepts must be exactly what ``safetensors.torch.load`` accepts: a file that only we could open is
a checkpoint no stock tool reads, and ``verify`` would vouch for it. Headers are generated valid,
then bent where Python's JSON and serde_json differ (encodings, BOM, NaN, huge numbers, ``-0``,
lone surrogate escapes, repeated keys, nesting depth, whitespace, entries written as arrays, enum
maps), then mutated byte by byte.

The default run tries 200 cases, the same ones each time; the long run (marked ``fuzz``) draws
fresh ones, ``LIGHTNING_CKPT_FUZZ_EXAMPLES`` of them (5000 by default):

    python -m pytest tests/faults/test_fuzz_header_differential.py -m fuzz -p no:warnings
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import CorruptCheckpointError
from lightning_ckpt.format.safetensors_view import load_tensors

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHORT = settings(max_examples=200, derandomize=True, **_COMMON)
LONG = settings(max_examples=int(os.environ.get("LIGHTNING_CKPT_FUZZ_EXAMPLES", "5000")), **_COMMON)
WHERE = "/fuzz/model.safetensors"
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1, "F4": 1}


class Raw(str):
    """JSON text written as is (a number spelled another way, an escape, a constant)."""


class Pairs(list):
    """A JSON object as (key, value) pairs, so a key can appear twice."""


def render(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{render(k) if isinstance(k, Raw) else json.dumps(k)}:{render(v)}"
                              for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


ODD_VALUES = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), Raw("1e-400"),
              Raw("18446744073709551616"), Raw("-9223372036854775809"), Raw("9" * 400), Raw("-0"), Raw("1.5"),
              Raw('"\\ud800"'), Raw('"\\udc00x"'), Raw('"\\ud83d\\ude00"'), Raw('"\\u0000"'), Raw('"\x01"'),
              None, True, "text", Pairs([("a", 1), ("a", 2)])]


def deep(levels: int) -> Raw:
    return Raw("[" * levels + "]" * levels)


def number_spelling(n: int) -> st.SearchStrategy[Any]:
    return st.sampled_from([n, Raw(f"{n}.0"), Raw(f"{n}e0"), Raw(f"-{n}") if n else Raw("-0"), Raw(f"0{n}"),
                            Raw(str(n + 2**64)), Raw(f"{n}E+0")])


@st.composite
def tensor_infos(draw: st.DrawFn, offset: int) -> tuple[Any, int]:
    """An entry (object, array or bent), and the size of its data."""
    names = sorted(ITEM_SIZE) if draw(st.integers(0, 9)) else ["f32", "F128", ""]  # mostly known dtypes
    dtype = draw(st.sampled_from(names))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape) * ITEM_SIZE.get(dtype, 4)
    fields: list[tuple[Any, Any]] = [("dtype", dtype), ("shape", shape), ("data_offsets", [offset, offset + size])]
    bends = st.lists(st.sampled_from(["order", "dup", "unknown", "spelling", "enum", "escape", "huge"]), max_size=2)
    for change in draw(bends) if draw(st.integers(0, 2)) == 0 else []:
        at = draw(st.integers(0, len(fields) - 1))
        if change == "order":
            fields = draw(st.permutations(fields))
        elif change == "dup":
            fields.append((fields[at][0], fields[at][1]))
        elif change == "unknown":
            fields.insert(at, (draw(st.sampled_from(["x", "dtypes", ""])), draw(
                st.sampled_from(ODD_VALUES) | st.integers(123, 130).map(deep))))
        elif change == "spelling" and fields[at][0] != "dtype" and isinstance(fields[at][1], list) and fields[at][1]:
            values = list(fields[at][1])
            i = draw(st.integers(0, len(values) - 1))
            values[i] = draw(number_spelling(values[i])) if isinstance(values[i], int) else values[i]
            fields[at] = (fields[at][0], values)
        elif change == "enum":
            fields[0] = ("dtype", draw(st.sampled_from([Pairs([(dtype, None)]), Pairs([(dtype, Pairs())]),
                                                        Pairs([(dtype, None), ("F16", None)]), [dtype]])))
        elif change == "escape":
            fields[at] = (Raw(json.dumps(fields[at][0]).replace("t", "\\u0074")), fields[at][1])
        elif change == "huge":
            fields[1] = ("shape", draw(st.sampled_from([[2**62, 0], [2**63 - 1, 0], [2**63, 0], [2**64 - 1, 2],
                                                        [2**32, 2**32, 0]])))
    if draw(st.integers(0, 7)) == 0:  # serde reads a struct from an array of its fields too
        values = [v for k, v in fields if k in ("dtype", "shape", "data_offsets")][:draw(st.integers(2, 4))]
        return values, size
    return Pairs(fields), size


@st.composite
def headers(draw: st.DrawFn) -> tuple[Pairs, int]:
    """A header and the size of the data it describes."""
    pairs, offset = Pairs(), 0
    for i in range(draw(st.integers(0, 3))):
        info, size = draw(tensor_infos(offset))
        name = draw(st.sampled_from([f"t{i}", "t0", "", "__metadata__ ", Raw('"\\ud800"')])) if draw(
            st.integers(0, 4)) == 0 else f"t{i}"
        pairs.append((name, info))
        offset += size
    metadata = draw(st.sampled_from([None, "absent", "absent", "absent", "absent", Pairs([("format", "pt")]),
                                     Pairs([("format", "pt")]), Pairs([("a", 1)]),
                                     Pairs([("a", "b"), ("a", "c")]), Pairs([("a", None)]), [], "text"]))
    if metadata != "absent":
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", metadata))
        if draw(st.integers(0, 9)) == 0:
            pairs.append((Raw('"__metadat\\u0061__"'), Pairs()))  # the same key, spelled with an escape
    if pairs and draw(st.integers(0, 9)) == 0:
        pairs.append(pairs[draw(st.integers(0, len(pairs) - 1))])  # a repeated name: the last one counts
    if draw(st.integers(0, 9)) == 0:
        pairs.append(("deep", deep(draw(st.integers(124, 129)))))
    return pairs, offset


WHITESPACE = [" ", " ", "\t", "\n", "\r", "\x0c", "\xa0", "\x00", "\ufeff", "\u2028"]
ENCODINGS = ["utf-8"] * 16 + ["utf-8-sig", "utf-16", "utf-16-be", "utf-32-le"]


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    header, size = draw(headers())
    text = render(header)
    if draw(st.integers(0, 3)) == 0:
        text = draw(st.sampled_from(WHITESPACE)) * draw(st.integers(0, 2)) + text
    if draw(st.integers(0, 3)) == 0:
        text += "".join(draw(st.lists(st.sampled_from(WHITESPACE), max_size=3)))
    raw = text.encode(draw(st.sampled_from(ENCODINGS)), "surrogatepass")
    raw += b" " * (-len(raw) % 8) if draw(st.booleans()) else b""
    data = bytearray(draw(st.binary(min_size=size, max_size=size)))
    mutations = st.lists(st.sampled_from(["flip", "insert", "delete", "data", "length"]), max_size=2)
    for change in draw(mutations) if draw(st.integers(0, 2)) == 0 else []:
        if change == "flip" and raw:
            blob = bytearray(raw)
            blob[draw(st.integers(0, len(blob) - 1))] ^= 1 << draw(st.integers(0, 7))
            raw = bytes(blob)
        elif change == "insert":
            at = draw(st.integers(0, len(raw)))
            inserted = draw(st.sampled_from([b" ", b",", b"{", b"]", b"\xef\xbb\xbf", b"\xff", b"\xc0\x80"]))
            raw = raw[:at] + inserted + raw[at:]
        elif change == "delete" and raw:
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + raw[at + 1:]
        elif change == "data":
            data = data[:-1] if data and draw(st.booleans()) else data + b"\x00"
        elif change == "length":
            return struct.pack("<Q", draw(st.sampled_from([len(raw) - 1, len(raw) + 1, 100_000_001])
                                          if raw else st.just(1))) + raw + bytes(data)
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def _library(data: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return safetensors.torch.load(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - SafetensorError, a KeyError for a dtype torch lacks, a Rust panic
        return None


def _ours(data: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return load_tensors(data, WHERE)
    except CorruptCheckpointError as err:
        assert WHERE in str(err)
        return None


def _bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""


def same_verdict(data: bytes) -> None:
    """Both refuse ``data``, or both load the same tensors: names, dtypes, shapes and bytes."""
    ours, theirs = _ours(data), _library(data)
    assert (ours is None) == (theirs is None), f"ours {'refuses' if ours is None else 'loads'}, the library " \
                                               f"{'refuses' if theirs is None else 'loads'}: {data[:300]!r}"
    if ours is not None and theirs is not None:
        assert sorted(ours) == sorted(theirs)
        for key, tensor in theirs.items():
            assert (ours[key].dtype, ours[key].shape) == (tensor.dtype, tensor.shape), key
            assert _bytes(ours[key]) == _bytes(tensor), key


@given(data=safetensors_files())
def _property(data: bytes) -> None:
    same_verdict(data)


def test_our_reader_and_the_library_agree_on_every_header() -> None:
    SHORT(_property)()


@pytest.mark.fuzz
def test_our_reader_and_the_library_agree_on_every_header_long() -> None:
    LONG(_property)()


_W = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def _file(header: bytes, data: bytes = bytes(4)) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# Headers Python's json read and the library refuses: the reader accepted each of these.
REFUSED = {
    "UTF-16": ("{" + _W + "}").encode("utf-16"),
    "UTF-32": ("{" + _W + "}").encode("utf-32-le"),
    "a UTF-8 BOM": b"\xef\xbb\xbf{" + _W.encode() + b"}",
    "NaN in an unknown field": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}',
    "Infinity in the metadata's place": b'{"x":Infinity,' + _W.encode() + b"}",
    "1e400": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1e400}}',
    "-0 as an offset": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}',
    "a lone surrogate escape": b'{"__metadata__":{"a":"\\ud800"},' + _W.encode() + b"}",
    "UTF-8-encoded surrogate": b'{"__metadata__":{"a":"\xed\xa0\x80"},' + _W.encode() + b"}",
    "a field twice": b'{"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "__metadata__ twice": b'{"__metadata__":{},"__metadata__":{},' + _W.encode() + b"}",
    "a bad entry overridden by a good one":
        b'{"w":{"dtype":"XX","shape":[1],"data_offsets":[0,4]},' + _W.encode() + b"}",
    "nested 128 deep": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"[" * 126 + b"]" * 126 + b"}}",
    "a form feed after the header": b"{" + _W.encode() + b"}\x0c",
}
# Headers the library accepts that the reader refused.
ACCEPTED = {
    "__metadata__ null": b'{"__metadata__":null,' + _W.encode() + b"}",
    "an entry as an array": b'{"w":["F32",[1],[0,4]]}',
    "a dtype as an enum map": b'{"w":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}',
    "nested 127 deep": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"[" * 125 + b"]" * 125 + b"}}",
    "whitespace around the header": b"\n\t{" + _W.encode() + b"}\r  ",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_header_the_library_refuses_is_refused(case: str) -> None:
    data = _file(REFUSED[case])
    assert _library(data) is None
    with pytest.raises(CorruptCheckpointError, match=f"{WHERE}: not a valid safetensors file"):
        load_tensors(data, WHERE)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_a_header_the_library_accepts_is_accepted(case: str) -> None:
    same_verdict(_file(ACCEPTED[case]))
    assert _ours(_file(ACCEPTED[case])) is not None
