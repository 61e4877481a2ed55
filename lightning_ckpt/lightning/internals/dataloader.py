"""torch's ``DataLoader`` internals: the iterator a ``persistent_workers`` loader keeps between epochs.

Checked with torch 2.13 and torchdata 0.11; ``tests/exact/test_exact_resume.py`` (its worker runs) and
``tests/exact/test_streaming_resume.py::test_dropping_a_stateful_loaders_iterator_stops_its_workers`` fail
when a release moves it.
"""

from __future__ import annotations

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter


def drop_persistent_iterator(loader: DataLoader) -> None:
    """Shut down the workers of the iterator ``loader`` keeps (``persistent_workers``) and forget it, so
    that its next ``iter()`` builds a new one over the loader's current batch sampler."""
    # torch 2.13: DataLoader._iterator holds the persistent iterator; _MultiProcessingDataLoaderIter's
    # _shutdown_workers stops its workers (its __del__ would, later and in no set order). torchdata 0.11's
    # StatefulDataLoader keeps its iterator there too, and its multiprocessing iterator (not a subclass
    # of torch's) has the same method.
    iterator = getattr(loader, "_iterator", None)
    if isinstance(iterator, _MultiProcessingDataLoaderIter) or _is_torchdata_worker_iterator(iterator):
        iterator._shutdown_workers()
    loader._iterator = None


def _is_torchdata_worker_iterator(iterator: object) -> bool:
    try:
        from torchdata.stateful_dataloader.stateful_dataloader import _StatefulMultiProcessingDataLoaderIter
    except ImportError:
        return False
    return isinstance(iterator, _StatefulMultiProcessingDataLoaderIter)
