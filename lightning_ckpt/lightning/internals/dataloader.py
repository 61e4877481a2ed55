"""torch's ``DataLoader`` internals: the iterator a ``persistent_workers`` loader keeps between epochs.

Checked with torch 2.13; ``tests/exact/test_exact_resume.py`` (its worker runs) fails when a release
moves it.
"""

from __future__ import annotations

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter


def drop_persistent_iterator(loader: DataLoader) -> None:
    """Shut down the workers of the iterator ``loader`` keeps (``persistent_workers``) and forget it, so
    that its next ``iter()`` builds a new one over the loader's current batch sampler."""
    # torch 2.13: DataLoader._iterator holds the persistent iterator; _MultiProcessingDataLoaderIter's
    # _shutdown_workers stops its workers (its __del__ would, later and in no set order).
    iterator = getattr(loader, "_iterator", None)
    if isinstance(iterator, _MultiProcessingDataLoaderIter):
        iterator._shutdown_workers()
    loader._iterator = None
