"""Rank 0's state on every rank (``distributed.state_broadcast``) on 2 gloo ranks: one rank of a job
(``launch.run_job``), no Lightning. Each scenario builds the same state on every rank from a seed; rank 0
sends it (the others build it only to compare), and each rank's row says what it holds afterwards."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from launch import rank, serve, world_size  # noqa: E402

from lightning_ckpt.distributed.state_broadcast import broadcast_state  # noqa: E402
from lightning_ckpt.errors import CorruptCheckpointError  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn)


def _state(kind: str, seed: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    if kind == "dtypes":
        base = torch.randn(3, 5, generator=g) * 100
        return {"t": {str(d): base.to(d) for d in DTYPES}, "scalar": torch.tensor(3.5), "n": 3, "s": "x",
                "nested": [1, (2.5, None, {"k": torch.arange(4) + seed}), True]}
    if kind == "empty":
        return {"a": torch.empty(0), "b": torch.empty(3, 0, 2, dtype=torch.int64), "c": torch.ones(2) * seed, "d": {}}
    if kind == "noncontig":
        big = torch.randn(6, 8, generator=g)
        return {"t": big.t(), "strided": big[::2, 1::3], "expanded": torch.arange(float(seed)).expand(4, seed)}
    if kind == "big":  # 40 000 bytes and more over 4 096-byte buckets: tensors span several, and share them
        return {"w": torch.randn(10_000, generator=g), "x": torch.randn(7, generator=g),
                "y": torch.randint(0, 255, (5_000,), generator=g, dtype=torch.uint8)}
    if kind == "tied":
        w = torch.randn(4, 4, generator=g)
        return {"a": w, "b": w, "in_list": [w]}
    raise ValueError(kind)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        out = {f"{prefix}:{type(value).__name__}": len(value)}
        return {**out, **{k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{prefix}/{i}").items()}}
    if isinstance(value, torch.Tensor):
        return {prefix: [str(value.dtype), list(value.shape), _digest(value)]}
    return {prefix: repr(value)}


def run(kind: str, bucket_bytes: int = 64 * 2**20) -> dict[str, Any]:
    expected = _state(kind) if kind != "error" else None

    def read() -> dict[str, Any]:
        if kind == "error":
            raise CorruptCheckpointError("/ckpt/step=000000004/model.safetensors: 4096 bytes, the manifest says 8192")
        return _state(kind, seed=7 + rank())  # another state on another rank: rank 1 must not read its own

    got = broadcast_state(read, bucket_bytes=bucket_bytes)
    row: dict[str, Any] = {"leaves": _leaves(got), "expected": _leaves(expected)}
    if kind == "tied":
        row["tied"] = got["a"] is got["b"] is got["in_list"][0]
    if kind == "noncontig" and rank() == 1:
        row["contiguous"] = all(t.is_contiguous() for t in got.values())
    return row


if __name__ == "__main__":
    dist.init_process_group("gloo", rank=rank(), world_size=world_size())
    try:
        serve(run)
    finally:
        dist.destroy_process_group()
