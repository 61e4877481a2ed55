"""Rank 0's state on every rank (``distributed.state_broadcast``) on 2 gloo ranks: one rank of a job
(``launch.run_job``), no Lightning. Each scenario builds the same state on every rank from a seed; rank 0
sends it (the others build it only to compare), and each rank's row says what it holds afterwards."""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from launch import rank, serve_in_gloo_group  # noqa: E402

from lightning_ckpt.distributed.state_broadcast import broadcast_state  # noqa: E402
from lightning_ckpt.errors import CorruptCheckpointError  # noqa: E402

One = namedtuple("One", ["x"])  # a named tuple of one field: One([t]) would build One(x=[t]), not One(x=t)
Two = namedtuple("Two", ["a", "b"])

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
    if kind == "odd":  # tensors whose bytes are not all of them: they travel pickled, beside plain ones
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors
            q = torch.quantize_per_tensor(torch.randn(4, generator=g), 0.05 * seed, seed, torch.qint8)
        return {"sparse": torch.randn(3, 4, generator=g).relu().to_sparse(), "meta": torch.empty(2, 3, device="meta"),
                "q": q, "q_again": q, "plain": torch.randn(5, generator=g)}
    if kind == "containers":
        t = torch.randn(2, generator=g)
        counts: defaultdict[str, list] = defaultdict(list, {"a": [t]})
        return {"one": One(t), "two": Two(t * 2, [t + 1]), "dd": counts, "od": OrderedDict(z=t, a=torch.ones(seed)),
                "size": torch.Size([seed, 2])}
    if kind == "unpicklable":  # rank 0's state cannot be pickled: its error, not a rank left waiting
        return {"t": torch.ones(3), "f": defaultdict(lambda: seed)}
    if kind == "tied":
        w = torch.randn(4, 4, generator=g)
        return {"a": w, "b": w, "in_list": [w]}
    raise ValueError(kind)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and type(value) is not dict:
        return {f"{prefix}:{type(value).__name__}": _kind(value), **_leaves(dict(value), prefix)}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        out = {f"{prefix}:{type(value).__name__}": len(value)}
        return {**out, **{k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{prefix}/{i}").items()}}
    if isinstance(value, torch.Tensor) and value.is_meta:
        return {prefix: [str(value.dtype), list(value.shape), "meta"]}
    if isinstance(value, torch.Tensor) and value.is_quantized:
        return {prefix: [str(value.dtype), list(value.shape), _digest(value.int_repr()), value.q_scale(),
                         value.q_zero_point()]}
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        return {prefix: [str(value.dtype), list(value.shape), str(value.layout), _digest(value.to_dense())]}
    if isinstance(value, torch.Tensor):
        return {prefix: [str(value.dtype), list(value.shape), _digest(value)]}
    return {prefix: repr(value)}


def _kind(value: Any) -> str:
    """What else a dict subclass carries: a defaultdict's factory."""
    return repr(getattr(value, "default_factory", None))


def run(kind: str, bucket_bytes: int = 64 * 2**20) -> dict[str, Any]:
    expected = _state(kind) if kind not in ("error", "unpicklable") else None

    def read() -> dict[str, Any]:
        if kind == "error":
            raise CorruptCheckpointError("/ckpt/step=000000004/model.safetensors: 4096 bytes, the manifest says 8192")
        return _state(kind, seed=7 + rank())  # another state on another rank: rank 1 must not read its own

    got = broadcast_state(read, bucket_bytes=bucket_bytes)
    row: dict[str, Any] = {"leaves": _leaves(got), "expected": _leaves(expected)}
    if kind == "tied":
        row["tied"] = got["a"] is got["b"] is got["in_list"][0]
    if kind == "odd":
        row["tied"] = got["q"] is got["q_again"]
    if kind == "containers":
        row["types"] = {k: type(v).__name__ for k, v in got.items()}
        row["tied"] = got["one"].x is got["dd"]["a"][0]
    if kind == "noncontig" and rank() == 1:
        row["contiguous"] = all(t.is_contiguous() for t in got.values())
    return row


if __name__ == "__main__":
    serve_in_gloo_group(run)
