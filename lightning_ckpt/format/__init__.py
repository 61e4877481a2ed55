"""State <-> bytes: the safetensors + JSON checkpoint format and its manifest. No I/O.

It imports only ``errors``, torch, numpy and safetensors: never store/, a
filesystem call or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry, Manifest, digest

# The state codec imports torch; the manifest does not. Reading manifests (list, verify, the CLI)
# stays free of torch until a tensor is actually needed.
_LAZY = {
    "Blob": "lightning_ckpt.format.blob",
    **{name: "lightning_ckpt.format.state" for name in (
        "EXTRA_TENSORS_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE", "check_encodable", "decode_state",
        "device_from_map_location", "encode_state")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_ckpt.format' has no attribute {name!r}")


__all__ = [
    "Blob", "EXTRA_TENSORS_FILE", "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE", "FileEntry", "Manifest",
    "check_encodable", "decode_state", "device_from_map_location", "digest", "encode_state",
]
