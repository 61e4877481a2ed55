"""Save/load of a training state: lightning-ckpt against torch.save/torch.load, side by side.

Also measures what the checksum costs next to a save (xxh3-128, which the manifest uses, against
sha256). Prints times and ratios measured in this run; nothing here is a pass/fail test.

    python benchmarks/bench_save_load.py [--mb 400] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from lightning_ckpt import load_checkpoint, save_checkpoint
from lightning_ckpt.format import encode_state


def make_state(megabytes: int) -> dict:
    n = megabytes * 2**20 // 4 // 3  # weights + two AdamW moments
    layers = 16
    sd = {f"layer{i}.weight": torch.randn(n // layers) for i in range(layers)}
    opt = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
                     for i, t in enumerate(sd.values())},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(layers))}]}
    return {"state_dict": sd, "optimizer_states": [opt], "global_step": 10, "epoch": 0}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_save_synced(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    state = make_state(args.mb)
    blobs = [b.tobytes() for b in encode_state(state).values()]
    size = sum(len(b) for b in blobs)
    try:
        rows = {
            "torch.save + fsync": best_of(lambda: torch_save_synced(state, root / "t.pt"), args.repeat),
            "lightning_ckpt.save_checkpoint": best_of(lambda: save_checkpoint(state, root / "c"), args.repeat),
            "  of which: encode (zero-copy safetensors)": best_of(lambda: encode_state(state), args.repeat),
            "  of which: xxh3_128 of all files": best_of(lambda: [xxhash.xxh3_128_hexdigest(b) for b in blobs], args.repeat),
            "  (alternative: sha256 of all files)": best_of(lambda: [hashlib.sha256(b).hexdigest() for b in blobs], args.repeat),
            "torch.load(weights_only=True)": best_of(lambda: torch.load(root / "t.pt", weights_only=True), args.repeat),
            "lightning_ckpt.load_checkpoint (verifies)": best_of(lambda: load_checkpoint(root / "c"), args.repeat),
        }
    finally:
        shutil.rmtree(root)
    save = rows["lightning_ckpt.save_checkpoint"]
    print(f"state: {size / 2**20:.0f} MiB, best of {args.repeat}, torch {torch.__version__}, {os.cpu_count()} cpus")
    for name, seconds in rows.items():
        print(f"{name:45s} {seconds * 1000:9.1f} ms  {size / 2**20 / seconds:8.0f} MiB/s  {seconds / save:6.2f}x of our save")
    print(f"ratio save ours/torch.save: {save / rows['torch.save + fsync']:.2f}; "
          f"load ours/torch.load: {rows['lightning_ckpt.load_checkpoint (verifies)'] / rows['torch.load(weights_only=True)']:.2f}")


if __name__ == "__main__":
    main()
