"""Tokenise rendered segments into inputs and next-token targets, with truncation counted.

An example of tokens ``x_0 .. x_{L-1}`` trains position t to predict ``x_{t+1}``; its target
``y_t = x_{t+1}`` if token t+1 is supervised, else -100 (ignored). Targets are shifted here,
per example, so that packing several examples into one row never asks the last token of one
example to predict the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.formats import Segment
from tunesmith.errors import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64, already shifted; IGNORE where not supervised
    origin: str
    extras: dict[str, float | int | np.ndarray] = field(default_factory=dict)
    """Per-example values a task attaches (a cached reference log-prob, a class label, ...):
    numbers are collated into ``Batch.extras`` for one-example rows; arrays (one row per scored
    position, e.g. a cached teacher's top-k) are concatenated in batch order, packed rows too."""
    token_types: np.ndarray | None = None
    """(L,) segment ids of a text pair (BERT's token_type_ids), when the tokenizer makes them."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class TokenStats:
    examples: int = 0
    tokens: int = 0
    supervised: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_unsupervised: int = 0
    skipped_bad: int = 0
    first_bad: str | None = None
    """The first malformed record skipped (``data.skip_bad_rows``), with why."""
    empty: int = 0
    """Examples with an empty completion (see ``data.empty_completion``), dropped or not."""
    dropped_empty: int = 0
    first_empty: str | None = None
    """``file:line`` of the first example with an empty completion."""
    lengths: list[int] = field(default_factory=list)

    def add(self, ex: Example) -> None:
        self.examples += 1
        self.tokens += len(ex)
        self.supervised += ex.n_supervised
        self.lengths.append(len(ex))


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize_segments(
    segments: list[Segment],
    tokenizer: Any,
    origin: str,
    max_length: int,
    truncation: str,
    bos: bool,
) -> tuple[Example | None, bool]:
    """(example, was_truncated); example is None when it is dropped for length."""
    ids: list[int] = [tokenizer.bos_token_id] if bos else []
    sup: list[bool] = [False] * len(ids)
    for seg in segments:
        toks = (
            seg.content
            if isinstance(seg.content, list)
            else tokenizer(seg.content, add_special_tokens=False)["input_ids"]
        )
        ids.extend(toks)
        sup.extend([seg.supervised] * len(toks))
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "error":
            raise DataError(
                f"{origin}: {len(ids)} tokens exceed data.max_length={max_length}; raise "
                "data.max_length or set data.truncation=truncate (cut) or drop (skip)."
            )
        if truncation == "drop":
            return None, True
        ids, sup = ids[:max_length], sup[:max_length]
    input_ids = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    if len(ids) > 1:
        nxt = input_ids[1:]
        labels[:-1] = np.where(np.asarray(sup[1:]), nxt, IGNORE)
    return Example(input_ids, labels, origin), truncated


def fingerprint_examples(h: Any, examples: list[Example]) -> None:
    """Feed the tokenised data (ids, targets, segment ids) of ``examples`` into the hash ``h``."""
    for ex in examples:
        h.update(ex.input_ids.tobytes())
        h.update(ex.labels.tobytes())
        if ex.token_types is not None:
            h.update(ex.token_types.tobytes())
