"""A zero-copy safetensors reader: every tensor of a file is a view into the file's one buffer.

Why hand-written: the ``safetensors`` Python API copies each tensor out of the file's bytes
(``deserialize`` returns a ``bytes`` per tensor, which ``load`` then wraps), so a load held the
state twice; ``safe_open`` reads from a mapping of the file, i.e. a second read after the checksum
pass, of bytes that may no longer be the verified ones. The validation below is the one
safetensors applies (``Metadata::validate``): a bounded header, known dtypes, offsets that tile the
data exactly, and sizes that agree with shape x dtype, computed without overflow and before
anything is allocated. The header's JSON is read as the library's serde_json reads it (see
:mod:`lightning_ckpt.format.strict_json`), so a file loads here exactly when ``safetensors.torch.load``
loads it (a differential fuzz test holds the two to the same verdict).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from typing import Any

import torch

from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.format import strict_json
from lightning_ckpt.format.blob import DTYPE_NAMES, METADATA_KEY, Buffer

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_LENGTH_FIELD = 8
_U64 = 2**64
_MAX_DIM = 2**63  # torch sizes are int64
_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def as_uint8(data: Buffer | torch.Tensor) -> torch.Tensor:
    """A file's bytes as a flat uint8 tensor, sharing memory with ``data`` when it is writable
    (the reader's buffers are); read-only ``bytes`` are copied once."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8)
    view = memoryview(data)
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(view) if view.readonly else view, dtype=torch.uint8)


def load_tensors(data: Buffer | torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views into ``data``'s memory.

    Args:
        data: the whole file (verified against the manifest by the caller).
        where: the file's location, for error messages.

    Raises:
        CorruptCheckpointError: the file is not valid safetensors, or holds a dtype torch cannot load.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian by definition
        raise RuntimeError("lightning-ckpt reads safetensors on little-endian machines only")
    buf = as_uint8(data)
    entries, start, _ = _header(buf, where)
    body = buf[start:]
    end = 0
    for key, (dtype, shape, (first, last)) in sorted(entries.items(), key=lambda kv: tuple(kv[1][2])):
        if first != end:
            raise _corrupt(where, f"tensor {key!r} starts at {first}, expected {end} (gap or overlap)")
        end = last
    if end != body.numel():
        raise _corrupt(where, f"the tensors end at byte {end} of {body.numel()} data bytes")
    main = _main_dtype(entries)
    return {key: _view(body, dtype, shape, span, copy=dtype != main)  # uint8 is never main: always copied
            for key, (dtype, shape, span) in entries.items()}


def _main_dtype(entries: Mapping[str, _Entry]) -> torch.dtype | None:
    """The dtype holding most of a file's bytes: its tensors stay views into the file's buffer.

    torch.save (so a Lightning .ckpt, or a user's own save of a loaded state) refuses two dtypes
    viewing one storage, so the tensors of the other dtypes (RNG state bytes, integer counters:
    small in practice) are copied out of the buffer.

    uint8 tensors are always copied, each into a storage of its own: they hold RNG states (torch's,
    a ``StatefulDataLoader`` sampler's generator), and torch's ``Generator.set_state`` reads a state
    from its storage's first byte, ignoring a view's offset (torch 2.13: an error, or a segfault).
    So uint8 is never the main dtype, even in a tiny model's file whose RNG states outweigh its weights.
    """
    size: dict[torch.dtype, int] = {}
    for dtype, _, (first, last) in entries.values():
        if dtype == torch.uint8:
            continue
        size[dtype] = size.get(dtype, 0) + last - first
    return max(size, key=size.__getitem__) if size else None


def read_header(prefix: Buffer, size: int, where: str) -> tuple[dict[str, _Entry], int, dict[str, str]]:
    """The header of a safetensors file of ``size`` bytes, from its first bytes (``prefix``: at least the
    header, see :func:`header_length`): each tensor's (dtype, shape, data_offsets), where the data begins,
    and the ``__metadata__`` map; every tensor's data checked to lie inside the file.

    Raises:
        CorruptCheckpointError: the header is not valid safetensors, or a tensor lies past the file's end.
    """
    entries, start, metadata = _header(as_uint8(prefix), where)
    for key, (_, _, (_, last)) in entries.items():
        if start + last > size:
            raise _corrupt(where, f"tensor {key!r} ends at byte {start + last}, past the file's {size}")
    return entries, start, metadata


def header_length(first: bytes, size: int, where: str) -> int:
    """The bytes to read to have a file's whole header (length field included), from its first 8 bytes.

    Raises:
        CorruptCheckpointError: the length is past the limit or the file's ``size``.
    """
    if len(first) < _LENGTH_FIELD:
        raise _corrupt(where, f"{len(first)} bytes, shorter than the header length field")
    (length,) = struct.unpack("<Q", bytes(first[:_LENGTH_FIELD]))
    if length > MAX_HEADER_BYTES or _LENGTH_FIELD + length > size:
        raise _corrupt(where, f"header length {length} is past the limit or the file's {size} bytes")
    return _LENGTH_FIELD + length


def _header(buf: torch.Tensor, where: str) -> tuple[dict[str, _Entry], int, dict[str, str]]:
    """The tensors a file's header describes (its last entry for a repeated name, as the library's map keeps),
    where the data begins, and the ``__metadata__`` map."""
    if buf.numel() < _LENGTH_FIELD:
        raise _corrupt(where, f"{buf.numel()} bytes, shorter than the header length field")
    (length,) = struct.unpack("<Q", buf[:_LENGTH_FIELD].numpy().tobytes())
    if length > MAX_HEADER_BYTES:
        raise _corrupt(where, f"header too large ({length} bytes, the limit is {MAX_HEADER_BYTES})")
    if _LENGTH_FIELD + length > buf.numel():
        raise _corrupt(where, f"header length {length} runs past the end of the file")
    try:
        header = strict_json.loads(buf[_LENGTH_FIELD:_LENGTH_FIELD + length].numpy().tobytes())
    except ValueError as err:
        raise _corrupt(where, f"unreadable header ({err})") from err
    if not isinstance(header, strict_json.Object):
        raise _corrupt(where, "the header is not a JSON object")
    entries: dict[str, _Entry] = {}
    metadata: dict[str, str] = {}
    metadata_seen = False
    for key, info in header:
        if key != METADATA_KEY:
            entries[key] = _entry(key, info, where)  # every one is checked, the last one counts
        elif metadata_seen:
            raise _corrupt(where, f"{METADATA_KEY} appears twice")
        elif not (info is None or (isinstance(info, strict_json.Object) and all(type(v) is str for _, v in info))):
            raise _corrupt(where, f"{METADATA_KEY} is not a map of strings")
        else:
            metadata_seen = True
            metadata = {k: v for k, v in info} if info is not None else {}
    return entries, _LENGTH_FIELD + length, metadata


_Entry = tuple[torch.dtype, list[int], list[int]]
_FIELDS = ("dtype", "shape", "data_offsets")


def _fields(key: str, info: Any, where: str) -> tuple[Any, Any, Any]:
    """An entry's three fields: from an object (each once; other keys ignored) or, as serde reads a
    struct, from an array of exactly three."""
    if type(info) is list:
        if len(info) != len(_FIELDS):
            raise _corrupt(where, f"tensor {key!r}: entry is an array of {len(info)}, not [dtype, shape, offsets]")
        return info[0], info[1], info[2]
    if not isinstance(info, strict_json.Object):
        raise _corrupt(where, f"tensor {key!r}: entry is not an object")
    found: dict[str, Any] = {}
    for field, value in info:
        if field in _FIELDS:
            if field in found:
                raise _corrupt(where, f"tensor {key!r}: {field!r} appears twice")
            found[field] = value
    if len(found) != len(_FIELDS):
        raise _corrupt(where, f"tensor {key!r}: missing {sorted(set(_FIELDS) - set(found))}")
    return found["dtype"], found["shape"], found["data_offsets"]


def _dtype_name(dtype: Any) -> Any:
    """A dtype as a string, or as serde also reads an enum's unit variant: ``{"F32": null}``."""
    if isinstance(dtype, strict_json.Object) and len(dtype) == 1 and dtype[0][1] is None:
        return dtype[0][0]
    return dtype


def _entry(key: str, info: Any, where: str) -> _Entry:
    dtype, shape, offsets = _fields(key, info, where)
    dtype = _dtype_name(dtype)
    if type(dtype) is not str or dtype not in _DTYPES:
        raise _corrupt(where, f"tensor {key!r}: dtype {dtype!r} cannot be loaded into torch")
    if not (type(shape) is list and all(type(d) is int and 0 <= d < _MAX_DIM for d in shape)):
        raise _corrupt(where, f"tensor {key!r}: bad shape {shape!r}")
    if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] < _U64):
        raise _corrupt(where, f"tensor {key!r}: bad data_offsets {offsets!r}")
    elements = 1
    for dim in shape:  # as safetensors does: every partial product must fit in 64 bits
        elements *= dim
        if elements >= _U64:
            raise _corrupt(where, f"tensor {key!r}: shape {shape} overflows 64 bits")
    nbytes = elements * _DTYPES[dtype].itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise _corrupt(where, f"tensor {key!r}: shape {shape} of {dtype} is {nbytes} bytes, its data_offsets "
                              f"span {offsets[1] - offsets[0]}")
    return _DTYPES[dtype], shape, offsets


def _view(body: torch.Tensor, dtype: torch.dtype, shape: list[int], span: list[int], *, copy: bool) -> torch.Tensor:
    if span[0] == span[1]:
        return torch.empty(shape, dtype=dtype)
    raw = body[span[0]:span[1]]
    if copy or raw.storage_offset() % dtype.itemsize:  # another writer's unaligned layout: copy this one tensor
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def _corrupt(where: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: not a valid safetensors file ({problem})")
