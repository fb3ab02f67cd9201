"""Sequence classification: cross-entropy of the class logits, and the held-out scores.

    L = -(1/B) * sum_i log softmax(z_i)[y_i],   z_i = head(h_i) in R^K

where h_i is the backbone's summary of sequence i (BERT: the pooled [CLS] state; decoders: the
last non-padding token) and y_i its class. With label smoothing eps the target is
(1 - eps) one_hot(y) + eps / K (Szegedy et al. 2016, arXiv 1512.00567).

Macro-F1 is the unweighted mean over classes of F1_k = 2 P_k R_k / (P_k + R_k), with P_k, R_k the
precision and recall of class k (a class never predicted nor present scores 0 and still counts).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch


def class_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, K) class logits from the root forward of a ``*ForSequenceClassification`` model."""
    return model(**batch.model_inputs(), use_cache=False).logits.float()


class ClassifyObjective:
    """Cross-entropy per sequence; the step is normalised by the number of sequences."""

    name = "classify"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def count(self, batch: Batch) -> int:
        return batch.input_ids.shape[0]

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = class_logits(model, batch)  # (B, K)
        y = batch.extras["label"]  # (B,)
        loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing)
        return loss, {"accuracy": float((logits.argmax(-1) == y).sum())}


@torch.no_grad()
def predictions(
    model: nn.Module, batches: Iterable[Batch], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes (N,), true classes (N,)) over ``batches``, in eval mode."""
    was = model.training
    model.eval()
    preds, gold = [], []
    for batch in batches:
        batch = batch.to(device)
        preds.append(class_logits(model, batch).argmax(-1).cpu())
        gold.append(batch.extras["label"].cpu())
    model.train(was)
    return torch.cat(preds), torch.cat(gold)


def confusion_matrix(pred: torch.Tensor, gold: torch.Tensor, k: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    m = torch.zeros(k, k, dtype=torch.long)
    m.index_put_((gold, pred), torch.ones_like(gold), accumulate=True)
    return m


def macro_f1(confusion: torch.Tensor) -> float:
    """Unweighted mean of the per-class F1 scores of a confusion matrix (rows true, cols predicted)."""
    c = confusion.double()
    tp = c.diag()
    predicted, actual = c.sum(0), c.sum(1)
    denom = predicted + actual  # 2TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return float(f1.mean())
