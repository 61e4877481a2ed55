"""Malformed input fuzzing of the reader: only ``CheckpointError`` ever comes out, in bounded time
and memory.

The reader is fed malformed safetensors files, manifests and state.json files, both through the
format functions on bytes and through ``load_checkpoint`` on a directory whose manifest was re-sealed
to match, so that the checksums pass and only the parsers stand in the way. The address space is
capped a few GiB above its size, so a size claimed by a file cannot be allocated quietly.

The default run tries 200 cases per property, the same ones each time. The long run (marked
``fuzz``, ``make fuzz``) draws fresh random cases each time, 5000 per property by default, about 2 minutes on 2
cores; ``LIGHTNING_CKPT_FUZZ_EXAMPLES`` sets the number (20000: about 8 minutes):

    python -m pytest tests/faults/test_fuzz_reader.py -m fuzz -p no:warnings
    LIGHTNING_CKPT_FUZZ_EXAMPLES=20000 python -m pytest tests/faults/test_fuzz_reader.py -m fuzz -p no:warnings

A failure prints the smallest input found and a ``@reproduce_failure`` line to replay it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ckpt import CheckpointError, CorruptCheckpointError, load_checkpoint, save_checkpoint
from lightning_ckpt.format import (
    EXTRA_TENSORS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    FileEntry,
    Manifest,
    decode_state,
    digest,
)
from lightning_ckpt.format.manifest import sealed

LONG_EXAMPLES = int(os.environ.get("LIGHTNING_CKPT_FUZZ_EXAMPLES", "5000"))
_COMMON = dict(deadline=timedelta(seconds=2), database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHORT = settings(max_examples=200, derandomize=True, **_COMMON)
LONG = settings(max_examples=LONG_EXAMPLES, **_COMMON)
_HEADROOM = 3 << 30
WHERE = "/fuzz/ckpt"

# ---------------------------------------------------------------------------------------------
# Strategies


_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
# Dtypes the format knows but torch cannot load, misspellings and nonsense.
ODD_DTYPES = ["F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "E8M0", "f32", "", "F32 ", "OBJECT"]
HUGE = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63)]
ints = st.integers(0, 64) | st.sampled_from(HUGE) | st.integers()
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _header_bytes(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _frame(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A well-formed safetensors file, then a few of the ways a file goes wrong."""
    header: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(_ITEM_SIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * _ITEM_SIZE[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6)) | json_values)
    data = draw(st.binary(min_size=offset, max_size=offset))
    keys = [k for k in header if k != "__metadata__"] or ["t0"]
    for change in draw(st.lists(st.sampled_from(["dtype", "shape", "offsets", "entry", "huge", "overlap"]),
                                max_size=2)):
        entry = header.setdefault(draw(st.sampled_from(keys)), {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
        if not isinstance(entry, dict):
            continue
        if change == "dtype":
            entry["dtype"] = draw(st.sampled_from(ODD_DTYPES + sorted(_ITEM_SIZE)) | json_values)
        elif change == "shape":
            entry["shape"] = draw(st.lists(ints, max_size=4) | json_values)
        elif change == "offsets":
            entry["data_offsets"] = draw(st.lists(ints, max_size=3) | json_values)
        elif change == "entry":
            header[draw(st.sampled_from(keys))] = draw(json_values)
        elif change == "huge":  # a claim of 2**40 elements and more
            entry["shape"] = draw(st.sampled_from([[2**40], [2**20, 2**20], [2**32, 2**32], [2**62, 4], [0, 2**63]]))
        else:
            entry["data_offsets"] = [0, max(offset, 1)]
    raw = _header_bytes(header)
    length = None
    for change in draw(st.lists(st.sampled_from(["length", "trailing", "cut", "garbage", "flip"]), max_size=2)):
        if change == "length":
            length = draw(st.sampled_from([len(raw) + 1, len(raw) + 8 + len(data) + 1, 100_000_001, 2**63, 2**64 - 1])
                          | st.integers(0, 2**64 - 1))
        elif change == "trailing":
            data += draw(st.binary(min_size=1, max_size=16))
        elif change == "cut":
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        elif change == "garbage":  # non-UTF8, non-JSON, or JSON of the wrong shape
            raw = draw(st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()))
        else:
            blob = bytearray(raw)
            if blob:
                blob[draw(st.integers(0, len(blob) - 1))] ^= 1 << draw(st.integers(0, 7))
            raw = bytes(blob)
    return _frame(raw, data, length)


TAGS = ["$tensor", "$ndarray", "$npscalar", "$tuple", "$set", "$frozenset", "$dict", "$float", "$bytes", "$dtype",
        "$size", "$device", "$path", "$enum", "$pickle", "$", "$unknown", "$TENSOR"]
# Values that reach past a decoder's first checks: references, dtype names, class names, enum names.
MEANINGFUL = st.sampled_from([
    "model.safetensors:w", "model.safetensors:b", "model.safetensors:nope", "optimizer.safetensors:m",
    "state.json:x", "manifest.json:x", "nofile:w", "model.safetensors", ":", "", "float32", "bfloat16", "Tensor",
    "__class__", "<i8", "<f4", "|O", "|V8", "<U3", "|S2", "<M8[ns]", "i4,i4", "(2,)f4", "nan", "-inf", "cuda:0",
    "meta", "garbage", "OrderedDict", "AttributeDict", "dict", "os.system", "PosixPath", "WindowsPath",
    "tiny:Color", "enum:Enum", "os:system", "builtins:object", "torch:onnx", "RED", "AAEC", "!!", "gARLLg==",
])
ATTRS = st.sampled_from(["class", "metadata", "dtype", "value", "name"])


def _tagged(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    payload = MEANINGFUL | inner | st.lists(MEANINGFUL | inner, max_size=3) | st.sampled_from(HUGE)
    return st.builds(lambda tag, value, extra: {tag: value, **extra}, st.sampled_from(TAGS), payload,
                     st.dictionaries(ATTRS, MEANINGFUL | inner, max_size=2))


skeletons = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=6) | MEANINGFUL,
    lambda inner: (st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.sampled_from(TAGS), inner,
                                                                 max_size=3) | _tagged(inner)),
    max_leaves=12,
)


@st.composite
def state_files(draw: st.DrawFn) -> bytes:
    """A state.json: a fuzzed skeleton, a wrongly shaped document, or bytes that are not JSON."""
    kind = draw(st.sampled_from(["skeleton", "document", "bytes"]))
    if kind == "skeleton":  # NaN and Infinity too: Python's json writes and reads them
        return json.dumps({"state": draw(skeletons), "pickled": draw(json_values)}).encode()
    if kind == "document":
        shaped = st.dictionaries(st.sampled_from(["state", "pickled"]), skeletons)
        return json.dumps(draw(json_values | shaped)).encode()
    return draw(st.binary(max_size=64))


def _good_manifest_doc() -> dict[str, Any]:
    doc = json.loads(Manifest(files={MODEL_FILE: FileEntry(size=8, digest="0" * 32)}, step=3, epoch=0,
                              versions={"torch": "2"}, meta={"reason": "x"}).to_bytes())
    del doc["manifest_digest"]
    return doc


@st.composite
def manifest_files(draw: st.DrawFn) -> bytes:
    """A valid manifest with some fields replaced or removed, sealed so its own checksum passes;
    sometimes unsealed, or not JSON at all."""
    doc = _good_manifest_doc()
    keys = st.sampled_from([*doc, "files.model.safetensors", "files.model.safetensors.size",
                            "files.model.safetensors.digest", "files.<name>", "extra"])
    for key in draw(st.lists(keys, max_size=3)):
        value = draw(json_values | st.sampled_from([10**400, 2**64, -1, True, 1.5, "../x", "a\x00b", "." * 3]))
        target, _, rest = key.partition(".")
        if target == "files" and rest:
            files = doc.get("files") if isinstance(doc.get("files"), dict) else {}
            name, _, field = rest.rpartition(".") if rest.endswith((".size", ".digest")) else (rest, "", "")
            name = draw(st.text(max_size=300) | st.sampled_from(["", ".", "..", "a/b", "a\\b", "x\x00"])) \
                if name == "<name>" else name
            if field and isinstance(files.get(name), dict):
                files[name][field] = value
            else:
                files[name] = value
            doc["files"] = files
        elif draw(st.booleans()):
            doc[target] = value
        else:
            doc.pop(target, None)
    how = draw(st.sampled_from(["sealed", "sealed", "sealed", "unsealed", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=64))
    return sealed(doc) if how == "sealed" else json.dumps(doc).encode()


def _state_file_for(draw: st.DrawFn) -> bytes:
    """A state.json that references every tensor of a fuzzed model.safetensors, and one more."""
    keys = ["t0", "t1", "t2", "w", "__metadata__"]
    skeleton = {"tensors": [{"$tensor": f"{MODEL_FILE}:{k}"} for k in keys],
                "array": {"$ndarray": f"{MODEL_FILE}:t0", "dtype": draw(MEANINGFUL)}}
    return json.dumps({"state": skeleton, "pickled": []}).encode()


# ---------------------------------------------------------------------------------------------
# Harness


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def only_checkpoint_errors(fn: Callable[[], object]) -> CheckpointError | None:
    """Run ``fn``: it may return or raise a CheckpointError, never anything else, and never because
    an allocation failed (a reader must refuse a claimed size before allocating it)."""
    try:
        fn()
    except CheckpointError as err:
        for cause in _chain(err):
            assert not isinstance(cause, MemoryError) and "allocate" not in str(cause), f"allocation attempted: {err}"
        return err
    return None


def _vm_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")), None)


@pytest.fixture(autouse=True, scope="module")
def capped_memory() -> Iterator[None]:
    """Cap the address space a few GiB above its current size while the fuzz runs (Linux)."""
    vm = _vm_bytes()
    if vm is None:  # not Linux: no cap
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + _HEADROOM if hard == resource.RLIM_INFINITY else min(vm + _HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint with every file kind."""
    path = tmp_path_factory.mktemp("fuzz") / "pristine"
    save_checkpoint({"state_dict": {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.bfloat16)},
                     "optimizer_states": [{"state": {0: {"m": torch.zeros(3)}}}], "extra": torch.tensor([1, 2]),
                     "global_step": 3, "epoch": 0, "hp": {"lr": 0.1, "sizes": (1, 2)}}, path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [MODEL_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
    return path


def rewrite(ckpt: Path, files: dict[str, bytes]) -> None:
    """Replace files of a checkpoint and re-seal its manifest, so every checksum passes."""
    manifest = Manifest.from_bytes((ckpt / MANIFEST_FILE).read_bytes(), str(ckpt))
    entries = dict(manifest.files)
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
        entries[name] = FileEntry(size=len(data), digest=digest(data))
    (ckpt / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=entries).to_bytes())


CLAIMED_SIZE = "a size claimed by a sealed manifest"
# A manifest whose own checksum passes may still claim any size: a reader must check the claim
# against the file before it allocates (2**45 once raised MemoryError, 2**63 OverflowError).
claimed_sizes = st.sampled_from([2**45, 2**63, 2**63 - 1, 2**64, *HUGE[:5]]) | st.integers(0, 2**70)


def claim_size(ckpt: Path, file: str, size: int) -> None:
    """Re-seal a checkpoint's manifest with another size for one file."""
    manifest = Manifest.from_bytes((ckpt / MANIFEST_FILE).read_bytes(), str(ckpt))
    entries = {**manifest.files, file: FileEntry(size=size, digest=manifest.files[file].digest)}
    (ckpt / MANIFEST_FILE).write_bytes(dataclasses.replace(manifest, files=entries).to_bytes())


# ---------------------------------------------------------------------------------------------
# Properties: each takes the pristine checkpoint and a workspace, and returns a hypothesis test.


def _safetensors_property(pristine: Path, work: Path) -> Callable[..., None]:
    @given(model=safetensors_files(), data=st.data())
    def check(model: bytes, data: st.DataObject) -> None:
        state = _state_file_for(data.draw)
        err = only_checkpoint_errors(lambda: decode_state({STATE_FILE: state, MODEL_FILE: model}, where=WHERE))
        assert err is None or f"{WHERE}/" in str(err)
    return check


def _state_property(pristine: Path, work: Path) -> Callable[..., None]:
    tensors = {name: (pristine / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE)}

    @given(state=state_files())
    def check(state: bytes) -> None:
        err = only_checkpoint_errors(lambda: decode_state({**tensors, STATE_FILE: state}, where=WHERE))
        assert err is None or f"{WHERE}/" in str(err)
    return check


def _manifest_property(pristine: Path, work: Path) -> Callable[..., None]:
    @given(data=manifest_files())
    def check(data: bytes) -> None:
        try:
            manifest = Manifest.from_bytes(data, WHERE)
        except CheckpointError as err:
            assert f"{WHERE}/{MANIFEST_FILE}" in str(err)
            return
        # What parses is well-typed: listing, retention and loading can rely on it.
        assert all(type(e.size) is int and e.size >= 0 and isinstance(e.digest, str) for e in manifest.files.values())
        assert all(type(v) is int for v in (manifest.step, manifest.epoch) if v is not None)
        assert isinstance(manifest.created, float) and isinstance(manifest.meta, dict)
        assert all("/" not in n and not n.startswith(".") and "\x00" not in n for n in manifest.files)
    return check


def _load_property(pristine: Path, work: Path) -> Callable[..., None]:
    @given(target=st.sampled_from([MODEL_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE, STATE_FILE, MANIFEST_FILE,
                                   CLAIMED_SIZE]),
           data=st.data())
    def check(target: str, data: st.DataObject) -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        if target == CLAIMED_SIZE:
            claim_size(work, data.draw(st.sampled_from(sorted(Manifest.from_bytes(
                (work / MANIFEST_FILE).read_bytes(), str(work)).files))), data.draw(claimed_sizes))
        elif target == MANIFEST_FILE:
            (work / MANIFEST_FILE).write_bytes(data.draw(manifest_files()))
        elif target == STATE_FILE:
            rewrite(work, {STATE_FILE: data.draw(state_files())})
        else:
            fuzzed = data.draw(safetensors_files())
            rewrite(work, {target: fuzzed, STATE_FILE: _state_file_for(data.draw).replace(
                MODEL_FILE.encode(), target.encode())})
        err = only_checkpoint_errors(lambda: load_checkpoint(work))
        assert err is None or str(work) in str(err)
    return check


def test_memory_cap_is_in_force() -> None:
    """The guard the properties rely on: an allocation the size a file could claim fails here."""
    if _vm_bytes() is None:
        pytest.skip("the address-space cap needs Linux")
    with pytest.raises(RuntimeError, match="allocate"):
        torch.empty(_HEADROOM + (1 << 30), dtype=torch.uint8)


PROPERTIES: dict[str, Callable[[Path, Path], Callable[..., None]]] = {
    "safetensors_bytes": _safetensors_property,
    "state_json_bytes": _state_property,
    "manifest_bytes": _manifest_property,
    "load_checkpoint_dir": _load_property,
}


@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_fuzz_reader(prop: str, pristine: Path, tmp_path: Path) -> None:
    SHORT(PROPERTIES[prop](pristine, tmp_path / "work"))()


@pytest.mark.fuzz
@pytest.mark.parametrize("prop", list(PROPERTIES))
def test_fuzz_reader_long(prop: str, pristine: Path, tmp_path: Path) -> None:
    LONG(PROPERTIES[prop](pristine, tmp_path / "work"))()


# ---------------------------------------------------------------------------------------------
# The named cases, each one through decode_state on bytes and load_checkpoint on a directory.

_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED_SAFETENSORS: dict[str, bytes] = {
    "empty file": b"",
    "shorter than the length field": b"\x08\x00\x00",
    "header length larger than the file": _frame(_header_bytes({"w": _F32}), bytes(8), length=4096),
    "header length of 2**64-1": _frame(_header_bytes({"w": _F32}), bytes(8), length=2**64 - 1),
    "overlapping data_offsets": _frame(_header_bytes({"w": _F32, "v": {**_F32, "data_offsets": [4, 12]}}), bytes(12)),
    "data_offsets past the end": _frame(_header_bytes({"w": {**_F32, "data_offsets": [0, 4096]}}), bytes(8)),
    "data_offsets reversed": _frame(_header_bytes({"w": {**_F32, "data_offsets": [8, 0]}}), bytes(8)),
    "data_offsets of 2**64": _frame(_header_bytes({"w": {**_F32, "data_offsets": [0, 2**64]}}), bytes(8)),
    "unknown dtype": _frame(_header_bytes({"w": {**_F32, "dtype": "F128"}}), bytes(8)),
    "dtype torch cannot load (F4)": _frame(_header_bytes({"w": {**_F32, "dtype": "F4", "shape": [16]}}), bytes(8)),
    "dtype of the wrong JSON type": _frame(_header_bytes({"w": {**_F32, "dtype": 4}}), bytes(8)),
    "shape x dtype larger than the offsets": _frame(_header_bytes({"w": {**_F32, "shape": [3]}}), bytes(8)),
    "shape x dtype smaller than the offsets": _frame(_header_bytes({"w": {**_F32, "dtype": "F16"}}), bytes(8)),
    "negative shape": _frame(_header_bytes({"w": {**_F32, "shape": [-2]}}), bytes(8)),
    "shape of 2**40 elements": _frame(_header_bytes({"w": {**_F32, "shape": [2**40]}}), bytes(8)),
    "shape of 2**20 x 2**20": _frame(_header_bytes({"w": {**_F32, "shape": [2**20, 2**20]}}), bytes(8)),
    "shape overflowing 64 bits": _frame(_header_bytes({"w": {**_F32, "shape": [2**32, 2**32, 0]}}), b""),
    "trailing bytes": _frame(_header_bytes({"w": _F32}), bytes(9)),
    "non-UTF8 header": _frame(b"\xff\xfe\x80" + b" " * 5, bytes(8)),
    "non-JSON header": _frame(b"{w: F32}", bytes(8)),
    "header is a JSON list": _frame(_header_bytes([_F32]), bytes(8)),  # type: ignore[arg-type]
    "metadata of the wrong type": _frame(_header_bytes({"__metadata__": [1], "w": _F32}), bytes(8)),
}


@pytest.mark.parametrize("case", list(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_is_refused_naming_the_file(case: str, pristine: Path, tmp_path: Path) -> None:
    model = MALFORMED_SAFETENSORS[case]
    state = json.dumps({"state": {"w": {"$tensor": f"{MODEL_FILE}:w"}}, "pickled": []}).encode()
    err = only_checkpoint_errors(lambda: decode_state({STATE_FILE: state, MODEL_FILE: model}, where=WHERE))
    assert isinstance(err, CorruptCheckpointError) and f"{WHERE}/{MODEL_FILE}" in str(err)
    if "shape" in case:  # refused by the header's validation, naming the shape, before any allocation
        assert "shape" in str(err) and err.__cause__ is None
    work = Path(shutil.copytree(pristine, tmp_path / "c"))
    rewrite(work, {MODEL_FILE: model})
    with pytest.raises(CorruptCheckpointError, match=MODEL_FILE):
        load_checkpoint(work)


def test_header_over_the_100mb_limit_is_refused() -> None:
    header = b"{}" + b" " * 100_000_006  # valid JSON, 8-aligned, over safetensors' 100 MB header limit
    state = json.dumps({"state": {"w": {"$tensor": f"{MODEL_FILE}:w"}}, "pickled": []}).encode()
    with pytest.raises(CorruptCheckpointError, match=f"{MODEL_FILE}.*header too large"):
        decode_state({STATE_FILE: state, MODEL_FILE: _frame(header, b"")}, where=WHERE)


DEEP = 100_000
MALFORMED_STATE: dict[str, bytes] = {
    "lists nested 100000 deep": b'{"state":' + b"[" * DEEP + b"]" * DEEP + b',"pickled":[]}',
    "objects nested 100000 deep": b'{"state":' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b',"pickled":[]}',
    "tuples nested 400 deep": b'{"state":' + b'{"$tuple":[' * 400 + b"1" + b"]}" * 400 + b',"pickled":[]}',
    "unknown tag": b'{"state":{"$module":"os"},"pickled":[]}',
    "tensor reference without a file": b'{"state":{"$tensor":"w"},"pickled":[]}',
    "tensor reference to the manifest": b'{"state":{"$tensor":"manifest.json:w"},"pickled":[]}',
    "tensor reference of the wrong type": b'{"state":{"$tensor":[1]},"pickled":[]}',
    "size of 2**80": b'{"state":{"$size":[1208925819614629174706176]},"pickled":[]}',
    "size of Infinity": b'{"state":{"$size":[Infinity]},"pickled":[]}',
    "device name that is not one": b'{"state":{"$device":"garbage"},"pickled":[]}',
    "numpy scalar out of range": b'{"state":{"$npscalar":"|i1","value":1000},"pickled":[]}',
    "numpy void of 10**12 bytes": b'{"state":{"$npscalar":"|V8","value":1000000000000},"pickled":[]}',
    "numpy bytes of 10**12 bytes": b'{"state":{"$npscalar":"|S8","value":1000000000000},"pickled":[]}',
    "numpy object scalar": b'{"state":{"$npscalar":"|O","value":1},"pickled":[]}',
    "ndarray viewed as objects": b'{"state":{"$ndarray":"model.safetensors:w","dtype":"|O"},"pickled":[]}',
    "dict class not allowed": b'{"state":{"$dict":[],"class":"os.system"},"pickled":[]}',
    "pickled leaf": b'{"state":{"$pickle":"gARLAS4="},"pickled":[]}',
    "document is a list": b"[1, 2]",
    "no state key": b'{"pickled":[]}',
    "not UTF-8": b"\xff\xfe{}",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(MALFORMED_STATE))
def test_malformed_state_json_is_refused_naming_the_file(case: str, pristine: Path) -> None:
    tensors = {name: (pristine / name).read_bytes() for name in (MODEL_FILE, OPTIMIZER_FILE, EXTRA_TENSORS_FILE)}
    err = only_checkpoint_errors(lambda: decode_state({**tensors, STATE_FILE: MALFORMED_STATE[case]}, where=WHERE))
    assert err is not None and f"{WHERE}/" in str(err)
    assert f"{STATE_FILE}" in str(err) or "manifest.json" in str(err)
