"""What Lightning and the loggers ask of a ``ModelCheckpoint`` (best, last, scores), answered from the
ledger for the ``Checkpointer``: this run's lineage after a fit, the newest branch's before one."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_ckpt.lightning.checkpointing.from_modelcheckpoint import newest_stock_ckpt
from lightning_ckpt.lightning.checkpointing.node_local_resume import part_check_for_last
from lightning_ckpt.lightning.checkpointing.remote_dirpath import note_remote_last
from lightning_ckpt.lightning.checkpointing.shared_load import Last, last_on_rank_zero
from lightning_ckpt.history.manager import CheckpointManager, best_entry, last_entry, latest_entry, ranked_entries
from lightning_ckpt.tiers.mirror import last_across_tiers
from lightning_ckpt.tiers.part_uploads import last_of_parts_across_tiers
from lightning_ckpt.store import Store, open_store
from lightning_ckpt.store.ledger import Entry
from lightning_ckpt.store.fsutil import remote_scheme

if TYPE_CHECKING:
    from lightning_ckpt.tiers.mirror import Mirror
    from lightning_ckpt.policy import RetentionConfig


class ModelCheckpointView:
    """A mixin of the ``Checkpointer``: the attributes Lightning reads from a ``ModelCheckpoint``
    (``best_model_path``, ``last_model_path``, ...), each the answer of the one function deciding it
    (``lineage.last_of``/``best_of``/``ranked_of``), verified once per ledger change."""

    dirpath: str | None
    monitor: str | None
    mode: str
    save_top_k: int
    mirror: Mirror | None
    _storage_options: Mapping[str, Any] | None
    _manager: CheckpointManager | None
    _retention: RetentionConfig
    _best_override: str | None
    _view_cache: tuple[int, dict[str, Any]] | None  # the manager's revision, the answers given at it
    _resolve_dirpath: Callable[[L.Trainer], str]  # the Checkpointer's
    _migrating_from: str | None = None  # the ModelCheckpoint file "last" chose, for the Checkpointer to say so
    _best_pinned: str | None = None  # rank 0's "best" while Lightning resolves ckpt_path="best" (shared_load)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # Under DDP and ModelParallelStrategy decided on rank 0 alone, every rank learns it: another node may see
        # nothing of dirpath; on node-local parts rank 0 checks the files it holds (node_local_resume.py).
        verifies = part_check_for_last(trainer, self._resolve_dirpath(trainer), mirrored=self.mirror is not None)
        paths, self._migrating_from, _ = last_on_rank_zero(trainer, lambda: self._last_here(trainer, verifies))
        return paths

    def _last_here(self, trainer: L.Trainer, verifies: Callable[[str], bool] | None = None) -> Last:
        dirpath = self._resolve_dirpath(trainer)
        manager = self._manager
        if manager is None or manager.run_id is None or not manager.is_at(dirpath):
            store = open_store(dirpath, self._storage_options)
            entry, url = self._latest_here(store, verifies)
            if entry is not None and url is not None:  # node-local parts, whole on the mirror only: resumed there
                rank_zero_info(f"Checkpointer: resuming step {entry.step} from the mirror's complete copy {url} "
                               "(rank 0's part of it is missing or damaged)")
                note_remote_last(url, entry.wall_time)
                return {url}, None, entry.wall_time
        else:
            store, entry = manager.store, last_entry(manager.entries, manager.store, manager.run_id, manager.parent,
                                                     verifies)
        if entry is None:  # none of ours: a ModelCheckpoint's newest .ckpt there, rather than step 0 in silence
            stock = newest_stock_ckpt(dirpath) if remote_scheme(dirpath) is None else None
            return ({str(stock)}, str(stock), stock.stat().st_mtime) if stock is not None else (set(), None, None)
        path = store.location(entry.name)
        if remote_scheme(path) is not None:  # Lightning cannot date a prefix: tell it when this one was committed
            note_remote_last(path, entry.wall_time)
        return {path}, None, entry.wall_time

    def _latest_here(self, store: Store, verifies: Callable[[str], bool] | None) -> tuple[Entry | None, str | None]:
        """"Last" in ``store`` (and the mirror), and the mirror's URL of it when it is resumed from the mirror."""
        if self.mirror is None:
            return latest_entry(store, verifies=verifies), None
        if verifies is not None:  # node-local parts: resumed from the parts, or from the mirror's complete copy
            return last_of_parts_across_tiers(store, self.mirror, verifies)  # type: ignore[arg-type]
        return self._last_with_mirror(store), None

    def _last_with_mirror(self, store: Store) -> Entry | None:
        """"Last" of both tiers; one only the mirror holds is downloaded first, and the user told so."""
        entry, url = last_across_tiers(store, self.mirror)  # type: ignore[arg-type]
        if entry is not None and url is not None:
            rank_zero_info(f"Checkpointer: restored step {entry.step} from {url} (the local directory had no good "
                           f"copy of it): resuming from {store.location(entry.name)}")
        return entry

    @property
    def monitors(self) -> dict[str, str]:
        """Every monitored metric and its mode, in order (``{}`` without a monitor); the first is ``monitor``."""
        return dict(self._retention.monitors)

    def pin_best(self, path: str | None) -> None:
        """``best_model_path`` is ``path`` (rank 0's, under DDP) until pinned again with None."""
        self._best_pinned = path

    @property
    def best_model_path(self) -> str:
        if self._best_pinned is not None:
            return self._best_pinned
        if self._best_override is not None:
            return self._best_override
        entry = self._best_entry()
        return self._reader().path(entry.name) if entry else ""

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:  # Lightning's spawn launchers copy it back from workers
        self._best_override = value

    @property
    def best_model_score(self) -> torch.Tensor | None:
        entry = self._best_entry()
        value = entry.own_metrics().get(self.monitor) if entry and self.monitor else None
        return torch.tensor(value) if value is not None else None

    @property
    def last_model_path(self) -> str:
        entry = self._last_entry()
        return self._reader().path(entry.name) if entry else ""

    @property
    def current_score(self) -> torch.Tensor | None:
        entry = self._last_entry()
        value = entry.own_metrics().get(self.monitor) if entry and self.monitor else None
        return torch.tensor(value) if value is not None else None

    @property
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """The ``save_top_k`` best by ``monitor`` in "best"'s ranking (its first is ``best_model_path``)."""
        if not self.monitor:
            return {}
        reader = self._reader()
        return {reader.path(e.name): torch.tensor(e.own_metrics()[self.monitor]) for e in self._top_k()}

    # -- reading the ledger --------------------------------------------------------------------

    def _reader(self) -> CheckpointManager:
        """The manager answering "best"/"last": this run's after a fit, else a reader of the directory."""
        if self._manager is None or (self.dirpath is not None and not self._manager.is_at(self.dirpath)):
            self._manager = CheckpointManager(self.dirpath or ".", self._retention, run_id=None,
                                              storage_options=self._storage_options)
            if self.dirpath is not None:
                self._manager.refresh()
        return self._manager

    def _answer(self, key: str, decide: Callable[[CheckpointManager], Any]) -> Any:
        """``decide``'s answer, once per change of the ledger, not per access: loggers read these often."""
        manager = self._reader()
        if self._view_cache is None or self._view_cache[0] != manager.revision:
            self._view_cache = (manager.revision, {})
        answers = self._view_cache[1]
        if key not in answers:
            answers[key] = decide(manager)
        return answers[key]

    def _last_entry(self) -> Entry | None:
        return self._answer("last", lambda m: last_entry(m.entries, m.store, m.run_id, m.parent))

    def _best_entry(self) -> Entry | None:
        if not self.monitor:  # without a monitor, "best" is "last" (as ModelCheckpoint's is its newest)
            return self._last_entry()
        return self._answer("best", lambda m: best_entry(m.entries, m.store, self.monitor, self.mode,
                                                         m.run_id, m.parent))

    def _top_k(self) -> list[Entry]:
        def decide(m: CheckpointManager) -> list[Entry]:
            ranked = ranked_entries(m.entries, m.store, self.monitor, self.mode, m.run_id, m.parent)
            return list(itertools.islice(ranked, self.save_top_k))

        return self._answer("top_k", decide)
