"""Type-exact JSON for the non-tensor part of a training state.

A nested state is split into a JSON *skeleton* and a table of tensors. Plain JSON values stay as
they are; every other supported type becomes a one-key object tagged with a ``$`` name, so a
round trip returns the same Python types (a tuple stays a tuple, ``0`` keys stay ints, an
``OrderedDict`` keeps its ``_metadata``).

Why hand-written: no JSON library is both type-exact for Python containers and free of code
execution on load (jsonpickle imports and calls whatever the file names). Decoding here never
imports a module and never calls a constructor the file chooses, except the allow-listed dict
subclasses and enums whose module the process has already imported. Config objects (OmegaConf,
``argparse.Namespace``, dataclasses) follow the rules in :mod:`lightning_ckpt.format.configs`.
"""

from __future__ import annotations

import base64
import enum
import math
import pathlib
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_ckpt.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedTypeError
from lightning_ckpt.format import configs

TAG_TENSOR = "$tensor"
TAG_NDARRAY = "$ndarray"
TAG_NPSCALAR = "$npscalar"
TAG_TUPLE = "$tuple"
TAG_SET = "$set"
TAG_FROZENSET = "$frozenset"
TAG_DICT = "$dict"
TAG_FLOAT = "$float"
TAG_BYTES = "$bytes"
TAG_DTYPE = "$dtype"
TAG_SIZE = "$size"
TAG_DEVICE = "$device"
TAG_PATH = "$path"
TAG_ENUM = "$enum"
TAG_PICKLE = "$pickle"

# Dict subclasses restored by name. Only these names are ever looked up on load.
_DICT_CLASSES: dict[str, tuple[str, str]] = {
    "dict": ("builtins", "dict"),
    "OrderedDict": ("collections", "OrderedDict"),
    "AttributeDict": ("lightning.fabric.utilities.data", "AttributeDict"),
}
_PATH_CLASSES = {cls.__name__: cls for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                                                pathlib.PureWindowsPath, pathlib.Path, pathlib.PurePath)}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

TensorSink = Callable[[tuple, torch.Tensor], str]
"""Called with (key path, tensor); stores the tensor and returns the reference to put in JSON."""


def describe_path(path: tuple) -> str:
    """``("hyper_parameters", "lr")`` -> ``checkpoint['hyper_parameters']['lr']`` for error messages."""
    return "checkpoint" + "".join(f"[{part!r}]" for part in path)


@dataclass
class Encoder:
    """Turns a nested state into a JSON-able skeleton, handing every tensor to ``sink``.

    Args:
        sink: stores a tensor found at a key path and returns its reference.
        allow_pickle: pickle leaves of unsupported types instead of refusing them.
    """

    sink: TensorSink
    allow_pickle: bool = False
    pickled_paths: list[str] = field(default_factory=list)

    def encode(self, value: Any, path: tuple = ()) -> Any:  # noqa: C901 - one flat type switch
        if value is None or type(value) in (bool, int, str):
            return value
        if isinstance(value, enum.Enum):
            return self._encode_enum(value, path)
        if type(value) is float:
            return value if math.isfinite(value) else {TAG_FLOAT: repr(value)}
        if isinstance(value, torch.Tensor):
            return {TAG_TENSOR: self.sink(path, value)}
        if isinstance(value, np.ndarray):
            return self._encode_ndarray(value, path)
        if isinstance(value, np.generic):
            return {TAG_NPSCALAR: value.dtype.str, "value": self.encode(value.item(), path)}
        if type(value) is list:
            return [self.encode(v, path + (i,)) for i, v in enumerate(value)]
        if type(value) is tuple:
            return {TAG_TUPLE: [self.encode(v, path + (i,)) for i, v in enumerate(value)]}
        if type(value) in (set, frozenset):
            tag = TAG_SET if type(value) is set else TAG_FROZENSET
            return {tag: [self.encode(v, path + (i,)) for i, v in enumerate(value)]}
        if isinstance(value, dict) and type(value).__name__ in _DICT_CLASSES and _dict_class_ok(value):
            return self._encode_dict(value, path)
        if isinstance(value, torch.dtype):
            return {TAG_DTYPE: str(value).removeprefix("torch.")}
        if isinstance(value, torch.Size):
            return {TAG_SIZE: list(value)}
        if isinstance(value, torch.device):
            return {TAG_DEVICE: str(value)}
        if isinstance(value, pathlib.PurePath) and type(value).__name__ in _PATH_CLASSES:
            return {TAG_PATH: str(value), "class": type(value).__name__}
        if isinstance(value, bytes):
            return {TAG_BYTES: base64.b64encode(value).decode("ascii")}
        config = configs.encode_config(self, value, path)
        return self._refuse_or_pickle(value, path) if config is NotImplemented else config

    def _encode_dict(self, value: dict, path: tuple) -> Any:
        plain = type(value) is dict and all(isinstance(k, str) and not k.startswith("$") for k in value)
        if plain:
            return {k: self.encode(v, path + (k,)) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not (isinstance(k, (str, int)) and not isinstance(k, bool)) or isinstance(k, enum.Enum):
                raise UnsupportedTypeError(
                    f"{describe_path(path)} has a key {k!r} of type {type(k).__name__}; only str and int keys "
                    "can be stored. Convert the keys to str in on_save_checkpoint, or pass allow_pickle=True."
                )
            items.append([k, self.encode(v, path + (k,))])
        out: dict[str, Any] = {TAG_DICT: items, "class": type(value).__name__}
        metadata = getattr(value, "_metadata", None)  # torch keeps module versions on state_dicts here
        if isinstance(metadata, dict):
            out["metadata"] = self.encode(metadata, path + ("_metadata",))
        return out

    def _encode_ndarray(self, value: np.ndarray, path: tuple) -> Any:
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except (TypeError, ValueError):  # object arrays, strings, non-native byte order
            return self._refuse_or_pickle(value, path)
        return {TAG_NDARRAY: self.sink(path, tensor), "dtype": value.dtype.str}

    def _encode_enum(self, value: enum.Enum, path: tuple) -> Any:
        cls = type(value)
        return {TAG_ENUM: f"{cls.__module__}:{cls.__qualname__}", "name": value.name}

    def _refuse_or_pickle(self, value: Any, path: tuple) -> Any:
        if not self.allow_pickle:
            raise UnsupportedTypeError(
                f"{describe_path(path)} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be "
                "stored without pickling. Store plain values instead (numbers, strings, lists, dicts, tensors, "
                "dataclasses, OmegaConf configs), leave it out (e.g. save_hyperparameters(ignore=[...])), or pickle "
                "it with allow_pickle=True (Checkpointer(allow_pickle=True), SafetensorsCheckpointIO(allow_pickle="
                "True)); loading then needs allow_pickle=True too (only for checkpoints you trust)."
            )
        self.pickled_paths.append(describe_path(path))
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return {TAG_PICKLE: base64.b64encode(data).decode("ascii")}


def _dict_class_ok(value: dict) -> bool:
    module, _ = _DICT_CLASSES[type(value).__name__]
    return type(value).__module__ == module


TensorSource = Callable[[str], torch.Tensor]
"""Returns the tensor stored under a reference."""


@dataclass
class Decoder:
    """Rebuilds a state from its skeleton; the inverse of :class:`Encoder`.

    Args:
        source: returns the tensor for a reference (the same object for the same reference, so
            tied weights come back tied).
        allow_pickle: unpickle leaves that were saved with ``allow_pickle=True``.
        where: the checkpoint location, for error messages.
    """

    source: TensorSource
    allow_pickle: bool = False
    where: str = ""

    def decode(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        if not node or not next(iter(node)).startswith("$"):
            return {k: self.decode(v) for k, v in node.items()}
        tag = next(iter(node))
        handler = _DECODERS.get(tag)
        if handler is None:
            raise CorruptCheckpointError(f"{self.where}: unknown tag {tag!r} in the state JSON; the file is damaged "
                                         "or was written by a newer lightning-ckpt (upgrade it)")
        try:
            return handler(self, node)
        except (CorruptCheckpointError, RecursionError):
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as err:
            raise CorruptCheckpointError(f"{self.where}: malformed {tag} entry in the state JSON ({err})") from err

    def _dict(self, node: dict) -> dict:
        cls = _load_dict_class(node.get("class", "dict"), self.where)
        out = cls()
        for key, value in node[TAG_DICT]:
            if not isinstance(key, (str, int)):
                raise CorruptCheckpointError(f"{self.where}: dict key {key!r} in the state JSON is not str or int")
            out[key] = self.decode(value)
        if "metadata" in node:
            out._metadata = self.decode(node["metadata"])  # type: ignore[attr-defined]
        return out

    def _pickle(self, node: dict) -> Any:
        if not self.allow_pickle:
            raise UnsafeCheckpointError(
                f"{self.where}: this checkpoint holds pickled values (saved with allow_pickle=True); loading them "
                "runs code from the file. Pass allow_pickle=True only if you trust where it came from."
            )
        return pickle.loads(base64.b64decode(node[TAG_PICKLE]))  # noqa: S301 - explicit opt-in above

    def _enum(self, node: dict) -> enum.Enum:
        cls = configs.lookup_imported(node[TAG_ENUM])  # never imports: only classes already in the process
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            module_name = node[TAG_ENUM].partition(":")[0]
            raise CorruptCheckpointError(
                f"{self.where}: enum {node[TAG_ENUM]} is not available; import {module_name} before loading"
            )
        return cls[node["name"]]


def _load_dict_class(name: str, where: str) -> type:
    if name not in _DICT_CLASSES:
        raise CorruptCheckpointError(f"{where}: unknown dict class {name!r} in the state JSON")
    module_name, attr = _DICT_CLASSES[name]
    if module_name == "builtins":
        return dict
    if module_name == "collections":
        return OrderedDict
    module = sys.modules.get(module_name)
    return getattr(module, attr) if module is not None else dict


def _float(node: dict) -> float:
    text = node[TAG_FLOAT]
    if text not in _NONFINITE:
        raise ValueError(f"{text!r} is not nan/inf/-inf")
    return _NONFINITE[text]


def _npscalar(dec: Decoder, node: dict) -> np.generic:
    dtype, value = np.dtype(node[TAG_NPSCALAR]), dec.decode(node["value"])
    # np.void(n) and np.bytes_(n) allocate n bytes, np.int64([...]) is an array: a scalar is built
    # from a number, and a string-like one from a string.
    string_like = dtype.kind in "SUV"
    if dtype.kind not in "biufcmMSUV" or not isinstance(value, (str, bytes) if string_like else (int, float)):
        raise ValueError(f"{dtype.str} scalar from a {type(value).__name__}")
    return dtype.type(value)


def _ndarray(dec: Decoder, node: dict) -> np.ndarray:
    array = dec.source(node[TAG_NDARRAY]).numpy()
    return array.view(np.dtype(node["dtype"])) if array.dtype != np.dtype(node["dtype"]) else array


def _path(node: dict) -> pathlib.PurePath:
    cls = _PATH_CLASSES.get(node.get("class", "PurePath"), pathlib.PurePath)
    try:
        return cls(node[TAG_PATH])
    except NotImplementedError:  # a WindowsPath read on Linux, or the reverse
        return pathlib.PurePath(node[TAG_PATH])


_DECODERS: dict[str, Callable[[Decoder, dict], Any]] = {
    TAG_TENSOR: lambda d, n: d.source(n[TAG_TENSOR]),
    TAG_NDARRAY: _ndarray,
    TAG_NPSCALAR: _npscalar,
    TAG_TUPLE: lambda d, n: tuple(d.decode(v) for v in n[TAG_TUPLE]),
    TAG_SET: lambda d, n: {d.decode(v) for v in n[TAG_SET]},
    TAG_FROZENSET: lambda d, n: frozenset(d.decode(v) for v in n[TAG_FROZENSET]),
    TAG_DICT: Decoder._dict,
    TAG_FLOAT: lambda d, n: _float(n),
    TAG_BYTES: lambda d, n: base64.b64decode(n[TAG_BYTES], validate=True),
    TAG_DTYPE: lambda d, n: _dtype(n[TAG_DTYPE]),
    TAG_SIZE: lambda d, n: torch.Size([_int64(x) for x in n[TAG_SIZE]]),
    TAG_DEVICE: lambda d, n: torch.device(n[TAG_DEVICE]),
    TAG_PATH: lambda d, n: _path(n),
    TAG_ENUM: Decoder._enum,
    TAG_PICKLE: Decoder._pickle,
    **configs.DECODERS,
}


def _int64(value: Any) -> int:
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise ValueError(f"{value!r} is not a 64-bit integer")
    return value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype

