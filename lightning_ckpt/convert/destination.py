"""Where a conversion writes: the destination's name chooses the format, and nothing the user did not
ask to replace is ever replaced (docs/RELIABILITY.md §12)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_ckpt.format.manifest import MANIFEST_FILE

CKPT, SAFETENSORS, CHECKPOINT = ".ckpt", ".safetensors", "checkpoint"
# File names that would otherwise become a checkpoint *directory*: surely a mistake.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".zip", ".json")


def output_kind(dst: str | os.PathLike) -> str:
    """What a conversion to ``dst`` writes, chosen by its name: a Lightning ``.ckpt`` file, one
    ``.safetensors`` file, or (any other name) a lightning-ckpt checkpoint directory.

    Raises:
        ValueError: a name that looks like another kind of file (``.pt``, ``.bin``, ...).
    """
    name = os.fspath(dst).rstrip("/\\")
    for kind in (CKPT, SAFETENSORS):
        if name.endswith(kind):
            return kind
    if name.endswith(_FILE_SUFFIXES):
        raise ValueError(f"{dst}: convert writes a .ckpt file, a .safetensors file or a lightning-ckpt checkpoint "
                         f"directory (any other name), not a {Path(name).suffix} file; pass a DST ending .ckpt or "
                         ".safetensors, or a directory name")
    return CHECKPOINT


def check_destination(dst: str | os.PathLike, kind: str, *, force: bool) -> None:
    """Refuse to write over anything at ``dst`` unless ``force``, and even then over nothing but a file
    (for a file output) or one of our checkpoints (for a checkpoint output): never a user's folder.

    A checkpoint output named ``x`` also lands on an existing ``x.ckpt`` (and ``x.ckpt`` on ``x``),
    as every reader of our checkpoints finds either name, so that one is checked too.

    Raises:
        FileExistsError: something is there and may not be replaced; the message names ``--force``.
    """
    there = _occupied(Path(dst), kind)
    if there is None:
        return
    if not force:
        alias = f" (readers find checkpoint {Path(dst).name} under that name too)" if there != Path(dst) else ""
        raise FileExistsError(f"{there}: already exists{alias}; pass a new DST, or --force to replace it "
                              "(a file, or a lightning-ckpt checkpoint; never another folder)")
    if kind == CHECKPOINT and not is_our_checkpoint(there):
        raise FileExistsError(f"{there}: exists and is not a lightning-ckpt checkpoint (no {MANIFEST_FILE}), so "
                              "--force does not replace it; pass another DST, or remove it yourself")
    if kind != CHECKPOINT and not there.is_file():
        raise FileExistsError(f"{there}: exists and is not a file, so --force does not replace it with a {kind} "
                              "file; pass another DST, or remove it yourself")


def is_our_checkpoint(path: Path) -> bool:
    """A real directory (not a link) holding our manifest."""
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST_FILE).is_file()


def _occupied(dst: Path, kind: str) -> Path | None:
    if os.path.lexists(dst):
        return dst
    if kind == CHECKPOINT:  # the store's other spelling of the same checkpoint name (see store.locate)
        other = dst.with_name(dst.name.removesuffix(CKPT) if dst.name.endswith(CKPT) else dst.name + CKPT)
        if os.path.lexists(other):
            return other
    return None
