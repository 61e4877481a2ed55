"""What a manifest records about where a checkpoint came from: the libraries that wrote it, its step,
epoch, lineage and facts. Shared by the single-file save (saving/) and the sharded save (distributed/).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import torch

_VERSIONED_PACKAGES = ("lightning-ckpt", "torch", "safetensors", "lightning", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped a checkpoint, recorded in its manifest."""
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def manifest_fields(state: Mapping[str, Any], run_id: str | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a manifest records about the state it commits: its step and epoch, lineage and facts."""
    return {"step": _int_or_none(state.get("global_step")), "epoch": _int_or_none(state.get("epoch")),
            "run_id": run_id, "meta": dict(meta or {})}


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
