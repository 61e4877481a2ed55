"""Capture, restore and isolate the global random number generators: python, numpy, torch, CUDA.

Pure PyTorch: nothing here imports Lightning. A snapshot has two forms: the live one
(:class:`RNGSnapshot`, cheap enough to take every training step) and a checkpoint-safe one
(:meth:`RNGSnapshot.to_state_dict`) made only of tensors, ints, floats, str and None, so it loads
with ``torch.load(weights_only=True)`` and stores in safetensors + JSON without pickling.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

PYTHON_KEY = "python"
NUMPY_KEY = "numpy"
TORCH_KEY = "torch"
CUDA_KEY = "cuda"
_PY_VERSION = "version"
_PY_STATE = "state"
_PY_GAUSS = "gauss_next"
_NP_BIT_GENERATOR = "bit_generator"
_NP_KEY = "key"
_NP_POS = "pos"
_NP_HAS_GAUSS = "has_gauss"
_NP_GAUSS = "gauss"
# numpy's legacy global generator takes 32-bit seeds only.
_NUMPY_SEED_MASK = 2**32 - 1
_SEED_MASK = 2**63 - 1


@dataclass(frozen=True)
class RNGSnapshot:
    """The state of every global generator of this process at one moment."""

    python_state: tuple[Any, ...]
    numpy_state: dict[str, Any]
    torch_state: torch.Tensor
    cuda_states: tuple[torch.Tensor, ...] = ()

    @classmethod
    def capture(cls) -> RNGSnapshot:
        """Snapshot python ``random``, numpy's global generator, torch CPU and each initialized CUDA device."""
        return cls(python_state=random.getstate(), numpy_state=np.random.get_state(legacy=False),
                   torch_state=torch.get_rng_state(), cuda_states=_cuda_states())

    def restore(self) -> None:
        """Put every generator back to this snapshot (CUDA only where the snapshot has a device's state)."""
        random.setstate(self.python_state)
        np.random.set_state(self.numpy_state)
        torch.set_rng_state(self.torch_state)
        if self.cuda_states and torch.cuda.is_available():
            # A resume on fewer devices restores those it has; the rest cannot be exact anyway.
            for device, state in enumerate(self.cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    def to_state_dict(self) -> dict[str, Any]:
        """Checkpoint-safe form: tensors, ints, floats, str and None only."""
        version, internal, gauss_next = self.python_state
        np_state = self.numpy_state["state"]
        return {
            PYTHON_KEY: {_PY_VERSION: version, _PY_STATE: torch.tensor(internal, dtype=torch.int64),
                         _PY_GAUSS: gauss_next},
            NUMPY_KEY: {_NP_BIT_GENERATOR: self.numpy_state[_NP_BIT_GENERATOR],
                        _NP_KEY: torch.from_numpy(np_state[_NP_KEY].astype(np.int64)),
                        _NP_POS: int(np_state[_NP_POS]), _NP_HAS_GAUSS: int(self.numpy_state[_NP_HAS_GAUSS]),
                        _NP_GAUSS: float(self.numpy_state[_NP_GAUSS])},
            TORCH_KEY: self.torch_state.clone(),
            CUDA_KEY: [state.clone() for state in self.cuda_states],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RNGSnapshot:
        """Inverse of :meth:`to_state_dict`.

        Raises:
            ValueError: if the state names a numpy bit generator other than the global one's.
        """
        py, npy = state[PYTHON_KEY], state[NUMPY_KEY]
        if npy[_NP_BIT_GENERATOR] != "MT19937":
            raise ValueError(f"numpy global generator state is {npy[_NP_BIT_GENERATOR]!r}; expected 'MT19937'")
        numpy_state = {_NP_BIT_GENERATOR: npy[_NP_BIT_GENERATOR],
                       "state": {_NP_KEY: npy[_NP_KEY].cpu().numpy().astype(np.uint32), _NP_POS: int(npy[_NP_POS])},
                       _NP_HAS_GAUSS: int(npy[_NP_HAS_GAUSS]), _NP_GAUSS: float(npy[_NP_GAUSS])}
        python_state = (int(py[_PY_VERSION]), tuple(int(v) for v in py[_PY_STATE].tolist()), py[_PY_GAUSS])
        return cls(python_state=python_state, numpy_state=numpy_state,
                   torch_state=_host_bytes(state[TORCH_KEY]),
                   cuda_states=tuple(_host_bytes(s) for s in state.get(CUDA_KEY, ())))


def capture_rng_state() -> dict[str, Any]:
    """The checkpoint-safe state of every global generator (see :meth:`RNGSnapshot.to_state_dict`)."""
    return RNGSnapshot.capture().to_state_dict()


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    RNGSnapshot.from_state_dict(state).restore()


def seed_cpu_rngs(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch's CPU generator (never CUDA)."""
    random.seed(seed)
    np.random.seed(seed & _NUMPY_SEED_MASK)
    # torch.manual_seed would also reseed every CUDA device; only the CPU stream is meant here.
    torch.default_generator.manual_seed(seed)


@contextmanager
def fork_cpu_rngs(seed: int | None = None) -> Iterator[None]:
    """Run a block on its own CPU random streams (seeded with ``seed`` if given), then restore the old ones."""
    saved = random.getstate(), np.random.get_state(legacy=False), torch.get_rng_state()
    try:
        if seed is not None:
            seed_cpu_rngs(seed)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def derive_seed(*parts: int) -> int:
    """A well-mixed non-negative 63-bit seed from integers (e.g. a base seed, an epoch, a batch index)."""
    packed = struct.pack(f"<{len(parts)}q", *(p & _SEED_MASK for p in parts))
    return xxhash.xxh64_intdigest(packed) & _SEED_MASK


def _host_bytes(state: torch.Tensor) -> torch.Tensor:
    # torch.set_rng_state and torch.cuda.set_rng_state take CPU byte tensors only; a checkpoint loaded
    # with map_location="cuda" has its RNG states on the device.
    return state.detach().to("cpu", torch.uint8, copy=True)


def _cuda_states() -> tuple[torch.Tensor, ...]:
    # Reading the state must not be what initializes CUDA in a CPU-only run or a dataloader worker.
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return ()
    return tuple(torch.cuda.get_rng_state(device) for device in range(torch.cuda.device_count()))
