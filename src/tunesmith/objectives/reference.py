"""Reference log-probabilities computed once and cached on disk (for DPO with ``full``).

With full fine-tuning there is no frozen base to switch back to, so instead of keeping a second
model in memory, ``log ref(y|x)`` of every response is computed before training and stored at
``<cache>/reference/<key>.safetensors``. The key hashes the model's identity
(``models.weights_fingerprint``: path, config and weight files' sizes and times), the precision
and pair layout they are computed in, and the tokenised data (``fingerprint_examples``), so a
change to any recomputes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.config import Config
from tunesmith.data.batching import Batches
from tunesmith.data.tokenize import Example, fingerprint_examples
from tunesmith.models import weights_fingerprint
from tunesmith.objectives.sft import sequence_logps
from tunesmith.paths import cache_root
from tunesmith.training.precision import autocast


def cache_key(
    model: nn.Module, examples: list[Example], cfg: Config, share_prefix: bool = False
) -> str:
    """The model's identity and dtype, the precision and pair layout the values are computed
    in (their roundings), and the tokenised data."""
    h = hashlib.sha256()
    source = str(getattr(model.config, "_name_or_path", cfg.model.name))
    h.update(f"{weights_fingerprint(source, cfg.model.revision)}|{cfg.model.dtype}".encode())
    h.update(f"|{cfg.train.precision}|shared={share_prefix}".encode())
    fingerprint_examples(h, examples)
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    device: torch.device,
    precision: str,
    group: int = 1,
    share_prefix: bool = False,
) -> np.ndarray:
    """log ref(y|x) of every example (summed over its scored tokens), in example order. Groups
    of ``group`` examples (a pair's responses) are batched as training batches them, in one
    row each with ``share_prefix``, so the reference sees the layout the policy sees."""
    was_training = model.training
    model.eval()
    out = np.zeros(len(examples), dtype=np.float32)
    batches = Batches(
        examples, batch_size, 0, 0, False, 0, False, group=group, share_prefix=share_prefix
    )
    for rows in batches.plan(0):  # one group per row: sequence k * B + b is member k of row b
        with autocast(device, precision):
            logps, _ = sequence_logps(model, batches.collate(rows).to(device))
        order = [group * r[0] + k for k in range(group) for r in rows]
        out[order] = logps.float().cpu().numpy()
    model.train(was_training)
    return out


def cached_reference_logps(
    model: nn.Module,
    examples: list[Example],
    cfg: Config,
    device: torch.device,
    group: int = 1,
    share_prefix: bool = False,
) -> Path:
    """Attach ``extras["ref_logp"]`` to every example, from the cache or computed now (batched
    as ``compute_reference_logps`` says); return the file."""
    key = cache_key(model, examples, cfg, share_prefix)
    path = cache_root() / "reference" / f"{key}.safetensors"
    if path.exists():
        values = load_file(str(path))["logps"].numpy()
    else:
        values = compute_reference_logps(
            model, examples, cfg.train.batch_size, device, cfg.train.precision, group, share_prefix
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logps": torch.from_numpy(values)}, str(tmp))
        tmp.replace(path)
    for ex, v in zip(examples, values):
        ex.extras["ref_logp"] = float(v)
    return path
