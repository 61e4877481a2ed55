"""Whether a file starts as one ``torch.save`` wrote, from its first bytes: no torch, nothing unpickled.

The engine asks it before ``torch.load`` sees a ``.ckpt``; it needs nothing but the bytes, so it sits in
``format``, below the engine, ``distributed`` and ``convert``, which may all import it.
"""

from __future__ import annotations

import os
import zipfile

# torch.save's legacy (non-zip) format starts with a pickled magic number: PROTO n, a FRAME (protocol 4+),
# then LONG1 of 10 bytes.
_PROTO, _FRAME = b"\x80", b"\x95"
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as a file ``torch.save`` wrote: a zip (torch>=1.6) or the legacy pickle
    with torch's magic number. Anything else is not a checkpoint, whatever ``torch.load`` says of it.

    Raises:
        OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(32)
    start = 11 if head[2:3] == _FRAME else 2
    return (head[:1] == _PROTO and head[start:start + len(_LEGACY_MAGIC)] == _LEGACY_MAGIC) or zipfile.is_zipfile(path)
