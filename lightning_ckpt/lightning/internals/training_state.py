"""Training states Lightning's checkpoint leaves out, captured per rank and put back on resume.

- torchmetrics accumulators: metric states are not persistent by default, so an epoch-level metric
  would cover only the batches after a mid-epoch resume;
- the running sums behind tensors logged with ``on_epoch=True`` (Lightning's ``_ResultCollection``);
- gradients accumulated in an unfinished ``accumulate_grad_batches`` window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_warn
from torchmetrics import Metric

K_METRIC_STATE = "state"
K_METRIC_UPDATES = "update_count"
_UPDATES_ATTR = "_update_count"

MetricStates = dict[str, dict[str, Any]]


def find_metrics(module: torch.nn.Module) -> list[tuple[str, Metric]]:
    """Every torchmetrics metric in ``module`` with its module path (walked once, not every step)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Metric)]


def update_counts(metrics: list[tuple[str, Metric]]) -> dict[str, int]:
    """How often each metric was updated since its last reset: a cheap marker of "has it changed"."""
    return {name: getattr(metric, _UPDATES_ATTR) for name, metric in metrics}


def metric_states(metrics: list[tuple[str, Metric]], counts_after_batch: Mapping[str, int]) -> MetricStates:
    """The states the metrics had after the last training batch, read now (at a save).

    A metric updated since that batch (by validation, which runs between batches) had then either
    its reset state, which needs no saving, or a state that is gone: it is left out with a warning.
    """
    states: MetricStates = {}
    for name, metric in metrics:
        count, then = getattr(metric, _UPDATES_ATTR), counts_after_batch.get(name, 0)
        if count != then:
            if then:
                rank_zero_warn(f"ExactResume: metric {name!r} was updated after the last training batch and before "
                               "this save without a reset in between; its state is not saved")
            continue
        if count:
            states[name] = {K_METRIC_STATE: {attr: _detached_cpu(value) for attr, value in metric.metric_state.items()},
                            K_METRIC_UPDATES: count}
    return states


def restore_metric_states(metrics: list[tuple[str, Metric]], states: Mapping[str, Mapping[str, Any]]) -> None:
    """Put saved states back; metrics without a saved state keep their (reset) state."""
    by_name = dict(metrics)
    for name, saved in states.items():
        metric = by_name.get(name)
        if metric is None:
            rank_zero_warn(f"ExactResume: the checkpoint has the state of metric {name!r}, which the model lacks")
            continue
        for attr, value in saved[K_METRIC_STATE].items():
            moved = value.to(metric.device) if isinstance(value, torch.Tensor) else [v.to(metric.device) for v in value]
            setattr(metric, attr, moved)
        setattr(metric, _UPDATES_ATTR, saved[K_METRIC_UPDATES])
        metric._computed = None  # a cached compute() from before the restore is stale


def epoch_logged_states(trainer: pl.Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The running sums behind tensors logged with ``on_epoch=True`` during training.

    Lightning keeps them in the training loop's ``_ResultCollection``, which it does not save.
    Logged torchmetrics objects are not here: their state is the metric's own. This reads Lightning
    internals (``_TrainingEpochLoop._results``, ``_ResultMetric``); checked with Lightning 2.6.6.
    """
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    return {key: {attr: _detached_cpu(value) for attr, value in result.metric_state.items()}
            for key, result in results.items() if _is_epoch_tensor_result(result)}


def merge_epoch_logged_states(trainer: pl.Trainer, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Fold saved running sums into those of the first batch after a resume.

    Folding after exactly one update is ``saved (+|max|min) new``: the very operation an
    uninterrupted run does for that batch, so the epoch value comes out bit-exact.
    """
    results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
    for key, states in saved.items():
        result = results.get(key)
        if not _is_epoch_tensor_result(result):
            rank_zero_debug(f"ExactResume: {key!r} was logged before the save but not after the resume")
            continue
        combine = result.meta.reduce_fx if result.meta.is_max_reduction or result.meta.is_min_reduction else torch.add
        for attr, value in states.items():
            current = getattr(result, attr)
            setattr(result, attr, combine(value.to(current.device), current))


def partial_grads(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The gradients accumulated so far, by parameter name."""
    return {name: p.grad.detach().to("cpu", copy=True) for name, p in module.named_parameters() if p.grad is not None}


def restore_grads(module: torch.nn.Module, grads: Mapping[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    for name, grad in grads.items():
        params[name].grad = grad.to(params[name].device)


def gather(rank_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's state in rank order; a collective under torch.distributed, so every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rank_state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rank_state)
    return gathered


def _is_epoch_tensor_result(result: object) -> bool:
    return isinstance(result, Metric) and bool(getattr(result, "is_tensor", False)) and result.meta.on_epoch


def _detached_cpu(value: Any) -> Any:
    # A copy: tensor states are updated in place. List states ("cat") only grow, a new list suffices.
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return [v.detach().to("cpu", copy=True) for v in value]
