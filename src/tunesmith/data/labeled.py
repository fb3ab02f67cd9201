"""Labelled text for sequence classification: ``{"text", "text_pair" (optional), "label"}``.

A record is encoded with the tokenizer's own single-sequence or pair layout (``[CLS] a [SEP] b
[SEP]`` with token type ids 0/1 for BERT; the plain concatenation for tokenizers without one),
and its class id rides along in ``Example.extras["label"]``. Labels are names or integer ids; the
class list (``data.labels``) is fixed before the model is built, from the config or else from the
training records (sorted names, or ``0..K-1`` for ids), so the classifier has the right width
and the saved model carries ``id2label`` / ``label2id``. A held-out label that training never saw
stops with the record's ``file:line``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.records import Record
from tunesmith.data.tokenize import IGNORE, Example, TokenStats
from tunesmith.errors import DataError


def _is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()  # CSV / TSV cells are strings


def labels_of(records: list[Record]) -> list[str]:
    """The class names found in ``records``: integer ids give ``["0", ..., "K-1"]`` (K = the
    largest id + 1), names give their sorted set."""
    values = []
    for rec in records:
        if "label" not in rec.fields or rec.fields["label"] is None:
            raise DataError(
                f"{rec.origin}: no 'label' field; labelled text needs 'text' and 'label'."
            )
        value = rec.fields["label"]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise DataError(
                f"{rec.origin}: 'label' must be a class name or an integer id, got {value!r}."
            )
        values.append(value)
    if all(_is_id(v) for v in values):
        return [str(i) for i in range(max(int(v) for v in values) + 1)]
    return sorted({str(v) for v in values})


def class_id(record: Record, labels: list[str], index: dict[str, int]) -> int:
    """The class id of ``record``'s label, or a one-line error naming the record."""
    value = record.fields.get("label")
    if value is None:
        raise DataError(f"{record.origin}: no 'label' field.")
    name = str(value).strip() if isinstance(value, str) else str(value)
    if name in index:
        return index[name]
    if _is_id(value) and int(value) < len(labels):
        return int(value)
    shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    raise DataError(
        f"{record.origin}: label {value!r} is not one of the {len(labels)} classes seen in "
        f"training ({shown}); fix the record, or list every class in data.labels."
    )


def _text(record: Record, key: str) -> str:
    value = record.fields[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{record.origin}: '{key}' must be a non-empty string, got {value!r}.")
    return value


def encode_labeled(
    records: list[Record],
    fmt: str,
    cfg: DataConfig,
    tokenizer: Any,
    template: str | None,
    skip_bad: bool,
) -> tuple[list[Example], TokenStats]:
    """Tokenise labelled records (no token targets: the class id is ``extras["label"]``)."""
    if cfg.labels is None:
        raise DataError("data.labels: the class list was not resolved before encoding.")
    labels = list(cfg.labels)
    index = {name: i for i, name in enumerate(labels)}
    stats = TokenStats()
    out = []
    for rec in records:
        if "text" not in rec.fields:
            raise DataError(
                f"{rec.origin}: no 'text' field; labelled text needs 'text' and 'label'."
            )
        label = class_id(rec, labels, index)  # never skipped: an unknown class is a config issue
        text = _text(rec, "text")
        pair = rec.fields.get("text_pair")
        pair = _text(rec, "text_pair") if pair not in (None, "") else None
        enc = tokenizer(text, pair, add_special_tokens=True)
        ids = enc["input_ids"]
        truncated = len(ids) > cfg.max_length
        if truncated:
            stats.truncated += 1
            if cfg.truncation == "error":
                raise DataError(
                    f"{rec.origin}: {len(ids)} tokens exceed data.max_length={cfg.max_length}; raise "
                    "data.max_length or set data.truncation=truncate (cut) or drop (skip)."
                )
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                continue
            enc = tokenizer(
                text,
                pair,
                add_special_tokens=True,
                truncation="longest_first",
                max_length=cfg.max_length,
            )
            ids = enc["input_ids"]
        input_ids = np.asarray(ids, dtype=np.int64)
        types = enc.get("token_type_ids")
        ex = Example(
            input_ids,
            np.full(len(ids), IGNORE, dtype=np.int64),
            rec.origin,
            extras={"label": label},
            token_types=None if types is None else np.asarray(types, dtype=np.int64),
        )
        stats.add(ex)
        out.append(ex)
    return out, stats
