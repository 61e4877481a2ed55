"""Configuration objects people pass as hyper-parameters, stored without pickle.

OmegaConf ``DictConfig``/``ListConfig`` (Hydra), ``argparse.Namespace`` and dataclasses. Each is
stored as a tagged JSON object holding its plain contents (encoded like any other value), and
comes back as the same type where that is possible without importing a module the file names:

- OmegaConf containers: rebuilt with OmegaConf, which we import by its own fixed name; interpolations
  (``${model.width}``) are stored unresolved and so stay interpolations. Without OmegaConf
  installed they come back as plain dicts and lists, with a warning.
- ``argparse.Namespace``: always (the standard library).
- a dataclass: as its own class when that class is already imported (found like enums: in
  ``sys.modules``, through ``__dict__``), rebuilt field by field without calling ``__init__`` or
  ``__post_init__``; otherwise as a plain dict, with a warning naming the class to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from lightning_ckpt.errors import CheckpointWarning



# What this module needs of codec's Encoder and Decoder, so that codec imports this module and not
# the other way round.
class Encoder(Protocol):
    def encode(self, value: Any, path: tuple = ()) -> Any: ...


class Decoder(Protocol):
    where: str

    def decode(self, node: Any) -> Any: ...


TAG_OMEGACONF = "$omegaconf"
TAG_NAMESPACE = "$namespace"
TAG_DATACLASS = "$dataclass"
TAG_TYPE = "$type"
TAG_HF_CONFIG = "$hfconfig"
_K_VALUE = "value"
_K_FIELDS = "fields"
_OMEGACONF = "omegaconf"
_OMEGACONF_CLASSES = ("DictConfig", "ListConfig")
_TRANSFORMERS = "transformers"
_HF_CONFIG_BASES = {("transformers.configuration_utils", "PretrainedConfig"),
                    ("transformers.configuration_utils", "PreTrainedConfig")}


def lookup_imported(spec: str) -> Any:
    """The object ``"module:Qual.name"`` names, if its module is imported already; else None.

    Never imports, and looks names up in ``__dict__`` only: a module's ``__getattr__`` (torch's
    imports submodules) would be code the file chooses.
    """
    module_name, _, qualname = spec.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None else ():
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
    return obj


def _omegaconf() -> Any:
    """OmegaConf, imported by our own fixed name, or None when it is not installed."""
    try:
        return importlib.import_module(_OMEGACONF)
    except ImportError:
        return None


def _is_omegaconf_container(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith(f"{_OMEGACONF}.") and cls.__name__ in _OMEGACONF_CLASSES


def encode_config(enc: Encoder, value: Any, path: tuple) -> Any:
    """The tagged JSON for a config object, or ``NotImplemented`` when ``value`` is none of them."""
    if _is_omegaconf_container(value):
        omegaconf = sys.modules[_OMEGACONF]  # imported already: it made the value
        plain = omegaconf.OmegaConf.to_container(value, resolve=False, enum_to_str=False)
        return {TAG_OMEGACONF: type(value).__name__, _K_VALUE: enc.encode(plain, path)}
    if is_transformers_config(value):  # before dataclasses: transformers 5's configs are dataclasses
        cls = type(value)
        return {TAG_HF_CONFIG: f"{cls.__module__}:{cls.__qualname__}", _K_VALUE: enc.encode(value.to_dict(), path)}
    if type(value) is argparse.Namespace:
        return {TAG_NAMESPACE: [[k, enc.encode(v, path + (k,))] for k, v in vars(value).items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = [[f.name, enc.encode(getattr(value, f.name), path + (f.name,))] for f in dataclasses.fields(value)]
        return {TAG_DATACLASS: f"{cls.__module__}:{cls.__qualname__}", _K_FIELDS: fields}
    if isinstance(value, type) and value.__name__ in _OMEGACONF_CLASSES and value.__module__.startswith(_OMEGACONF):
        return {TAG_TYPE: value.__name__}  # Lightning stores type(hparams) beside OmegaConf hyper-parameters
    return NotImplemented


def is_transformers_config(value: Any) -> bool:
    """A transformers ``PretrainedConfig`` (told by its class's bases: transformers is not imported)."""
    return not isinstance(value, type) and any((c.__module__, c.__name__) in _HF_CONFIG_BASES
                                               for c in type(value).__mro__)


def _decode_hf_config(dec: Decoder, node: dict) -> Any:
    """The config as its class (``from_dict``) when transformers is installed: the class the file names
    if it is an imported ``PretrainedConfig``, else the one transformers maps its ``model_type`` to;
    otherwise its plain dict (which has ``model_type``), with a warning."""
    plain = dec.decode(node[_K_VALUE])
    if not isinstance(plain, dict):
        raise ValueError(f"a transformers config holding a {type(plain).__name__}")
    try:
        transformers = importlib.import_module(_TRANSFORMERS)  # our own fixed name, as for OmegaConf
    except ImportError:
        transformers = None
    base = getattr(transformers, "PretrainedConfig", None)
    cls = lookup_imported(node[TAG_HF_CONFIG])
    if not (isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)):
        kind = plain.get("model_type")
        known = transformers is not None and isinstance(kind, str) and kind in transformers.CONFIG_MAPPING
        cls = transformers.CONFIG_MAPPING[kind] if known else None
    if cls is None:
        warnings.warn(f"{dec.where}: transformers config {node[TAG_HF_CONFIG]} comes back as a plain dict: "
                      "transformers is not installed (or does not know its model_type); pip install transformers "
                      "to get the config back", CheckpointWarning, stacklevel=2)
        return plain
    return cls.from_dict(plain)


def _decode_omegaconf(dec: Decoder, node: dict) -> Any:
    kind, plain = node[TAG_OMEGACONF], dec.decode(node[_K_VALUE])
    if kind not in _OMEGACONF_CLASSES or not isinstance(plain, dict if kind == "DictConfig" else list):
        raise ValueError(f"{kind} holding a {type(plain).__name__}")
    omegaconf = _omegaconf()
    if omegaconf is None:
        warnings.warn(f"{dec.where}: an OmegaConf {kind} comes back as a plain {type(plain).__name__} because "
                      "omegaconf is not installed; pip install omegaconf to get it back as it was saved",
                      CheckpointWarning, stacklevel=2)
        return plain
    try:
        return omegaconf.OmegaConf.create(plain)
    except omegaconf.errors.OmegaConfBaseException as err:
        raise ValueError(f"OmegaConf refuses it: {err}") from None


def _decode_namespace(dec: Decoder, node: dict) -> argparse.Namespace:
    out = argparse.Namespace()
    for key, value in node[TAG_NAMESPACE]:
        if not isinstance(key, str):
            raise ValueError(f"Namespace attribute {key!r} is not a str")
        setattr(out, key, dec.decode(value))
    return out


def _decode_dataclass(dec: Decoder, node: dict) -> Any:
    values = {}
    for name, value in node[_K_FIELDS]:
        if not isinstance(name, str):
            raise ValueError(f"dataclass field {name!r} is not a str")
        values[name] = dec.decode(value)
    cls = lookup_imported(node[TAG_DATACLASS])
    if not _rebuildable(cls, values):
        warnings.warn(f"{dec.where}: dataclass {node[TAG_DATACLASS]} comes back as a dict: that class is not "
                      "imported (or its fields changed). Import its module before loading to get the dataclass",
                      CheckpointWarning, stacklevel=2)
        return values
    obj = object.__new__(cls)  # no __init__/__post_init__: no code of the class runs on load
    for name, value in values.items():
        object.__setattr__(obj, name, value)  # frozen dataclasses too
    return obj


def _rebuildable(cls: Any, values: dict) -> bool:
    return (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__new__ is object.__new__
            and [f.name for f in dataclasses.fields(cls)] == list(values))


def _decode_type(dec: Decoder, node: dict) -> Any:
    name = node[TAG_TYPE]
    if name not in _OMEGACONF_CLASSES:
        raise ValueError(f"type {name!r} is not one lightning-ckpt stores")
    omegaconf = _omegaconf()
    # Without OmegaConf, Lightning reads a str hparams_type as "restore as AttributeDict".
    return getattr(omegaconf, name) if omegaconf is not None else name


DECODERS: dict[str, Callable[[Decoder, dict], Any]] = {
    TAG_OMEGACONF: _decode_omegaconf,
    TAG_NAMESPACE: _decode_namespace,
    TAG_DATACLASS: _decode_dataclass,
    TAG_TYPE: _decode_type,
    TAG_HF_CONFIG: _decode_hf_config,
}
