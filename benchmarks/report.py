"""The benchmark's table, its goals (the ratios issue 10 asks for) and RESULTS.md + results.png."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

MiB = 2**20
LABELS = {
    "lightning_default": "Lightning default save (TorchCheckpointIO, no fsync)",
    "lightning_async": "Lightning AsyncCheckpointIO (clone, then torch.save in a thread)",
    "dcp_save": "torch.distributed.checkpoint.save",
    "dcp_async_save": "torch.distributed.checkpoint.async_save",
    "safetensors_save_file": "safetensors.torch.save_file (no fsync)",
    "dd_fsync": "dd of the same bytes, conv=fsync",
    "no_fsync": "our bytes written without fsync (page cache only)",
    "ours_sync": "lightning-ckpt save_checkpoint (fsync, checksums)",
    "ours_async": "lightning-ckpt SafetensorsCheckpointIO(async_save=True) (reused buffers, a thread)",
    "checksum_xxh3_128": "(part of our save) xxh3-128 of our bytes, the manifest's checksum",
    "checksum_sha256": "(alternative) sha256 of the same bytes",
    "torch_load": "torch.load(weights_only=True) + load_state_dict",
    "safetensors_load_file": "safetensors.torch.load_file + load_state_dict",
    "ours_load": "lightning-ckpt load_checkpoint (verifies) + load_state_dict",
}


def _median(results: dict, name: str, key: str = "median") -> float | None:
    row = results.get(name, {})
    if key == "median":
        return row.get("median")
    values = sorted(row.get(key, []))
    return values[len(values) // 2] if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) for every goal of issue 10, including those not reachable yet."""
    ours, dd, light = _median(results, "ours_sync"), _median(results, "dd_fsync"), _median(results, "lightning_default")
    ours_row = results.get("ours_sync", {})
    load_row = results.get("ours_load", {})
    blocking = _median(results, "ours_async", "blocking")
    stall = None if blocking is None else blocking + (_median(results, "ours_async", "inflation") or 0.0)
    async_row = results.get("ours_async", {})
    rows = []
    for goal, value, unit, bound in (
            ("async blocking per save <= 0.02 x Lightning default sync save", _ratio(blocking, light),
             "x Lightning's save", 0.02),
            ("async blocking <= 0.5 x Lightning AsyncCheckpointIO's",
             _ratio(blocking, _median(results, "lightning_async", "blocking")), "x AsyncCheckpointIO", 0.5),
            ("blocking + step-time inflation while writing <= 0.10 x the sync save", _ratio(stall, ours),
             "x our sync save", 0.10),
            ("peak extra RSS, async <= 1.1 x the state (over the warm-up and every repeat)",
             _ratio(async_row.get("peak_extra"), async_row.get("state_bytes")), "x state", 1.1)):
        rows.append((goal, _fmt(value, unit), _verdict(value, bound, False)))
    throughput = _ratio(dd, ours)
    rows.append(("sync save throughput >= 0.9 x dd with fsync", _fmt(throughput, "x dd"), _verdict(throughput, 0.9, True)))
    save_mem = _ratio(ours_row.get("peak_extra"), ours_row.get("largest_tensor"))
    rows.append(("peak extra RSS, sync save <= 1.5 x the largest tensor", _fmt(save_mem, "x largest tensor"),
                 _verdict(save_mem, 1.5, False)))
    load_mem = _ratio(load_row.get("peak_extra"), load_row.get("state_bytes"))
    rows.append(("peak extra RSS, load <= 1 x the state", _fmt(load_mem, "x state"), _verdict(load_mem, 1.0, False)))
    load = _ratio(_median(results, "ours_load"), _median(results, "torch_load"))
    rows.append(("load with every checksum verified <= 0.5 x torch.load(weights_only=True)",
                 _fmt(load, "x torch.load"), _verdict(load, 0.5, False)))
    rows.append(("(for reference) our sync save vs Lightning's default save", _fmt(_ratio(ours, light), "x"), ""))
    return rows


def _fmt(value: float | None, unit: str) -> str:
    return "not measured (a contender failed)" if value is None else f"{value:.2f} {unit}"


def _verdict(value: float | None, bound: float, at_least: bool) -> str:
    if value is None:
        return "unknown"
    return "met" if (value >= bound if at_least else value <= bound) else "missed"


def table(results: dict) -> list[str]:
    """Markdown rows: time, throughput, peak extra RSS, and the async figures where they apply."""
    size = next((r["state_bytes"] for r in results.values() if "state_bytes" in r), 0)
    lines = ["| contender | median time | MiB/s | peak extra RSS | blocking | step-time inflation |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in LABELS.items():
        row = results.get(name, {})
        if "error" in row:
            lines.append(f"| {label} | failed: {' '.join(row['error'])[:120]} | | | | |")
            continue
        if "median" not in row:
            continue
        blocking, inflation = _median(results, name, "blocking"), _median(results, name, "inflation")
        lines.append(f"| {label} | {row['median'] * 1000:.0f} ms | {size / MiB / row['median']:.0f} | "
                     f"{row['peak_extra'] / MiB:.0f} MiB | "
                     f"{'' if blocking is None else f'{blocking * 1000:.0f} ms'} | "
                     f"{'' if inflation is None else f'{inflation * 1000:.0f} ms'} |")
    return lines


def plot(results: dict, path: Path) -> bool:
    """A bar chart of the median times; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in LABELS if "median" in results.get(n, {})]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh([LABELS[n] for n in names], [results[n]["median"] for n in names],
            color=["tab:orange" if n.startswith("ours") else "tab:blue" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("median seconds (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: dict, machine: dict, args: argparse.Namespace, path: Path) -> None:
    """Print the table and the goals, and write RESULTS.md (and results.png) next to ``path``."""
    size = next((r["state_bytes"] for r in results.values() if "state_bytes" in r), 0)
    goal_rows = goals(results)
    lines = [
        "# Benchmark results", "",
        f"Written by `python benchmarks/bench.py --mb {args.mb} --repeat {args.repeat}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. State: {size / MiB:.0f} MiB "
        f"(weights + two AdamW moments), median of {args.repeat}; loads read from the page cache.", "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None), "",
        *table(results), "",
        "## Goals (issue 10)", "",
        "| goal | measured | verdict |", "| --- | --- | --- |",
        *(f"| {g} | {m} | {v} |" for g, m, v in goal_rows), "",
        "Durability costs the difference between our save and the same bytes written without fsync; "
        "it stays on.", "",
        "CUDA: " + (f"measured on {machine['gpu']}." if machine.get("gpu") else
                    "no GPU on this machine, so the CUDA path (pinned staging buffers, the device-to-host "
                    "snapshot) is not measured here; the figures above are CPU tensors."),
    ]
    if plot(results, path.with_name("results.png")):
        lines += ["", "![median times](results.png)"]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {path}")
