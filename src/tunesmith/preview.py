"""``tunesmith data preview``: rendered examples with trained tokens marked, plus statistics."""

from __future__ import annotations

from typing import Any

import numpy as np

from tunesmith.config import Config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.data.kinds import RecordKind
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.models import load_tokenizer

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


def preview(
    cfg: Config, kind: RecordKind, model_path: str, n: int = 3, shares_prompt: bool = False
) -> str:
    """Rendered examples of the first ``n`` records of the task's ``kind``, and statistics."""
    tokenizer = load_tokenizer(cfg.model, model_path)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, kind)
    if not kind.tokenized:  # prompts: the responses are the policy's own, sampled in training
        from tunesmith.data.formats import prompt_of

        lines = [
            f"data: {cfg.data.train} (format {data.format}): {len(data.train_records):,} train, "
            f"{len(data.eval_records):,} eval {kind.unit}; the policy continues each rendered prompt",
        ]
        for rec in data.train_records[:n]:
            rendered, _, ref = prompt_of(rec, data.format, tokenizer, data.template)
            lines += ["", f"--- {rec.origin}", rendered]
            if ref is not None:
                lines.append(f"(reference answer: {ref})")
        return "\n".join(lines)
    group = kind.group
    s = data.stats
    lines = [
        f"data: {cfg.data.train} (format {data.format}); trained tokens are marked {OPEN}like this{CLOSE}",
        "",
    ]
    for k, ex in enumerate(data.train[: group * n]):
        side = f"{kind.sides[k % group]}: " if group > 1 else ""
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
        group_by_length=cfg.data.group_by_length,
    )
    lengths = np.asarray(s.lengths)
    lines += [
        "statistics:",
        f"  examples           {s.examples:,} train, {data.eval_stats.examples:,} eval"
        + (f" ({' and '.join(kind.sides)} per record)" if group > 1 else ""),
        f"  tokens             {s.tokens:,} (length min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()})",
        f"  supervised tokens  {s.supervised:,} ({100 * s.supervised / max(s.tokens, 1):.1f}% of tokens)",
        f"  truncated          {s.truncated:,} (data.max_length={cfg.data.max_length}, data.truncation={cfg.data.truncation})",
        f"  empty completions  {s.empty:,} (data.empty_completion={cfg.data.empty_completion})",
        f"  dropped            {s.dropped_long + s.dropped_unsupervised + s.dropped_empty + s.skipped_bad:,} (too long {s.dropped_long}, nothing to train"
        f"{' or identical sides' if group > 1 else ''} {s.dropped_unsupervised}, empty completion {s.dropped_empty}, malformed {s.skipped_bad})",
        f"  packing efficiency {100 * packed.packing_efficiency():.1f}% packed vs {100 * unpacked.packing_efficiency():.1f}% padded (data.packing={cfg.data.packing}, data.group_by_length={cfg.data.group_by_length})",
    ]
    if shares_prompt and group > 1:  # the task may lay each record in one row
        shared = Batches(data.train, 1, 0, 0, False, 0, group=group, share_prefix=True)
        lines.append(
            f"  shared prompt      {100 * shared.tokens_saved():.1f}% fewer tokens to compute with each of the "
            f"{kind.unit} in one row (data.share_prompt={cfg.data.share_prompt}; auto: on CPU)"
        )
    same = tokenizer.pad_token_id == tokenizer.eos_token_id
    lines.append(
        f"  pad token          {tokenizer.pad_token!r}"
        + (" (= EOS; padding is masked by position, so EOS stays trained)" if same else "")
    )
    lines += [f"  note: {note}" for note in data.notes]
    return "\n".join(lines)
