"""From a data config to tokenised train / eval examples, statistics and the pre-flight check."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.batching import collate
from tunesmith.data.formats import (
    LOADS_AS,
    detect_format,
    empty_completion,
    fitting_formats,
    render,
    render_pair,
    resolve_template,
    sharegpt_to_chat,
)
from tunesmith.data.io import Record, read_records
from tunesmith.data.kinds import EXAMPLES, RecordKind
from tunesmith.data.tokenize import Example, TokenStats, adds_bos, tokenize_segments
from tunesmith.errors import ConfigError, DataError

# End-of-turn markers of common chat templates, besides the tokenizer's EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class PreparedData:
    format: str
    template: str | None
    train: list[Example]
    eval: list[Example]
    train_records: list[Record]
    eval_records: list[Record]
    stats: TokenStats
    eval_stats: TokenStats
    notes: list[str] = field(default_factory=list)


def end_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a sequence or a turn for this tokenizer."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def split_records(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Deterministic disjoint (train, eval) split of a record list."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * fraction)) if fraction > 0 else 0
    if n_eval >= len(records):
        raise DataError(f"data.eval={fraction} leaves no training records out of {len(records)}.")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _bad_row(skip: bool, message: str, stats: TokenStats | None = None) -> None:
    if not skip:
        raise DataError(
            message + " Fix the record, or set data.skip_bad_rows=true to skip such rows."
        )
    if stats is not None:
        stats.skipped_bad += 1
        stats.first_bad = stats.first_bad or message


def _empty(rec: Record, what: str, policy: str, stats: TokenStats) -> bool:
    """Count an example with an empty completion; whether to drop it (``data.empty_completion``)."""
    stats.empty += 1
    stats.first_empty = stats.first_empty or rec.origin
    if policy == "error":
        raise DataError(
            f"{rec.origin}: empty {what}, so the model would learn to answer nothing; fill it in, "
            "or set data.empty_completion=drop (leave such examples out) or warn (train on them)."
        )
    if policy == "drop":
        stats.dropped_empty += 1
        return True
    return False


# Converters of formats that load as another one (``LOADS_AS``).
CONVERTERS = {"sharegpt": sharegpt_to_chat}


def convert_records(
    records: list[Record], fmt: str, skip_bad: bool, stats: TokenStats | None = None
) -> list[Record]:
    """Records of format ``fmt`` in the format they load as (ShareGPT -> chat)."""
    if fmt not in LOADS_AS:
        return records
    out = []
    for rec in records:
        try:
            out.append(CONVERTERS[fmt](rec))
        except DataError as e:
            _bad_row(skip_bad, str(e), stats)
    return out


def tokenize_records(
    records: list[Record],
    fmt: str,
    cfg: DataConfig,
    tokenizer: Any,
    template: str | None,
    skip_bad: bool,
) -> tuple[list[Example], TokenStats]:
    """Tokenised examples; a preference record gives two (chosen, rejected), kept adjacent."""
    stats = TokenStats()
    bos = adds_bos(tokenizer) and fmt not in ("chat", "preference")
    out = []
    for rec in records:
        try:
            if fmt == "preference":
                sides = render_pair(rec, tokenizer, template)
            else:
                sides = (render(rec, fmt, tokenizer, template, cfg.loss_on == "all"),)
        except DataError as e:
            _bad_row(skip_bad, str(e), stats)
            continue
        what = empty_completion(rec, fmt)
        if what is not None and _empty(rec, what, cfg.empty_completion, stats):
            continue
        examples = []
        for segments in sides:
            ex, truncated = tokenize_segments(
                segments, tokenizer, rec.origin, cfg.max_length, cfg.truncation, bos
            )
            stats.truncated += truncated
            if ex is None:
                stats.dropped_long += 1
                break
            if ex.n_supervised == 0:
                stats.dropped_unsupervised += 1
                why = (
                    f" after truncation to data.max_length={cfg.max_length}: the prompt fills it "
                    "(raise data.max_length, or set data.truncation=drop to leave such examples out)"
                    if truncated
                    else " (no completion or assistant turn to train, and no end token?)"
                )
                _bad_row(skip_bad, f"{rec.origin}: no supervised tokens{why}.")
                break
            examples.append(ex)
        if len(examples) != len(sides):
            continue
        if fmt == "preference" and np.array_equal(examples[0].input_ids, examples[1].input_ids):
            stats.dropped_unsupervised += 1
            _bad_row(
                skip_bad,
                f"{rec.origin}: 'chosen' and 'rejected' are identical, so the pair teaches nothing.",
            )
            continue
        for ex in examples:
            stats.add(ex)
        out.extend(examples)
    return out, stats


def _why_none(stats: TokenStats, cfg: DataConfig) -> str:
    """Why every record was left out, for the error that says none is left."""
    why = []
    if stats.skipped_bad:
        why.append(f"{stats.skipped_bad} malformed (first: {stats.first_bad})")
    if stats.dropped_long:
        why.append(
            f"{stats.dropped_long} longer than data.max_length={cfg.max_length} "
            "(data.truncation=drop; raise data.max_length or set data.truncation=truncate)"
        )
    if stats.dropped_empty:
        why.append(
            f"{stats.dropped_empty} with an empty completion (first: {stats.first_empty}; "
            "data.empty_completion=drop)"
        )
    if stats.dropped_unsupervised:
        why.append(f"{stats.dropped_unsupervised} with nothing to train")
    return ", ".join(why) or "the data has no records"


def preflight(examples: list[Example], tokenizer: Any, cfg: DataConfig, where: str) -> None:
    """Stop before training when the data would teach the model never to stop."""
    if not examples:
        raise DataError(f"{where}: no usable examples after tokenisation.")
    if cfg.loss_on == "all":
        return
    ends = end_token_ids(tokenizer)
    if not any(int(t) in ends for ex in examples for t in ex.labels if t >= 0):
        names = sorted(tokenizer.convert_ids_to_tokens(list(ends))) if ends else ["(none)"]
        raise DataError(
            f"{where}: the end-of-sequence / end-of-turn token ({', '.join(names)}) is never supervised, "
            "so the model would not learn to stop; check the chat template (data.template) or the "
            "tokenizer's eos_token."
        )


def check_padding(examples: list[Example], tokenizer: Any, where: str) -> None:
    """Padding must never hide a trained token: collate a real batch and count the labels.

    The classic failure is a collator that masks labels by ``input_ids == pad_token_id`` while the
    pad token equals EOS, so the model never learns to stop. tunesmith masks padding by position;
    this check proves it on the actual batch before training starts.
    """
    sample = examples[:8]
    batch = collate(sample, [[i] for i in range(len(sample))], tokenizer.pad_token_id)
    if batch.n_supervised != sum(ex.n_supervised for ex in sample):
        same = tokenizer.pad_token_id == tokenizer.eos_token_id
        raise DataError(
            f"{where}: padding masks trained tokens"
            + (" (the pad token equals EOS, so EOS is never trained)" if same else "")
            + "; give the tokenizer a distinct pad token."
        )


def prepare_data(
    cfg: DataConfig, tokenizer: Any, seed: int, kind: RecordKind = EXAMPLES
) -> PreparedData:
    """Read, split, render and tokenise the configured data; run the pre-flight check.

    The data must be of the task's record ``kind``; a record of k sides becomes k adjacent
    examples (preference pairs: [c0, r0, c1, r1, ...]).
    """
    records, report = read_records(cfg.train, cfg.split, cfg.skip_bad_rows)
    notes = []
    if isinstance(cfg.eval, float):
        train_records, eval_records = split_records(records, cfg.eval, seed)
    elif isinstance(cfg.eval, str):
        train_records = records
        eval_records, _ = read_records(cfg.eval, "validation", cfg.skip_bad_rows)
    else:
        train_records, eval_records = records, []
    if cfg.max_examples is not None:
        train_records = train_records[: cfg.max_examples]
    fmt = cfg.format
    if fmt == "auto":
        fits = [f for f in fitting_formats(train_records[0].fields) if f in kind.formats]
        fmt = fits[0] if fits else detect_format(train_records[0])
        loaded = f" (loaded as {LOADS_AS[fmt]})" if fmt in LOADS_AS else ""
        notes.append(
            f"format: auto chose '{fmt}'{loaded} from the fields {sorted(train_records[0].fields)}"
        )
    if LOADS_AS.get(fmt, fmt) not in kind.formats:
        raise ConfigError(
            f"data.format: '{fmt}' does not fit this task, which trains on {kind.describe}."
        )
    template = resolve_template(cfg.template, tokenizer)
    n_train = len(train_records)
    pre = TokenStats(skipped_bad=report.skipped, first_bad=report.first_problem)
    train_records = convert_records(train_records, fmt, cfg.skip_bad_rows, pre)
    eval_records = convert_records(eval_records, fmt, True)
    fmt = LOADS_AS.get(fmt, fmt)
    if not kind.tokenized:  # rows are produced while training (e.g. sampled responses)
        if not train_records:
            raise DataError(f"{cfg.train}: no records to train on.")
        return PreparedData(
            fmt, template, [], [], train_records, eval_records, pre, TokenStats(), notes
        )
    encode = kind.encode or tokenize_records  # a kind may encode its records itself
    train, stats = encode(train_records, fmt, cfg, tokenizer, template, cfg.skip_bad_rows)
    stats.skipped_bad += pre.skipped_bad
    stats.first_bad = pre.first_bad or stats.first_bad
    evals, eval_stats = encode(eval_records, fmt, cfg, tokenizer, template, True)
    if stats.skipped_bad:
        notes.append(f"skipped {stats.skipped_bad} malformed rows (first: {stats.first_bad})")
    if eval_stats.skipped_bad:
        notes.append(
            f"skipped {eval_stats.skipped_bad} malformed held-out rows (first: {eval_stats.first_bad})"
        )
    if not train:
        raise DataError(f"{cfg.train}: no usable examples: {_why_none(stats, cfg)}.")
    if kind.token_targets:
        preflight(train, tokenizer, cfg, cfg.train)
        check_padding(train, tokenizer, cfg.train)
    if stats.truncated:
        verb = "dropped" if cfg.truncation == "drop" else "truncated"
        notes.append(
            f"{stats.truncated} of {n_train} training examples exceed data.max_length={cfg.max_length} and were {verb}"
        )
    for which, s, n in (
        ("training", stats, len(train_records)),
        ("held-out", eval_stats, len(eval_records)),
    ):
        if s.empty and cfg.empty_completion == "drop":
            notes.append(
                f"dropped {s.dropped_empty} of {n} {which} records with an empty completion (first: {s.first_empty})"
            )
        elif s.empty:
            notes.append(
                f"warning: {s.empty} of {n} {which} records have an empty completion, so the "
                f"model learns to answer nothing there (first: {s.first_empty}); fill them in, or "
                "set data.empty_completion=drop or error"
            )
    return PreparedData(
        fmt, template, train, evals, train_records, eval_records, stats, eval_stats, notes
    )
