"""``tunesmith data preview``: rendered examples with trained tokens marked, plus statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from tunesmith.config import Config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.models import load_tokenizer, resolve_model_path

OPEN, CLOSE = "[[", "]]"


def mark_supervised(ex: Example, tokenizer: Any) -> str:
    """The example's text with supervised tokens wrapped in [[ ]]."""
    sup = np.zeros(len(ex), dtype=bool)
    sup[1:] = ex.labels[:-1] != IGNORE  # token t+1 is trained iff target t is set
    out, k = [], 0
    while k < len(ex):
        j = k
        while j < len(ex) and sup[j] == sup[k]:
            j += 1
        text = tokenizer.decode(ex.input_ids[k:j].tolist())
        out.append(f"{OPEN}{text}{CLOSE}" if sup[k] else text)
        k = j
    return "".join(out)


def preview(cfg: Config, n: int = 3) -> str:
    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.name))
    pairs = cfg.task in ("reward", "dpo")
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, pairs=pairs)
    s = data.stats
    lines = [
        f"data: {cfg.data.train} (format {data.format}); trained tokens are marked {OPEN}like this{CLOSE}",
        "",
    ]
    shown = data.train[: 2 * n] if pairs else data.train[:n]
    for k, ex in enumerate(shown):
        side = ("chosen: " if k % 2 == 0 else "rejected: ") if pairs else ""
        lines += [
            f"--- {side}{ex.origin} ({len(ex)} tokens, {ex.n_supervised} scored)",
            mark_supervised(ex, tokenizer),
            "",
        ]
    packed = Batches(
        data.train,
        cfg.train.batch_size,
        cfg.data.max_length,
        tokenizer.pad_token_id,
        True,
        cfg.train.seed,
    )
    unpacked = Batches(
        data.train,
        cfg.train.batch_size,
        cfg.data.max_length,
        tokenizer.pad_token_id,
        False,
        cfg.train.seed,
    )
    lengths = np.asarray(s.lengths)
    lines += [
        "statistics:",
        f"  examples           {s.examples:,} train, {data.eval_stats.examples:,} eval"
        + (" (a chosen and a rejected example per pair)" if pairs else ""),
        f"  tokens             {s.tokens:,} (length min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()})",
        f"  supervised tokens  {s.supervised:,} ({100 * s.supervised / max(s.tokens, 1):.1f}% of tokens)",
        f"  truncated          {s.truncated:,} (data.max_length={cfg.data.max_length}, data.truncation={cfg.data.truncation})",
        f"  dropped            {s.dropped_long + s.dropped_unsupervised + s.skipped_bad:,} (too long {s.dropped_long}, nothing to train"
        f"{' or identical / empty pair' if pairs else ''} {s.dropped_unsupervised}, malformed {s.skipped_bad})",
        f"  packing efficiency {100 * packed.packing_efficiency():.1f}% packed vs {100 * unpacked.packing_efficiency():.1f}% padded (data.packing={cfg.data.packing})",
    ]
    same = tokenizer.pad_token_id == tokenizer.eos_token_id
    lines.append(
        f"  pad token          {tokenizer.pad_token!r}"
        + (" (= EOS; padding is masked by position, so EOS stays trained)" if same else "")
    )
    lines += [f"  note: {note}" for note in data.notes]
    return "\n".join(lines)
