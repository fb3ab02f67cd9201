"""Supervised fine-tuning objective: next-token cross-entropy on supervised tokens.

    L = -(1/N) * sum_{t in S} log p_theta(y_t | x_<=t)

where S is the set of supervised positions over *all* micro-batches of an optimiser step and
N = |S|. The objective returns the sum over one micro-batch; the loop divides by N, so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradient.

Speed: logits are computed only at supervised positions, so prompt tokens cost no vocabulary
projection. The objective calls the root model's forward (the object DDP or FSDP would wrap) with
``logits_to_keep`` set to the (B, T) boolean mask of supervised positions; transformers then
applies the LM head (and any logit post-processing of the model: soft-capping, scaling) to those
positions only and returns (N, V) logits. A model whose forward does not take a boolean mask
returns (B, T, V) logits, from which the same positions are taken.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP keeps the model as .module; FSDP2 does not wrap
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def supervised_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at supervised positions (N, V), their targets (N,)), from the root forward."""
    mask = batch.supervised  # (B, T)
    targets = batch.labels[mask]  # (N,)
    kwargs = {"logits_to_keep": mask} if _accepts_logits_to_keep(model) else {}
    logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
    if logits.dim() == 3:  # (B, T, V): the forward kept every position
        logits = logits[mask]
    return logits, targets  # (N, V), (N,)


class SFTObjective:
    """Token-level cross-entropy; the step is normalised by supervised tokens."""

    name = "sft"

    def count(self, batch: Batch) -> int:
        return batch.n_supervised

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits, targets = supervised_logits(model, batch)
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        return loss_sum, {}


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of log p of its supervised tokens (R,), number of them (R,)).

    For preference pairs a row is one response with its prompt: log pi(y | x) = sum_t log pi(y_t | x, y_<t).
    """
    logits, targets = supervised_logits(model, batch)  # (N, V), (N,)
    token_logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    )  # (N,)
    rows = batch.supervised.nonzero()[:, 0]  # (N,) row of each supervised token
    n_rows = batch.labels.shape[0]
    sums = torch.zeros(n_rows, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(n_rows, device=token_logps.device).index_add(
        0, rows, torch.ones_like(token_logps)
    )
    return sums, counts
