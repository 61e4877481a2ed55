"""A checkpoint's weights as one ``.safetensors`` file <-> its bytes (no I/O here).

What ``trainer.save_checkpoint("model.safetensors")`` writes: the model's weights under their
``state_dict`` keys (``safetensors.torch.load_file`` gives what ``model.load_state_dict`` takes, and
transformers reads it: ``{"format": "pt"}``), and in the file's metadata the checkpoint's other
entries (hyper-parameters, epoch, step, loops, versions) as ``state.json`` writes them, their few
tensors (a numpy hyper-parameter, RNG state) as a base64 ``state.safetensors``, and a checksum of the
weights' bytes. Like Lightning's ``weights_only=True``, the optimizer, scheduler and callback states
are left out: the file loads for inference or fine-tuning, not to resume training.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_ckpt.errors import CorruptCheckpointError, UnsupportedTypeError
from lightning_ckpt.format.blob import METADATA_KEY, Blob, Buffer, safetensors_blob
from lightning_ckpt.format.manifest import digest, new_hasher
from lightning_ckpt.format.safetensors_view import as_uint8, load_tensors
from lightning_ckpt.format.state import EXTRA_TENSORS_FILE, STATE_FILE, check_encodable, decode_state, encode_state

SINGLE_FILE_SUFFIX = ".safetensors"
K_STATE_DICT = "state_dict"
META_FORMAT = {"format": "pt"}  # what transformers checks in a safetensors file's metadata
META_STATE = "lightning_ckpt.state"  # the state.json of the entries kept besides the weights
META_EXTRA = "lightning_ckpt.tensors"  # base64 of the state.safetensors of the entries kept
META_DIGEST = "lightning_ckpt.xxh3_128"  # of the bytes after the header
MAX_EXTRA_BYTES = 32 * 2**20  # the metadata lives in the header, which safetensors bounds to 100 MB
# Left out as Lightning's weights_only=True leaves them out.
TRAINING_ONLY = ("optimizer_states", "lr_schedulers", "callbacks")


def is_single_file_name(name: str) -> bool:
    """Whether a path named so is a single-file checkpoint (``*.safetensors``)."""
    return name.endswith(SINGLE_FILE_SUFFIX)


def encode_single_file(state: Mapping[str, Any], leave_out: Iterable[str] = TRAINING_ONLY) -> tuple[Blob, list[str]]:
    """The bytes of the single-file checkpoint of ``state`` (a Lightning checkpoint, or a plain
    state_dict when it has no ``state_dict`` entry), without its top-level entries ``leave_out``.

    Returns:
        The file's bytes (pointing into the tensors' memory: write them before the tensors change), and
        the top-level entries left out, sorted.

    Raises:
        UnsupportedTypeError: a weight cannot be stored (the message names its key).
    """
    if not isinstance(state.get(K_STATE_DICT), Mapping):
        state = {K_STATE_DICT: state}
    weights = state[K_STATE_DICT]
    check_encodable({K_STATE_DICT: dict(weights)})
    tensors = {str(k): v.detach().to("cpu").contiguous() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    leave_out = frozenset(leave_out)
    kept = {k: v for k, v in state.items() if k != K_STATE_DICT and k not in leave_out}
    left_out = [str(k) for k in state if k in leave_out]
    left_out += [f"{K_STATE_DICT}.{k}" for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    files = encode_state(kept)
    metadata = {**META_FORMAT, META_STATE: files[STATE_FILE].tobytes().decode()}
    if EXTRA_TENSORS_FILE in files:
        extra = files[EXTRA_TENSORS_FILE].tobytes()
        if len(extra) > MAX_EXTRA_BYTES:
            raise UnsupportedTypeError(
                f"the checkpoint's entries besides the weights hold {len(extra)} bytes of tensors, more than a "
                f".safetensors file's header takes ({MAX_EXTRA_BYTES}); save to a checkpoint directory name instead")
        metadata[META_EXTRA] = base64.b64encode(extra).decode()
    body = safetensors_blob(tensors, {}).chunks[2:]
    hasher = new_hasher()
    for chunk in body:
        hasher.update(chunk)
    blob = safetensors_blob(tensors, {**metadata, META_DIGEST: hasher.hexdigest()})
    return blob, sorted(left_out)


def decode_single_file(data: Buffer, *, where: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """The checkpoint in a single ``.safetensors`` file: ours (weights and the entries kept), or any
    other safetensors file as ``{"state_dict": its tensors}``.

    Raises:
        CorruptCheckpointError: not valid safetensors, or our checksum does not match its bytes.
    """
    buf = as_uint8(data)
    tensors = load_tensors(buf, where)
    (length,) = struct.unpack("<Q", buf[:8].numpy().tobytes())  # load_tensors checked the header
    metadata = json.loads(buf[8:8 + length].numpy().tobytes()).get(METADATA_KEY) or {}
    expected = metadata.get(META_DIGEST)
    if expected is not None and digest(memoryview(buf[8 + length:].numpy())) != expected:
        raise CorruptCheckpointError(f"{where}: the tensor bytes do not match the checksum in the file's metadata "
                                     "(the file was changed or damaged after it was written)")
    state = decode_metadata(metadata, where=where, device=device)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {k: t.to(device) for k, t in tensors.items()}
    state[K_STATE_DICT] = tensors
    return state


def decode_metadata(metadata: Mapping[str, str], *, where: str, device: torch.device | str | None = None
                    ) -> dict[str, Any]:
    """The entries kept besides the weights, from a single file's metadata (empty for a file not ours).

    Raises:
        CorruptCheckpointError: the entries cannot be decoded.
    """
    if META_STATE not in metadata:
        return {}
    files: dict[str, Buffer] = {STATE_FILE: metadata[META_STATE].encode()}
    if META_EXTRA in metadata:
        try:
            files[EXTRA_TENSORS_FILE] = bytearray(base64.b64decode(metadata[META_EXTRA], validate=True))
        except ValueError as err:
            raise CorruptCheckpointError(f"{where}: metadata {META_EXTRA!r} is not base64 ({err})") from None
    return decode_state(files, where=where, device=device)
