"""From a data config to tokenised train / eval examples, statistics and the pre-flight check."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.batching import collate
from tunesmith.data.formats import detect_format, render, render_pair, resolve_template
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


def _bad_row(skip: bool, message: str) -> None:
    if not skip:
        raise DataError(
            message + " Fix the record, or set data.skip_bad_rows=true to skip such rows."
        )


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
        if fmt == "preference":
            sides = render_pair(rec, tokenizer, template)
        else:
            sides = (render(rec, fmt, tokenizer, template, cfg.loss_on == "all"),)
        if fmt == "preference" and any(
            not "".join(
                s.content for s in side if isinstance(s.content, str) and s.supervised
            ).strip()
            for side in sides
        ):
            stats.dropped_unsupervised += 1
            _bad_row(skip_bad, f"{rec.origin}: an empty response in the pair.")
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
                why = f" after truncation to data.max_length={cfg.max_length}" if truncated else ""
                _bad_row(
                    skip_bad,
                    f"{rec.origin}: no supervised tokens{why} (an empty completion or assistant turn?).",
                )
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
    if report.skipped:
        notes.append(f"skipped {report.skipped} malformed rows (first: {report.first_problem})")
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
        fmt = detect_format(train_records[0])
        notes.append(
            f"format: auto chose '{fmt}' from the fields {sorted(train_records[0].fields)}"
        )
    if fmt not in kind.formats:
        raise ConfigError(
            f"data.format: '{fmt}' does not fit this task, which trains on {kind.describe}."
        )
    template = resolve_template(cfg.template, tokenizer)
    if not kind.tokenized:  # rows are produced while training (e.g. sampled responses)
        if not train_records:
            raise DataError(f"{cfg.train}: no records to train on.")
        return PreparedData(
            fmt, template, [], [], train_records, eval_records, TokenStats(), TokenStats(), notes
        )
    train, stats = tokenize_records(train_records, fmt, cfg, tokenizer, template, cfg.skip_bad_rows)
    stats.skipped_bad = report.skipped
    evals, eval_stats = tokenize_records(eval_records, fmt, cfg, tokenizer, template, True)
    preflight(train, tokenizer, cfg, cfg.train)
    check_padding(train, tokenizer, cfg.train)
    if stats.truncated:
        verb = "dropped" if cfg.truncation == "drop" else "truncated"
        notes.append(
            f"{stats.truncated} of {len(train_records)} training examples exceed data.max_length={cfg.max_length} and were {verb}"
        )
    return PreparedData(
        fmt, template, train, evals, train_records, eval_records, stats, eval_stats, notes
    )
