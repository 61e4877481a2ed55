"""W&B and MLflow with no network: W&B in offline mode and MLflow on a local file store, both under a
test's directory; and what an offline W&B run logged, read back from its run file.

W&B's offline run file (``run-<id>.wandb``) is a LevelDB-style log of protobuf ``Record``s: a 7-byte
header (``:W&B``, a magic number, a version), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC32, length, type: 1 a whole record, 2/3/4 its first/middle/last part). wandb 0.31 ships no Python
reader for it, so the few lines below read it; its records are wandb's own public protobuf messages.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_offline(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """W&B offline, every file it writes (runs, staged artifact copies, cache, settings) under ``root``;
    give ``WandbLogger(save_dir=root)`` too, or work in ``root``: with neither, the run goes to ``./wandb``."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(root))
    return root


def stop_wandb() -> None:
    """Finish the run and stop wandb's service process; fails if a process of wandb's is left behind."""
    import wandb

    wandb.finish()
    wandb.teardown()
    left = [cmd for cmd in _children() if "wandb" in cmd]
    assert left == [], f"wandb left processes behind: {left}"


def mlflow_file_store(monkeypatch: pytest.MonkeyPatch, root: Path) -> str:
    """A ``file:`` tracking URI under ``root``; MLflow 3 refuses the file store unless allowed, and its
    telemetry (which would reach the network) is off."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    return "file:" + str(root)


@dataclass
class LoggedArtifact:
    name: str
    type: str
    aliases: list[str]
    metadata: dict
    files: dict[str, bytes]  # name in the artifact -> the bytes W&B staged for upload
    md5: dict[str, str]  # name in the artifact -> the digest W&B recorded (base64 MD5)


def wandb_artifacts(root: Path) -> list[LoggedArtifact]:
    """The artifacts the offline W&B run(s) under ``root`` logged, in order (the run in progress is
    finished, and wandb's service stopped, first: the run file is complete then)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.finish()
    wandb.teardown()  # finish returns before wandb's service wrote the run file; teardown waits for it to exit
    found = []
    for run_file in sorted(glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for data in _records(Path(run_file)):
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "artifact":
                continue
            art = record.artifact
            contents = art.manifest.contents
            found.append(LoggedArtifact(name=art.name, type=art.type, aliases=sorted(art.aliases),
                                        metadata=json.loads(art.metadata or "{}"),
                                        files={c.path: Path(c.local_path).read_bytes() for c in contents},
                                        md5={c.path: c.digest for c in contents}))
    return found


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk


def _children() -> list[str]:
    mine, found = str(os.getpid()), []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if fields[1] == mine:
                found.append(Path(stat).with_name("cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError):
            continue  # gone meanwhile
    return found
