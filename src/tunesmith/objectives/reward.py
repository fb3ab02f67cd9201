"""Reward modelling with the Bradley-Terry model (Bradley & Terry 1952; as used in
Ouyang et al. 2022, arXiv 2203.02155):

    P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r)),   L = -log sigmoid(r_c - r_r - m)

where r is a scalar head on the backbone's hidden state at the last non-padding token (the
token transformers' ``*ForSequenceClassification`` models read) and m an optional margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch


@dataclass
class RewardConfig:
    margin: float = 0.0
    """Margin m in -log sigmoid(r_chosen - r_rejected - m)."""


def rewards(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(R,) scalar reward of every row: the root forward of a ``*ForSequenceClassification``
    model, which reads the last non-padding token of each row."""
    return model(**batch.model_inputs(), use_cache=False).logits.squeeze(-1).float()  # (R,)


def pair_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Number of pairs ranked right: a tie counts half, so an untrained model scores 50%."""
    return (margins > 0).float().sum() + 0.5 * (margins == 0).float().sum()


class RewardObjective:
    name = "reward"

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = margin

    def count(self, batch: Batch) -> int:
        return batch.sequences // 2

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        r = rewards(model, batch)
        n = self.count(batch)
        r_c, r_r = r[:n], r[n:]
        loss = -F.logsigmoid(r_c - r_r - self.margin).sum()
        d = (r_c - r_r).detach()
        return loss, {"accuracy": float(pair_accuracy(d)), "reward_margin": float(d.sum())}
