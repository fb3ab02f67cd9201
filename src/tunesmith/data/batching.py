"""Rows, packing and batches.

A *row* is one or more examples laid end to end. Each example keeps its own position ids
(0, 1, 2, ... restarting at every example) and no attention mask is passed: transformers then
detects the restarts and builds a block-diagonal causal mask (or variable-length attention with
flash-attention), so no token attends across an example boundary and each example's loss is the
same packed or unpacked. Padding at the end of a row is its own block with label -100.

The order of rows depends only on (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.data.tokenize import IGNORE, Example

Row = list[int]  # indices into the example list


def pack_rows(
    lengths: list[int], order: list[int], max_length: int, open_rows: int = 64
) -> list[Row]:
    """First-fit packing of examples (in ``order``) into rows of at most ``max_length`` tokens.

    At most ``open_rows`` rows stay open; when more are needed the fullest is closed. This keeps
    packing O(n) while filling rows to ~95-99% on typical length mixes, and keeps the shuffled order
    roughly intact (examples only move within a window).
    """
    rows: list[Row] = []
    open_: list[tuple[int, Row]] = []  # (free space, row)
    for i in order:
        n = lengths[i]
        for k, (free, row) in enumerate(open_):
            if n <= free:
                row.append(i)
                open_[k] = (free - n, row)
                break
        else:
            if len(open_) >= open_rows:
                k = min(range(len(open_)), key=lambda j: open_[j][0])
                rows.append(open_.pop(k)[1])
            open_.append((max_length - n, [i]))
    rows.extend(row for _, row in open_)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) shifted targets, IGNORE where unsupervised
    position_ids: torch.Tensor  # (B, T) restarting at every example
    n_tokens: int  # real (non-pad) tokens
    ref_logps: torch.Tensor | None = None  # (B,) cached reference log-probs, one example per row

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.n_tokens,
            None if self.ref_logps is None else self.ref_logps.to(device),
        )

    @property
    def n_supervised(self) -> int:
        return int((self.labels != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids}


def collate(examples: list[Example], rows: list[Row], pad_id: int) -> Batch:
    """Lay rows into a right-padded batch."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            ids[b, t : t + n] = ex.input_ids
            labels[b, t : t + n] = ex.labels
            pos[b, t : t + n] = np.arange(n)
            t += n
        n_tokens += t
        pos[b, t:] = np.arange(width - t)  # padding forms its own block
    ref = None
    if all(len(row) == 1 and examples[row[0]].ref_logp is not None for row in rows):
        ref = torch.tensor([examples[row[0]].ref_logp for row in rows])
    return Batch(
        torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos), n_tokens, ref
    )


class Batches:
    """The micro-batches of every epoch, reproducible from (seed, epoch)."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        max_length: int,
        pad_id: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        pairs: bool = False,
    ) -> None:
        """With ``pairs``, ``examples`` alternate chosen / rejected and the unit of order and
        batching is a pair; a batch of B pairs has 2B rows, all chosen first, then all rejected,
        so both go through the model in one forward pass. Pairs are never packed."""
        self.examples = examples
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.pairs = pairs
        self.packing = packing and not pairs
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = [len(e) for e in examples]
        if pairs:  # a pair is as long as its longer side
            self.lengths = [
                max(self.lengths[i], self.lengths[i + 1]) for i in range(0, len(examples), 2)
            ]
        self._plans: dict[int, list[list[Row]]] = {}

    def plan(self, epoch: int) -> list[list[Row]]:
        """The batches (lists of rows) of one epoch."""
        if epoch not in self._plans:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            else:  # evaluation: similar lengths together, less padding
                order.sort(key=lambda i: self.lengths[i])
            rows = (
                pack_rows(self.lengths, order, self.max_length)
                if self.packing
                else [[i] for i in order]
            )
            self._plans[epoch] = [
                rows[k : k + self.batch_size] for k in range(0, len(rows), self.batch_size)
            ]
        return self._plans[epoch]

    def collate(self, rows: list[Row]) -> Batch:
        if self.pairs:
            rows = [[2 * r[0]] for r in rows] + [[2 * r[0] + 1] for r in rows]
        return collate(self.examples, rows, self.pad_id)

    def __len__(self) -> int:
        """Micro-batches in the first epoch (later epochs differ by at most a few when packing)."""
        return len(self.plan(0))

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Micro-batches forever, skipping the first ``start`` (for resume), epoch after epoch."""
        epoch, seen = 0, 0
        while True:
            plan = self.plan(epoch)
            for k, rows in enumerate(plan):
                if seen + k >= start:
                    yield self.collate(rows)
            seen += len(plan)
            epoch += 1

    def epoch_of(self, micro_batch: int) -> float:
        """Fractional epoch reached after ``micro_batch`` micro-batches."""
        epoch, seen = 0, 0
        while True:
            n = len(self.plan(epoch))
            if micro_batch < seen + n:
                return epoch + (micro_batch - seen) / n
            seen += n
            epoch += 1

    def packing_efficiency(self) -> float:
        """Real tokens / (rows x padded width) over the first epoch."""
        real = padded = 0
        for rows in self.plan(0):
            widths = [sum(self.lengths[i] for i in row) for row in rows]
            real += sum(widths)
            padded += max(widths) * len(widths)
        return real / max(padded, 1)
