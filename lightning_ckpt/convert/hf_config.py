"""The ``config.json`` of a Hugging Face export and the weight names that fit it: the config from
``--config`` (a local file or folder; never a download) or from the LightningModule's
hyper-parameters, torch.compile's ``_orig_mod.`` taken out of every name, and the LightningModule's
attribute prefix (``model.``) found by building the config's models on the meta device and comparing
their weight names and shapes with the checkpoint's.

Only ``export --hf`` imports this module, and only it imports ``transformers``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_ckpt.format.configs import is_transformers_config

COMPILED = "_orig_mod"  # torch.compile's OptimizedModule holds the module under this attribute
CONFIG_FILE = "config.json"
_MAPPINGS = re.compile(r"MODEL(_FOR_\w+)?_MAPPING")
_SHOWN = 5


def strip_compiled(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with every ``_orig_mod`` name component removed (``model._orig_mod.wte.weight`` ->
    ``model.wte.weight``), as a module compiled with ``torch.compile`` saved them.

    Raises:
        ValueError: two names become one.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        name = ".".join(part for part in key.split(".") if part != COMPILED)
        if name in out:
            raise ValueError(f"weights {key!r} and another both become {name!r} without torch.compile's "
                             f"'{COMPILED}.'; the checkpoint holds the model twice")
        out[name] = tensor
    return out


def load_config(where: str | os.PathLike) -> Any:
    """The transformers config in a local ``config.json`` file or a folder holding one
    (``save_pretrained``'s output).

    Raises:
        ValueError: ``where`` is not a local file or folder (a model id: export downloads nothing), or
            holds no readable config.
    """
    path = Path(where)
    if not path.exists():
        raise ValueError(f"--config {where}: no such local file or folder; export downloads nothing. Save the "
                         "config locally first (transformers.AutoConfig.from_pretrained(NAME).save_pretrained(DIR)) "
                         f"and pass DIR or DIR/{CONFIG_FILE}")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise ValueError(f"--config {where}: a folder without {CONFIG_FILE}; pass a save_pretrained folder or a "
                         f"{CONFIG_FILE} file")
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--config {where}: not a transformers config ({err})") from None


def config_in_hparams(hparams: Mapping[str, Any], where: str) -> Any | None:
    """The transformers config the LightningModule stored in its hyper-parameters, or None: a
    ``PretrainedConfig`` (or a dict with a ``model_type`` transformers knows) as the hyper-parameters
    themselves or as one of their values.

    Raises:
        ValueError: more than one different config is there.
    """
    try:
        import transformers
    except ImportError:  # then no config can be in them but a pickled one, which export does not read
        return None
    found: dict[str, Any] = {}
    for name, value in [("hyper_parameters", hparams), *((f"hyper_parameters[{k!r}]", v) for k, v in hparams.items())]:
        if is_transformers_config(value):
            found[name] = value
        elif isinstance(value, Mapping) and isinstance(value.get("model_type"), str) \
                and value["model_type"] in transformers.CONFIG_MAPPING:
            plain = {k: v for k, v in value.items() if isinstance(k, str)}
            found[name] = transformers.CONFIG_MAPPING[value["model_type"]].from_dict(plain)
    distinct = {repr(sorted(c.to_dict().items(), key=str)): n for n, c in found.items()}
    if len(distinct) > 1:
        raise ValueError(f"{where}: the hyper-parameters hold {len(distinct)} different transformers configs "
                         f"({', '.join(distinct.values())}); pass the one to export with --config")
    return next(iter(found.values()), None)


@dataclass
class Fit:
    """How the checkpoint's weights fit the config's models."""

    prefix: str
    classes: list[type] = field(default_factory=list)  # the models whose names and shapes all fit


def fit_weights(weights: Mapping[str, torch.Tensor], config: Any, prefix: str | None, where: str) -> Fit:
    """The prefix to strip so that the weights are those of a model built from ``config``: ``prefix``
    when given, else the one prefix (outermost) under which they fit one of the config's models.

    Raises:
        ValueError: no prefix fits (naming the nearest miss), or several do (naming them and
            --strip-prefix).
    """
    shapes = {k: tuple(t.shape) for k, t in weights.items()}
    fits: dict[str, list[type]] = {}
    misses: list[tuple[int, str]] = []  # (how many names are off, what is off)
    for cls, expected, optional in _models(config):
        required = expected.keys() - optional
        anchor = min(required, default=None)
        if anchor is None:
            continue
        tried = [prefix] if prefix is not None else [k[:-len(anchor)] for k in shapes
                                                      if k.endswith(anchor) and k[:-len(anchor)][-1:] in ("", ".")]
        for p in tried:
            mine = {k[len(p):]: s for k, s in shapes.items() if k.startswith(p)}
            extra, missing = mine.keys() - expected.keys(), required - mine.keys()
            wrong = sorted(k for k in mine.keys() & expected.keys() if mine[k] != expected[k])
            if not extra and not missing and not wrong:
                fits.setdefault(p, []).append(cls)
            else:
                misses.append((len(extra) + len(missing) + len(wrong), _miss(cls, p, extra, missing, wrong, mine,
                                                                              expected)))
    outer = [p for p in fits if not any(p != q and p.startswith(q) for q in fits)]
    if len(outer) == 1:
        return Fit(outer[0], fits[outer[0]])
    if outer:
        raise ValueError(f"{where}: the weights fit a {type(config).__name__} model under several prefixes ("
                         f"{', '.join(repr(p) for p in sorted(outer))}); pass the one to export with --strip-prefix")
    hint = "; pass the LightningModule attribute holding the model with --strip-prefix (e.g. 'model.')" \
        if prefix is None else ""
    nearest = min(misses, default=(0, "no model class of transformers takes this config"))[1]
    raise ValueError(f"{where}: the weights do not fit the config's {type(config).__name__} models"
                     f"{' under prefix ' + repr(prefix) if prefix is not None else ' under any prefix'} "
                     f"(nearest: {nearest}); check --config{hint}")


def _miss(cls: type, prefix: str, extra: set, missing: set, wrong: list, mine: dict, expected: dict) -> str:
    parts = [f"{cls.__name__} under {prefix!r}:"]
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(sorted(missing)[:_SHOWN])})")
    if extra:
        parts.append(f"{len(extra)} unexpected ({', '.join(sorted(extra)[:_SHOWN])})")
    parts += [f"{k} is {list(mine[k])} here, {list(expected[k])} in the config's model" for k in wrong[:_SHOWN]]
    return " ".join(parts)


def _models(config: Any) -> list[tuple[type, dict[str, tuple], set[str]]]:
    """Each transformers model class for ``config`` (its ``architectures`` first, then every auto
    mapping's), with its weight shapes and the names it may miss (a weight tied to another name)."""
    import transformers

    classes: list[type] = []
    for name in config.architectures or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            classes.append(cls)
    for name in dir(transformers):
        if _MAPPINGS.fullmatch(name):
            try:
                found = getattr(transformers, name)[type(config)]
            except (KeyError, ValueError, AttributeError, ImportError):
                continue
            classes += list(found) if isinstance(found, (list, tuple)) else [found]
    out = []
    for cls in dict.fromkeys(classes):
        try:
            with torch.device("meta"):
                model = cls(config)
        except Exception:  # noqa: BLE001 - a class this config cannot build is simply not a candidate
            continue
        state = model.state_dict(keep_vars=True)
        seen: set[int] = set()
        tied = set()
        for key, tensor in state.items():
            if id(tensor) in seen:
                tied.add(key)
            seen.add(id(tensor))
        out.append((cls, {k: tuple(t.shape) for k, t in state.items()}, tied))
    return out
