"""Which ranks of a job share a node-local directory (``shared_dirpath.ranks_sharing_a_directory``): one rank of
a job (``launch.run_job``), gloo, no Lightning. Each scenario gives rank ``r`` the directory ``dirs[r]`` (ranks
given the same one share a "node's disk")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from launch import rank, serve_in_gloo_group  # noqa: E402

from lightning_ckpt.distributed.agree import GroupAgree  # noqa: E402
from lightning_ckpt.lightning.checkpointing.shared_dirpath import ranks_sharing_a_directory  # noqa: E402


def run(dirs: list[str]) -> dict[str, Any]:
    root = Path(dirs[rank()])
    shared = ranks_sharing_a_directory(GroupAgree(dist.group.WORLD), root, rank())
    return {"shared": shared, "left": sorted(p.name for p in root.iterdir())}


if __name__ == "__main__":
    serve_in_gloo_group(run)
