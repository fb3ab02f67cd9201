"""Reward modelling with the Bradley-Terry model (Bradley & Terry 1952; as used in
Ouyang et al. 2022, arXiv 2203.02155):

    P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r)),   L = -log sigmoid(r_c - r_r - m)

where r is a scalar head on the backbone's hidden state at the last non-padding token (the
token transformers' ``*ForSequenceClassification`` models read) and m an optional margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch


def last_token_index(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(R,) index of each row's last non-padding token (transformers' rule)."""
    if pad_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def rewards(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(R,) scalar reward of every row, from a ``*ForSequenceClassification`` model."""
    hidden = model.base_model(
        **batch.model_inputs(), use_cache=False
    ).last_hidden_state  # (R, T, H)
    idx = last_token_index(batch.input_ids, model.config.pad_token_id)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (R, H)
    return model.score(last).squeeze(-1).float()  # (R,)


def pair_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Number of pairs ranked right: a tie counts half, so an untrained model scores 50%."""
    return (margins > 0).float().sum() + 0.5 * (margins == 0).float().sum()


class RewardObjective:
    name = "reward"

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = margin

    def count(self, batch: Batch) -> int:
        return batch.input_ids.shape[0] // 2

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        r = rewards(model, batch)
        n = self.count(batch)
        r_c, r_r = r[:n], r[n:]
        loss = -F.logsigmoid(r_c - r_r - self.margin).sum()
        d = (r_c - r_r).detach()
        return loss, {"accuracy": float(pair_accuracy(d)), "reward_margin": float(d.sum())}
