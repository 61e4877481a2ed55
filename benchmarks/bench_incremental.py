"""Incremental checkpoints (``save_checkpoint(..., incremental=True)``) against full saves of the same states.

Not a pass/fail test. Three training setups, each a stack of ``--layers`` square float32 linear layers (with bias)
holding ``--mb`` MiB of parameters in all, trained by real AdamW steps (``torch.optim.AdamW``):

- ``frozen``: the first 90% of the layers frozen (``requires_grad_(False)``), AdamW over the other 10% only;
- ``lora``: every layer frozen, each with rank-``--rank`` adapters (``A``: rank x width, ``B``: width x rank),
  AdamW over the adapters only;
- ``pretrain``: nothing frozen, AdamW over every parameter.

For each setup, ``--repeat`` + 1 rounds of: one training step, then the state as Lightning's checkpoint dict
(``state_dict``, ``optimizer_states``, ``global_step``, ...) saved twice, once full (``incremental=False``) and once
incremental, each into its own directory (in alternating order), each directory pruned to its 2 newest checkpoints
after the save as ``keep_last=2`` would. The first round's saves are not counted (the first incremental save in a
directory is a full one: nothing to link); the medians of the other ``--repeat`` are reported. Then the newest
checkpoint of each directory is loaded with ``load_checkpoint`` (every file verified), once untimed (its tensors
checked equal to the state saved) and ``--repeat`` times, interleaved.

"Bytes written" by a save: the sizes of the files in the new checkpoint whose inode did not exist before the save
(the inodes of every file in the directory are listed before it); a hard-linked file adds nothing. The bytes the
process passed to ``write()`` meanwhile (``/proc/self/io`` ``wchar``) are reported beside it as a cross-check.

The floor of the bytes ratio: a save must at least write the tensors that changed since the last one, the trained
parameters and their AdamW state (90% frozen: 0.1 + 2 x 0.1 = 0.3 of the parameters' bytes, against 1.0 + 0.2 = 1.2
for a full save: 0.25x). It is computed from the state (tensor bytes only) and printed beside each measured ratio.

The mirror: after both saves of a round, each new checkpoint is copied with the mirror's upload
(``tiers/mirror.py: copy_checkpoint``) from its directory to a remote store of its own, which is then pruned to its
2 newest checkpoints with the mirror's remote retention (``prune_remote``, keep_last=2; the store's ``delete``). The
remote is a real S3 server on 127.0.0.1 (moto's ``ThreadedMotoServer`` in a process of its own, reached through
s3fs), or with ``--mirror memory`` fsspec's ``memory://`` (in this process, in memory: only its bytes mean
anything, not its times). "Bytes uploaded" by a copy: the bytes passed to ``FsspecStore._put`` (the upload seam,
counted by a subclass), the manifest and markers included; a shared file an older remote checkpoint holds is copied
by the storage (``store/remote_staging.py: _copy_or_put``) and sends none (counted apart, as "copied by the
storage"). The first round's copies (into an empty prefix) are not counted either. The floor of the uploaded-bytes
ratio is the bytes one's: the tensors that change, against a full save's bytes uploaded. The newest incremental
remote checkpoint is then loaded once with ``load_checkpoint(url)`` and checked equal to the state saved.

Timings are with a warm page cache (dropping it needs root); every save fsyncs its files and directories (the store
does) and is durable when it returns.

    python benchmarks/bench_incremental.py --mb 256 --repeat 5
    python benchmarks/bench_incremental.py --mb 4 --repeat 1       # a quick check that it runs
    python benchmarks/bench_incremental.py --mirror memory          # without moto: the mirror's bytes only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ckpt.format.shared import DEFAULT_SHARE_MIN_BYTES, is_shared  # noqa: E402
from lightning_ckpt.format.state import encode_state  # noqa: E402
from lightning_ckpt.format.manifest import FileEntry  # noqa: E402
from lightning_ckpt.saving.engine import load_checkpoint, save_checkpoint  # noqa: E402
from lightning_ckpt.store.local import LocalStore  # noqa: E402
from lightning_ckpt.store.remote import FsspecStore  # noqa: E402
from lightning_ckpt.tiers.mirror import copy_checkpoint, prune_remote  # noqa: E402

MiB = 2**20
KEEP_LAST = 2
FROZEN_SHARE = 0.9
BATCH = 8
MODES = ("full", "incremental")
SCENARIOS = {
    "frozen": "90% of the parameters frozen, AdamW on the other 10%",
    "lora": "every layer frozen, rank-{rank} LoRA adapters trained by AdamW",
    "pretrain": "nothing frozen, AdamW on every parameter",
}
MIRRORS = {
    "moto": "S3 (moto on 127.0.0.1, a process of its own, through s3fs; upload times over loopback, the server on the "
            "same CPUs)",
    "memory": "fsspec memory:// (in this process, in memory: only the bytes are meaningful, not the upload times)",
}
class Net(torch.nn.Module):
    """``layers`` square linear layers (with bias), each with optional rank-``rank`` adapters (LoRA: ``y = W x + b +
    B A x``, ``B`` starting at zero)."""

    def __init__(self, width: int, layers: int, rank: int = 0) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.lora_a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(rank, width) / width**0.5)
                                             for _ in range(layers if rank else 0))
        self.lora_b = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(width, rank))
                                             for _ in range(layers if rank else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if len(self.lora_a):
                y = y + (x @ self.lora_a[i].T) @ self.lora_b[i].T
            x = torch.tanh(y)
        return x


def build(scenario: str, width: int, layers: int, rank: int) -> tuple[Net, list[torch.nn.Parameter]]:
    """The model and the parameters AdamW trains (the others frozen)."""
    torch.manual_seed(0)
    if scenario == "frozen":
        net = Net(width, layers)
        frozen = round(layers * FROZEN_SHARE)
        for layer in net.layers[:frozen]:
            layer.requires_grad_(False)
        return net, [p for layer in net.layers[frozen:] for p in layer.parameters()]
    if scenario == "lora":
        net = Net(width, layers, rank)
        net.layers.requires_grad_(False)
        return net, [*net.lora_a, *net.lora_b]
    net = Net(width, layers)
    return net, list(net.parameters())


class Training:
    """A model, its AdamW over the trained parameters, and a step counter."""

    def __init__(self, scenario: str, width: int, layers: int, rank: int) -> None:
        self.net, self.trained = build(scenario, width, layers, rank)
        trained = {id(p) for p in self.trained}
        self.trained_names = {name for name, p in self.net.named_parameters() if id(p) in trained}
        self.optimizer = torch.optim.AdamW(self.trained, lr=1e-3)
        self.width, self.step = width, 0

    def train_step(self) -> None:
        x = torch.randn(BATCH, self.width)
        loss = self.net(x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def checkpoint(self) -> dict:
        """Lightning's checkpoint dict of the current state (the tensors are the live ones, not copies)."""
        return {"epoch": 0, "global_step": self.step, "pytorch-lightning_version": "2.6.6",
                "state_dict": self.net.state_dict(), "loops": {}, "callbacks": {},
                "optimizer_states": [self.optimizer.state_dict()], "lr_schedulers": []}

    def changing_bytes(self) -> tuple[int, int]:
        """Bytes of the tensors a training step changes (trained parameters, every optimizer state tensor), and of
        every tensor of the checkpoint dict."""
        trained = {id(p) for p in self.trained}
        moments = sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        params = list(self.net.parameters())
        changing = sum(p.nbytes for p in params if id(p) in trained) + moments
        return changing, sum(p.nbytes for p in params) + moments

    def adapter_bytes(self) -> int:
        """Bytes of the trained parameters and their optimizer state (the LoRA goal's yardstick)."""
        moments = sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        return sum(p.nbytes for p in self.trained) + moments


class CountingStore(FsspecStore):
    """The remote store, counting the bytes its uploads send (``_put``: every file a copy uploads, the manifest and
    markers included) and the bytes of the shared files the storage copied instead (``_copy_or_put`` sending none)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        super().__init__(url, storage_options)
        self.sent = self.copied = 0

    def _put(self, path: str, chunks: Any) -> FileEntry:
        entry = super()._put(path, chunks)
        self.sent += entry.size  # the bytes written to the storage's file object: what crossed to the server
        return entry

    def _copy_or_put(self, staged: str, file: str, blob: Any, source: str | None) -> FileEntry:
        sent = self.sent
        entry = super()._copy_or_put(staged, file, blob, source)
        if self.sent == sent:  # a server-side copy, not an upload
            self.copied += entry.size
        return entry


class Remote:
    """Where the mirrors go: a moto S3 server in a process of its own (``moto``), or fsspec's ``memory://``."""

    def __init__(self, kind: str) -> None:
        self.kind, self.options, self._server = kind, None, None
        if kind == "memory":
            self.base = f"memory://bench-incremental-{uuid.uuid4().hex[:8]}"
            return
        import fsspec

        from moto_server import MotoServer  # benchmarks/, the script's directory

        self._server = MotoServer()  # RuntimeError without moto: use --mirror memory then
        try:
            self.options = self._server.options
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            fsspec.filesystem("s3", skip_instance_cache=True, **self.options).mkdir(bucket)
        except BaseException:
            self.close()
            raise
        self.base = f"s3://{bucket}"

    def store(self, prefix: str) -> CountingStore:
        return CountingStore(f"{self.base}/{prefix}", self.options)

    def remove(self, prefix: str) -> None:
        """Remove what ``prefix`` holds (a setup's mirrors), so that the server's memory does not grow."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{self.base}/{prefix}", **(self.options or {}))
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _inodes(root: Path) -> set[tuple[int, int]]:
    found = set()
    for folder, _, files in os.walk(root):
        for file in files:
            info = os.lstat(os.path.join(folder, file))
            found.add((info.st_dev, info.st_ino))
    return found


def new_bytes(checkpoint: Path, before: set[tuple[int, int]]) -> tuple[int, int, list[str]]:
    """Bytes of the files of ``checkpoint`` whose inode is not in ``before`` (written by the save), bytes of those
    that are (hard links), and the names of the shared files written."""
    written = linked = 0
    written_shared = []
    for folder, _, files in os.walk(checkpoint):
        for file in files:
            path = os.path.join(folder, file)
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) in before:
                linked += info.st_size
            else:
                written += info.st_size
                rel = os.path.relpath(path, checkpoint)
                if is_shared(rel):
                    written_shared.append(rel)
    return written, linked, written_shared


def _wchar() -> int | None:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("wchar:")), None)


def prune(root: Path) -> None:
    """Delete all but the ``KEEP_LAST`` newest checkpoints (names sort by step), as ``keep_last=2`` would."""
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    for name in names[:-KEEP_LAST]:
        shutil.rmtree(root / name)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``fn`` took, with the garbage collector run before and kept off during the call; its result."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def mirror(local: LocalStore, remote: CountingStore, name: str) -> dict:
    """Copy checkpoint ``name`` as the mirror does, then prune the remote as ``keep_last=2`` would; what it sent."""
    sent, copied = remote.sent, remote.copied
    seconds, manifest = timed(lambda: copy_checkpoint(local, remote, name))
    prune_remote(remote, manifest.run_id, KEEP_LAST)
    return {"upload_s": seconds, "bytes_uploaded": remote.sent - sent, "bytes_copied_remotely": remote.copied - copied}


def run_scenario(scenario: str, args: argparse.Namespace, width: int, root: Path, remote: Remote) -> dict:
    training = Training(scenario, width, args.layers, args.rank)
    dirs = {mode: root / scenario / mode for mode in MODES}
    for d in dirs.values():
        d.mkdir(parents=True)
    sources = {mode: LocalStore(dirs[mode]) for mode in MODES}
    remotes = {mode: remote.store(f"{scenario}/{mode}") for mode in MODES}
    saves: dict[str, list[dict]] = {mode: [] for mode in MODES}
    first: dict[str, dict] = {}
    last_written_shared: list[str] = []
    for i in range(args.repeat + 1):
        snapshot = {k: v.clone() for k, v in training.net.state_dict().items()} if i == 1 else None
        training.train_step()
        state = training.checkpoint()
        if snapshot is not None:  # a sanity check, once: the step changed the trained tensors and only those
            changed = {k for k, v in snapshot.items() if not torch.equal(state["state_dict"][k], v)}
            assert changed == training.trained_names, (sorted(changed ^ training.trained_names)[:5], scenario)
            del snapshot
        order = MODES if i % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            path = dirs[mode] / f"step={training.step:06d}"
            before, wchar = _inodes(dirs[mode]), _wchar()
            seconds, _ = timed(lambda: save_checkpoint(state, path, incremental=mode == "incremental"))
            wchar = None if wchar is None else _wchar() - wchar
            written, linked, written_shared = new_bytes(path, before)
            row = {"save_s": seconds, "bytes_written": written, "bytes_linked": linked, "write_syscall_bytes": wchar}
            if i == 0:
                first[mode] = row
            else:
                saves[mode].append(row)
                if mode == "incremental":
                    last_written_shared = written_shared
            prune(dirs[mode])
        del state
        for mode in order:  # the mirror, once both saves are done (they stay back to back, as before)
            row = first[mode] if i == 0 else saves[mode][-1]
            row.update(mirror(sources[mode], remotes[mode], f"step={training.step:06d}"))
            names = remotes[mode].names()
            assert len(names) == min(i + 1, KEEP_LAST) and names[-1] == f"step={training.step:06d}", (mode, names)

    # Loads of each directory's newest checkpoint: one untimed (checked against the state), then interleaved.
    state = training.checkpoint()
    newest = {mode: max(p for p in dirs[mode].iterdir() if not p.name.startswith(".")) for mode in MODES}
    loads: dict[str, list[float]] = {mode: [] for mode in MODES}
    mirrored = remotes["incremental"]  # and the newest incremental mirror (unchanged files copied by the storage)
    checked = {**{mode: (newest[mode], None) for mode in MODES},
               "incremental mirror": (mirrored.location(mirrored.names()[-1]), remote.options)}
    for what, (where, options) in checked.items():
        loaded = load_checkpoint(where, storage_options=options)
        assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state["state_dict"].items()), what
        saved_opt, loaded_opt = state["optimizer_states"][0]["state"], loaded["optimizer_states"][0]["state"]
        assert saved_opt.keys() == loaded_opt.keys(), what
        assert all(torch.equal(loaded_opt[p][k], v) for p, s in saved_opt.items() for k, v in s.items()), what
        del loaded
    remote.remove(scenario)
    for i in range(args.repeat):
        for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
            seconds, loaded = timed(lambda: load_checkpoint(newest[mode]))
            del loaded
            loads[mode].append(seconds)

    # Where an incremental save's time goes, on the last state: the pass that hashes every large tensor to name
    # it (encode_state; the files it then writes are not hashed again).
    encode_s, files = timed(lambda: encode_state(state, share_min_bytes=DEFAULT_SHARE_MIN_BYTES))
    del files
    changing, total = training.changing_bytes()
    result = {"description": SCENARIOS[scenario].format(rank=args.rank), "state_tensor_bytes": total,
              "changing_tensor_bytes": changing, "floor_vs_full": changing / total,
              "adapter_bytes": training.adapter_bytes() if scenario == "lora" else None,
              "trained_params": sum(p.numel() for p in training.trained),
              "params": sum(p.numel() for p in training.net.parameters()),
              "first_save": first, "saves": saves, "load_s": loads,
              "diagnostics": {"encode_hash_s": encode_s, "blobs_written_per_save": len(last_written_shared)}}
    for mode in MODES:
        result[mode] = {"save_s": statistics.median(r["save_s"] for r in saves[mode]),
                        "bytes_written": statistics.median(r["bytes_written"] for r in saves[mode]),
                        "bytes_linked": statistics.median(r["bytes_linked"] for r in saves[mode]),
                        "write_syscall_bytes": (statistics.median(r["write_syscall_bytes"] for r in saves[mode])
                                                if saves[mode][0]["write_syscall_bytes"] is not None else None),
                        "load_s": statistics.median(loads[mode]),
                        **{k: statistics.median(r[k] for r in saves[mode])
                           for k in ("bytes_uploaded", "bytes_copied_remotely", "upload_s")}}
    del state, training
    gc.collect()
    shutil.rmtree(root / scenario, ignore_errors=True)
    return result


def goals(results: dict, rank: int) -> list[dict]:
    """Each goal of the issue: the measured ratio, the floor where one is known, the verdict."""
    rows = []

    def add(goal: str, value: float | None, bound: float, floor: float | None = None) -> None:
        if value is None:
            verdict = "not measured"
        elif value <= bound:
            verdict = "met"
        elif floor is not None and floor > bound:
            verdict = f"missed (the floor, {floor:.3f}x, is above the goal)"
        else:
            verdict = "missed"
        rows.append({"goal": goal, "measured": value, "bound": bound, "floor": floor, "verdict": verdict})

    def ratio(scenario: str, key: str) -> float | None:
        r = results.get(scenario)
        return r["incremental"][key] / r["full"][key] if r else None

    if "frozen" in results:
        floor = results["frozen"]["changing_tensor_bytes"] / results["frozen"]["full"]["bytes_written"]
        add("frozen 90%: bytes written per save <= 0.15x a full save", ratio("frozen", "bytes_written"), 0.15, floor)
        add("frozen 90%: save time <= 0.3x a full save", ratio("frozen", "save_s"), 0.3)
        add("frozen 90%: load_checkpoint time <= 1.05x a full checkpoint's", ratio("frozen", "load_s"), 1.05)
    if "lora" in results:
        r = results["lora"]
        add(f"LoRA rank {rank}: bytes written per save <= 1.2x the adapters + their AdamW state",
            r["incremental"]["bytes_written"] / r["adapter_bytes"], 1.2, 1.0)
    if "pretrain" in results:
        add("nothing frozen: save time <= 1.05x a full save", ratio("pretrain", "save_s"), 1.05)
    if "frozen" in results:
        floor = results["frozen"]["changing_tensor_bytes"] / results["frozen"]["full"]["bytes_uploaded"]
        add("frozen 90%: Mirror bytes uploaded per save <= 0.15x a full save", ratio("frozen", "bytes_uploaded"),
            0.15, floor)
    return rows


def machine(root: Path) -> dict:
    fs = "?"
    try:  # the filesystem of the deepest mount point holding root
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        best = max((m for m in mounts if str(root).startswith(m[1].rstrip("/") + "/") or str(root) == m[1]),
                   key=lambda m: len(m[1]))
        fs = f"{best[2]} ({best[0]} on {best[1]})"
    except (OSError, ValueError):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "filesystem": fs}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s >= 0.1 else f"{s * 1000:.1f} ms"


def _mib(n: float | None) -> str:
    return "?" if n is None else f"{n / MiB:.2f} MiB"


def table(report: dict) -> str:
    cfg, results = report["config"], report["scenarios"]
    lines = [f"Incremental checkpoints: {cfg['params_mib']:.1f} MiB of float32 parameters ({cfg['layers']} layers of "
             f"{cfg['width']}x{cfg['width']} + bias), AdamW; median of {cfg['repeat']} saves after a first one per "
             f"directory, keep_last={KEEP_LAST}; {report['machine']['cpus']} CPUs, "
             f"{report['machine']['filesystem']}; load average {report['loadavg_start']} at the start, "
             f"{report['loadavg_end']} at the end.",
             "Timings are with a warm page cache (it cannot be dropped without root); every save fsyncs (the store "
             "does). Bytes written: files of the new checkpoint with a new inode (hard links count 0).", "",
             "| setup | save | median save | bytes written/save | write() bytes/save | linked/save | load_checkpoint |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for scenario, r in results.items():
        for mode in MODES:
            m = r[mode]
            lines.append(f"| {scenario}: {r['description']} | {mode} | {_ms(m['save_s'])} | {_mib(m['bytes_written'])} "
                         f"| {_mib(m['write_syscall_bytes'])} | {_mib(m['bytes_linked'])} | {_ms(m['load_s'])} |")
    lines += ["", "| setup | bytes written/save, incremental vs full | floor (tensors that change / full save) "
              "| save time, incremental vs full | load_checkpoint, incremental vs full |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for scenario, r in results.items():
        inc, full = r["incremental"], r["full"]
        lines.append(f"| {scenario} | {inc['bytes_written'] / full['bytes_written']:.3f}x | "
                     f"{r['changing_tensor_bytes'] / full['bytes_written']:.3f}x | "
                     f"{inc['save_s'] / full['save_s']:.3f}x | {inc['load_s'] / full['load_s']:.3f}x |")
    lines += ["", f"Mirror: each new checkpoint copied with copy_checkpoint to {MIRRORS[cfg['mirror']]}, remote "
              f"keep_last={KEEP_LAST} (prune_remote); median of {cfg['repeat']} copies after a first one per prefix. "
              "Bytes uploaded: passed to FsspecStore._put (files, manifest, markers); copied by the storage: shared "
              "files an older remote checkpoint held (server-side copy: none of their bytes sent).", "",
              "| setup | save | bytes uploaded/save | copied by the storage/save | upload (copy_checkpoint) "
              "| uploaded, incremental vs full | floor |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for scenario, r in results.items():
        for mode in MODES:
            m = r[mode]
            vs = (f"{m['bytes_uploaded'] / r['full']['bytes_uploaded']:.3f}x | "
                  f"{r['changing_tensor_bytes'] / r['full']['bytes_uploaded']:.3f}x" if mode == "incremental" else
                  "— | —")
            lines.append(f"| {scenario} | {mode} | {_mib(m['bytes_uploaded'])} | {_mib(m['bytes_copied_remotely'])} "
                         f"| {_ms(m['upload_s'])} | {vs} |")
    lines += ["", "Floor: the bytes of the tensors that change between saves (trained parameters, AdamW state), against "
              "the goal's yardstick (a full save's bytes written, or uploaded for the Mirror; for LoRA, the adapters "
              "and their AdamW state).", "",
              "| goal | measured | floor | verdict |", "| --- | ---: | ---: | --- |"]
    for g in report["goals"]:
        measured = "—" if g["measured"] is None else f"{g['measured']:.3f}x"
        floor = "—" if g["floor"] is None else f"{g['floor']:.3f}x"
        lines.append(f"| {g['goal']} | {measured} | {floor} | {g['verdict']} |")
    lines += ["", "Where an incremental save's time goes (the saves: the medians above; the hash: a single run on "
              "each setup's last state):", "",
              "| setup | full save | incremental save | hash of every tensor >= 64 KiB to name it (encode_state) "
              "| shared files written/save | first save: full, incremental |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for scenario, r in results.items():
        d = r["diagnostics"]
        lines.append(f"| {scenario} | {_ms(r['full']['save_s'])} | {_ms(r['incremental']['save_s'])} | "
                     f"{_ms(d['encode_hash_s'])} | {d['blobs_written_per_save']} | "
                     f"{_ms(r['first_save']['full']['save_s'])}, "
                     f"{_ms(r['first_save']['incremental']['save_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=256, help="MiB of parameters in all (the AdamW state comes on top)")
    parser.add_argument("--layers", type=int, default=40, help="linear layers (a multiple of 10: 90%% frozen exactly)")
    parser.add_argument("--rank", type=int, default=8, help="the LoRA adapters' rank")
    parser.add_argument("--repeat", type=int, default=5,
                        help="saves counted per setup and mode (the median is reported)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--dir", default=None,
                        help="where the checkpoints go (default: a temp dir); its disk is measured")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--mirror", choices=list(MIRRORS), default="moto",
                        help="the mirror's remote: S3 (moto on 127.0.0.1) or fsspec's memory:// (bytes only)")
    parser.add_argument("--json", help="also write the report (every save's figures) to this file")
    parser.add_argument("--append", metavar="FILE",
                        help="append the table as a section of FILE (make bench: RESULTS.md)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.layers < 10 or args.rank < 1:
        parser.error(f"--repeat {args.repeat} --layers {args.layers} --rank {args.rank}: need repeat >= 1, "
                     "layers >= 10, rank >= 1")
    width = round((args.mb * MiB / 4 / args.layers) ** 0.5)
    if width * width * 4 < DEFAULT_SHARE_MIN_BYTES:
        parser.error(f"--mb {args.mb} --layers {args.layers}: each layer's weight would be {width * width * 4} bytes, "
                     f"under the {DEFAULT_SHARE_MIN_BYTES} bytes an incremental save shares; raise --mb")
    if args.threads:
        torch.set_num_threads(args.threads)
    began, loadavg_start = time.perf_counter(), _loadavg()
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its first use imports torch._dynamo: not in a scenario
    gc.collect()
    gc.freeze()  # what was imported: the collections before each timed call (timed) then skip it
    root = Path(tempfile.mkdtemp(prefix=".bench-incremental-", dir=args.dir))
    results = {}
    try:
        remote = Remote(args.mirror)
        try:
            for scenario in args.scenarios:
                print(f"... {scenario}", file=sys.stderr, flush=True)
                results[scenario] = run_scenario(scenario, args, width, root, remote)
        finally:
            remote.close()
        info = machine(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = args.layers * (width * width + width)  # the layers' (LoRA adds its adapters)
    report = {"benchmark": "bench_incremental",
              "config": {"mb": args.mb, "layers": args.layers, "width": width, "rank": args.rank,
                         "repeat": args.repeat, "keep_last": KEEP_LAST, "share_min_bytes": DEFAULT_SHARE_MIN_BYTES,
                         "mirror": args.mirror,
                         "params_mib": params * 4 / MiB, "params": params,
                         "page_cache": "warm (not dropped: needs root)"},
              "machine": info, "loadavg_start": loadavg_start, "loadavg_end": _loadavg(),
              "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "took_s": time.perf_counter() - began,
              "scenarios": results, "goals": goals(results, args.rank)}
    text = table(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.append:
        command = " ".join(["python benchmarks/bench_incremental.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.append, "a") as f:
            f.write(f"\n## Incremental checkpoints\n\nWritten by `{command}` on {report['utc']}.\n\n{text}")
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
