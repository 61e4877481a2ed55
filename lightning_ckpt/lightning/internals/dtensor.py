"""A DTensor over a host copy of another DTensor's local tensor, left on the host.

An asynchronous sharded save stages each rank's shards into reused host buffers; DCP then plans the
write from DTensors (which rank writes which chunk). The public ``DTensor.from_local`` moves a local
tensor to its mesh's device type (a CUDA mesh: back to the GPU, the copy undone), so the copy is wrapped
as torch's own staging does (``torch.distributed._state_dict_utils._create_cpu_state_dict``: the
source's spec, a host local tensor): the DTensor constructor with the source's ``_spec``. Checked with
torch 2.13; ``tests/distributed/test_sharded_internals.py`` fails loudly when a release changes it.
"""

from __future__ import annotations

import torch


def dtensor_over(like: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor with ``like``'s mesh, placements, global shape and stride whose local tensor is ``local``
    (a copy of ``like``'s local tensor, same shape and dtype), wherever ``local`` lies."""
    from torch.distributed.tensor import DTensor

    return DTensor(local, like._spec, requires_grad=False)  # torch 2.13: DTensor.__new__(local_tensor, spec, *, ...)
