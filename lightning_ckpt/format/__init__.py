"""State <-> bytes: the safetensors + JSON checkpoint format and its manifest. No I/O."""

from lightning_ckpt.format.blob import Blob
from lightning_ckpt.format.manifest import MANIFEST_FILE, FileEntry, Manifest, digest
from lightning_ckpt.format.state import (
    EXTRA_TENSORS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    check_encodable,
    decode_state,
    device_from_map_location,
    encode_state,
)

__all__ = [
    "Blob", "EXTRA_TENSORS_FILE", "MANIFEST_FILE", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE", "FileEntry", "Manifest",
    "check_encodable", "decode_state", "device_from_map_location", "digest", "encode_state",
]
