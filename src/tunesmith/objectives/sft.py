"""Supervised fine-tuning objective: next-token cross-entropy on supervised tokens.

    L = -(1/N) * sum_{t in S} log p_theta(y_t | x_<=t)

where S is the set of supervised positions over *all* micro-batches of an optimiser step and
N = |S|. The objective returns the sum over one micro-batch; the loop divides by N, so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradient.

Speed: logits are computed only at supervised positions (``lm_head(h[S])``), so prompt tokens
cost no vocabulary projection. Models whose head post-processes logits (soft-capping, scaling)
take the plain forward instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch
from tunesmith.data.tokenize import IGNORE

# Config attributes of models whose logits are not just lm_head(h).
_LOGIT_POSTPROCESS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def _plain_head(model: nn.Module) -> bool:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return all(getattr(text_cfg, a, None) in (None, 1, 1.0) for a in _LOGIT_POSTPROCESS)


def supervised_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at supervised positions (N, V), their targets (N,))."""
    mask = batch.labels != IGNORE  # (B, T)
    targets = batch.labels[mask]  # (N,)
    if _plain_head(model):
        hidden = model.base_model(
            **batch.model_inputs(), use_cache=False
        ).last_hidden_state  # (B, T, H)
        logits = model.get_output_embeddings()(hidden[mask])  # (N, V)
    else:
        logits = model(**batch.model_inputs(), use_cache=False).logits[mask]
    return logits, targets


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
    rows = (batch.labels != IGNORE).nonzero()[:, 0]  # (N,) row of each supervised token
    n_rows = batch.labels.shape[0]
    sums = torch.zeros(n_rows, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(n_rows, device=token_logps.device).index_add(
        0, rows, torch.ones_like(token_logps)
    )
    return sums, counts
