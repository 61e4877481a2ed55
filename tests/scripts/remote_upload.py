"""Save one checkpoint to a URL and die (os._exit(9)) once its data files are uploaded, before its
manifest: what a node lost mid-upload leaves behind. Usage: remote_upload.py '{"path", "options", "step"}'."""

from __future__ import annotations

import json
import os
import sys

import torch

from lightning_ckpt import save_checkpoint
from lightning_ckpt.format.manifest import MANIFEST_FILE
from lightning_ckpt.store.remote import FsspecStore

_upload = FsspecStore._put


def _put_then_die_at_the_manifest(self: FsspecStore, path: str, chunks):
    if path.endswith(f"/{MANIFEST_FILE}"):
        os._exit(9)
    return _upload(self, path, chunks)


if __name__ == "__main__":
    opts = json.loads(sys.argv[1])
    FsspecStore._put = _put_then_die_at_the_manifest  # the seam, in this child process only
    step = opts["step"]
    save_checkpoint({"global_step": step, "w": torch.arange(6, dtype=torch.float32) * step, "note": f"step {step}"},
                    opts["path"], storage_options=opts["options"])
    sys.exit(0)  # not reached
