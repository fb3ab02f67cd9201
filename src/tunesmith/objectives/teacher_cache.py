"""The offline teacher (``distill.teacher_cache: offline``): its top-k log-probs, computed once.

Before training, the teacher runs once over every example, one per row, unpacked. At each scored
position (a causal LM's supervised tokens, or a classifier's one row per text) it keeps the k
largest values of log softmax(logits[:width]) and their ids. They are stored at
``<cache>/teacher/<key>.safetensors`` (``logp`` (P, k) float32, ``index`` (P, k) int32,
``offsets`` (n + 1,): example i owns positions ``offsets[i]:offsets[i + 1]``), where the key
hashes the teacher's identity (``models.weights_fingerprint``: path, sizes and times of its
config and weight files), its dtype, the precision it ran in, k, the width scored and the
tokenised data (``fingerprint_examples``); a change to any of them computes anew. Each example
then carries ``extras["teacher_logp"]`` and ``extras["teacher_index"]`` ((its positions, k)
arrays), which ``collate`` concatenates in batch order, so ``DistillObjective`` finds them aligned
with ``logits[supervised]`` (packed rows too). The maths of the top-k losses is in
``objectives/distill.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.data.batching import Batches
from tunesmith.data.tokenize import Example, fingerprint_examples
from tunesmith.objectives.distill import CACHE_FOLDER, scored_logits
from tunesmith.paths import cache_root
from tunesmith.training.precision import autocast


def teacher_cache_path(
    teacher_fingerprint: str,
    examples: list[Example],
    k: int,
    width: int,
    token_level: bool,
    teacher_dtype: str,
    precision: str,
) -> Path:
    """The cache file of these top-k teacher log-probs (it may not exist yet)."""
    h = hashlib.sha256(
        f"teacher-top-k v1|{teacher_fingerprint}|{teacher_dtype}|{precision}|"
        f"k={k}|width={width}|token_level={token_level}".encode()
    )
    fingerprint_examples(h, examples)
    return cache_root() / CACHE_FOLDER / f"{h.hexdigest()[:32]}.safetensors"


@torch.no_grad()
def compute_teacher_top_k(
    teacher: nn.Module,
    examples: list[Example],
    k: int,
    width: int,
    token_level: bool,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> dict[str, torch.Tensor]:
    """``logp`` (P, k'), ``index`` (P, k') and ``offsets`` (n + 1,) of the teacher's top
    k' = min(k, width) log-probs at the P scored positions of ``examples``, in example order."""
    k = min(k, width)
    per_example: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(examples)  # type: ignore[list-item]
    batches = Batches(examples, batch_size, 0, 0, packing=False, seed=0, shuffle=False)
    for rows in batches.plan(0):  # one example per row: row r is example rows[r][0]
        batch = batches.collate(rows).to(device)
        with autocast(device, precision):
            logits, _ = scored_logits(teacher, batch, token_level, width)
        logp, index = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        counts = batch.supervised.sum(1) if token_level else torch.ones(len(rows), dtype=torch.long)
        for row, lp, ix in zip(
            rows, logp.cpu().split(counts.tolist()), index.cpu().split(counts.tolist())
        ):
            per_example[row[0]] = (lp, ix)
    sizes = torch.tensor([0] + [lp.shape[0] for lp, _ in per_example])
    return {
        "logp": torch.cat([lp for lp, _ in per_example]) if examples else torch.zeros(0, k),
        "index": torch.cat([ix for _, ix in per_example]).int()
        if examples
        else torch.zeros(0, k, dtype=torch.int32),
        "offsets": sizes.cumsum(0),
    }


def attach_teacher_top_k(
    examples: list[Example],
    path: Path,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> bool:
    """Give every example its cached ``teacher_logp`` / ``teacher_index``, from ``path`` or from
    ``compute()`` (then saved there). Returns whether the cache was reused."""
    reused = path.exists()
    if reused:
        tensors = load_file(str(path))
    else:
        tensors = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
    logp, index = tensors["logp"].numpy(), tensors["index"].numpy()
    offsets = tensors["offsets"].tolist()
    for i, ex in enumerate(examples):
        a, b = offsets[i], offsets[i + 1]
        ex.extras["teacher_logp"] = np.ascontiguousarray(logp[a:b])
        ex.extras["teacher_index"] = np.ascontiguousarray(index[a:b])
    return reused
