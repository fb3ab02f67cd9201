"""Rows, packing and batches.

A *row* is one or more examples laid end to end. Each example keeps its own position ids
(0, 1, 2, ... restarting at every example). A batch always carries an attention mask (1 for
real tokens); a packed batch does not pass it to the model: transformers then detects the
restarts in the position ids and builds a block-diagonal causal mask (or variable-length
attention with flash-attention), so no token attends across an example boundary and each
example's loss is the same packed or unpacked. Padding at the end of a row is its own block with
label -100.

The order of rows depends only on (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from tunesmith.console import say
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.errors import TunesmithError

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


def group_by_length(
    lengths: list[int],
    order: list[int],
    batch_size: int,
    rng: random.Random,
    window: int = 64,
) -> list[list[Row]]:
    """Batches of examples of similar length, for padded (unpacked) training.

    The shuffled ``order`` is cut into windows of ``window`` batches' worth of examples; each
    window is sorted by length and cut into batches, and all batches are shuffled. A batch is
    then padded only to the longest of similar lengths (little padding), while which examples
    meet in a batch, and the batch order, stay random. Each batch holds ``batch_size`` examples.
    """
    span = max(batch_size, 1) * window
    batches: list[list[Row]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [
            [[i] for i in chunk[k : k + batch_size]] for k in range(0, len(chunk), batch_size)
        ]
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    """What every task's step consumes. ``extras`` holds the fields a task declares (cached
    reference log-probs, class labels, teacher outputs, rollout masks and advantages, ...)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens, 0 for padding
    position_ids: torch.Tensor  # (B, T) restarting at every example
    labels: torch.Tensor | None  # (B, T) shifted next-token targets, IGNORE where unsupervised
    n_tokens: int  # real (non-pad) tokens
    packed: bool = False  # some row holds several examples
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    token_type_ids: torch.Tensor | None = None  # (B, T) segment ids of text pairs (BERT), if any
    sequence_ids: torch.Tensor | None = None
    """(B, T) the sequence whose target each position holds, when a row holds several sequences
    that share a prompt (``collate_shared``); None: each row is one sequence."""
    visible: torch.Tensor | None = None
    """(B, 1, T, T) bool, True where a query may see a key, for rows whose sequences share a
    prompt; passed to the model instead of ``attention_mask``."""
    n_sequences: int | None = None
    """Sequences in the batch when rows share prompts; None: one per row."""

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.position_ids),
            None if self.labels is None else move(self.labels),
            self.n_tokens,
            self.packed,
            {k: move(v) for k, v in self.extras.items()},
            None if self.token_type_ids is None else move(self.token_type_ids),
            None if self.sequence_ids is None else move(self.sequence_ids),
            None if self.visible is None else move(self.visible),
            self.n_sequences,
        )

    @property
    def n_supervised(self) -> int:
        return 0 if self.labels is None else int((self.labels != IGNORE).sum())

    @property
    def supervised(self) -> torch.Tensor:
        """(B, T) bool: positions with a next-token target."""
        return self.labels != IGNORE

    @property
    def sequences(self) -> int:
        """Sequences (scored responses, examples) in the batch: its rows, unless they share."""
        return self.input_ids.shape[0] if self.n_sequences is None else self.n_sequences

    def supervised_sequence(self) -> torch.Tensor:
        """(N,) the sequence of each supervised position, in the row-major order of
        ``supervised``: its row, or its entry of ``sequence_ids``."""
        if self.sequence_ids is None:
            return self.supervised.nonzero()[:, 0]
        return self.sequence_ids[self.supervised]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the root model's forward.

        A packed batch passes no attention mask: transformers then reads the example boundaries
        from the restarting position ids and builds a block-diagonal causal mask (padding at the
        end of a row is a block of its own, never attended to by real tokens). Rows whose
        sequences share a prompt pass their own 4-D mask (``visible``), which transformers takes
        as it is."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.visible is not None:
            inputs["attention_mask"] = self.visible
        elif not self.packed:
            inputs["attention_mask"] = self.attention_mask
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


def collate(examples: list[Example], rows: list[Row], pad_id: int) -> Batch:
    """Lay rows into a right-padded batch."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    types = None
    if all(examples[i].token_types is not None for row in rows for i in row):
        types = np.zeros((len(rows), width), dtype=np.int64)
    n_tokens = 0
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            ids[b, t : t + n] = ex.input_ids
            labels[b, t : t + n] = ex.labels
            pos[b, t : t + n] = np.arange(n)
            if types is not None:
                types[b, t : t + n] = ex.token_types
            t += n
        mask[b, :t] = 1
        n_tokens += t
        pos[b, t:] = np.arange(width - t)  # padding forms its own block
    extras = {}
    one_per_row = all(len(row) == 1 for row in rows)
    for key, value in examples[rows[0][0]].extras.items():
        if not all(key in examples[i].extras for row in rows for i in row):
            continue
        if isinstance(value, np.ndarray):  # rows per scored position: batch order, as labels[mask]
            parts = [examples[i].extras[key] for row in rows for i in row]
            extras[key] = torch.from_numpy(np.concatenate(parts))
        elif one_per_row:
            extras[key] = torch.tensor([examples[row[0]].extras[key] for row in rows])
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        torch.from_numpy(pos),
        torch.from_numpy(labels),
        n_tokens,
        packed=any(len(row) > 1 for row in rows),
        extras=extras,
        token_type_ids=None if types is None else torch.from_numpy(types),
    )


def shared_prefix(members: list[Example]) -> int:
    """How many leading tokens the ``members`` of a group (a preference pair) can share: those
    on which every member has the same token and no target (the prompt, less its last token,
    whose target is each member's first response token). Each member keeps at least one token
    of its own."""
    n = min(len(m) for m in members) - 1
    if n <= 0:
        return 0
    ids = np.stack([m.input_ids[:n] for m in members])
    labels = np.stack([m.labels[:n] for m in members])
    same = (ids == ids[0]).all(0) & (labels == IGNORE).all(0)
    return n if bool(same.all()) else int(np.argmin(same))


def _shared_length(members: list[Example], shared: int | None = None) -> int:
    """Tokens of the group's row: the shared prefix once, then each member's own tokens."""
    s = shared_prefix(members) if shared is None else shared
    return s + sum(len(m) - s for m in members)


def collate_shared(examples: list[Example], groups: list[int], size: int, pad_id: int) -> Batch:
    """Lay each group of ``size`` consecutive examples (a pair: chosen, rejected) into one row:
    the prefix its members share (``shared_prefix``) once, then each member's own tokens, with
    the position ids each token has in its own example and a mask in which a member's tokens see
    the prefix and themselves, never another member's (prefix sharing: Wang and Hegde 2024,
    "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305).

    Every token therefore has the hidden state, and every target the log-probability, it has in
    its own row (``collate``), while the prompt is computed once per group instead of once per
    member. ``sequence_ids`` names each target's example in the order ``collate`` would give
    its rows (all first members, then all second members, ...), so per-sequence sums and the
    objectives that read them are unchanged. ``n_tokens`` counts the members' tokens, as for
    separate rows. Padding queries see every real key before them (their output is unused)."""
    members = [[examples[size * gr + m] for m in range(size)] for gr in groups]
    shared = [shared_prefix(ms) for ms in members]
    lengths = [_shared_length(ms, s) for s, ms in zip(shared, members)]
    b, width = len(groups), max(lengths)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    seq = np.full((b, width), -1, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    visible = np.tril(np.ones((width, width), dtype=bool))[None].repeat(b, 0)
    types = None
    if all(m.token_types is not None for ms in members for m in ms):
        types = np.zeros((b, width), dtype=np.int64)
    for row, (s, ms) in enumerate(zip(shared, members)):
        first = ms[0]
        ids[row, :s], pos[row, :s] = first.input_ids[:s], np.arange(s)
        if types is not None:
            types[row, :s] = first.token_types[:s]
        t = s
        for k, m in enumerate(ms):
            n = len(m) - s
            ids[row, t : t + n], labels[row, t : t + n] = m.input_ids[s:], m.labels[s:]
            pos[row, t : t + n] = np.arange(s, len(m))
            seq[row, t : t + n] = k * b + row
            if types is not None:
                types[row, t : t + n] = m.token_types[s:]
            visible[row, t : t + n, s:t] = False  # the members before this one
            t += n
        mask[row, :t] = 1
        visible[row, :, t:] = False  # padding keys
        pos[row, t:] = np.arange(width - t)
    extras = {}
    for key, value in members[0][0].extras.items():
        if not all(key in m.extras for ms in members for m in ms):
            continue
        if isinstance(value, np.ndarray):  # per scored position, in the order of labels[mask]
            extras[key] = torch.from_numpy(
                np.concatenate([m.extras[key] for ms in members for m in ms])
            )
        else:
            extras[key] = torch.tensor([ms[k].extras[key] for k in range(size) for ms in members])
    return Batch(
        torch.from_numpy(ids),
        torch.from_numpy(mask),
        torch.from_numpy(pos),
        torch.from_numpy(labels),
        sum(len(m) for ms in members for m in ms),
        extras=extras,
        token_type_ids=None if types is None else torch.from_numpy(types),
        sequence_ids=torch.from_numpy(seq),
        visible=torch.from_numpy(visible)[:, None],
        n_sequences=b * size,
    )


class BatchSource(Protocol):
    """What the loop trains on: a replayable data set or a producer (e.g. rollouts).

    Either resumes exactly: the loop saves ``state_dict()`` in every checkpoint and hands it back
    to ``load_state_dict()`` before asking for ``stream()``."""

    def stream(self) -> Iterator[Batch]:
        """Micro-batches, without end, from the current position."""

    def micro_batches_per_epoch(self) -> int | None:
        """Length of one pass over the data (None for a producer: set train.max_steps)."""

    def epoch_of(self, micro_batch: int) -> float:
        """Fractional epoch reached after ``micro_batch`` micro-batches."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Batches:
    """The micro-batches of every epoch, reproducible from (seed, epoch): a replayable source."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        max_length: int,
        pad_id: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        group: int = 1,
        group_by_length: bool = False,
        share_prefix: bool = False,
        shareable: bool | None = None,
    ) -> None:
        """With ``group`` = k > 1, ``examples`` come in groups of k rows that stay together (a
        preference pair: chosen, rejected); the unit of order and batching is a group, and a
        batch of B groups has kB rows, all first members, then all second members, and so on.
        Groups are never packed. With ``share_prefix`` a group is one row instead, its prompt
        laid once (``collate_shared``), and batches are planned by those rows' lengths;
        ``shareable`` (default: ``share_prefix``) says whether that layout is possible at all, so
        that a resumed run can take its checkpoint's layout (``load_state_dict``).

        Unpacked and shuffled, ``group_by_length`` batches examples of similar length together
        (see ``group_by_length``)."""
        self.examples = examples
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.group = group
        self.packing = packing and group == 1
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.share_prefix = share_prefix and group > 1
        self.shareable = self.share_prefix if shareable is None else shareable and group > 1
        self.position = 0  # (global) micro-batches handed out so far
        self.rank, self.world = 0, 1
        self._plans: dict[int, list[list[Row]]] = {}
        self._lay_out(self.share_prefix)

    def _lay_out(self, share_prefix: bool) -> None:
        """Lay groups one per row or not, and plan batches by the rows' lengths: a group is as
        long as its shared row, or as its longest member."""
        self.share_prefix = share_prefix
        ex, g = self.examples, self.group
        self.lengths = [
            _shared_length(ex[i : i + g]) if share_prefix else max(len(e) for e in ex[i : i + g])
            for i in range(0, len(ex), g)
        ]
        self._plans.clear()

    def tokens_saved(self) -> float:
        """The fraction of the examples' tokens that groups in one row do not compute (0 when
        groups are not laid so)."""
        if not self.share_prefix:
            return 0.0
        return 1 - sum(self.lengths) / max(sum(len(e) for e in self.examples), 1)

    def shard(self, rank: int, world: int) -> None:
        """Hand this process (``rank`` of ``world``) its slice of every global micro-batch.

        A global micro-batch has ``batch_size x world`` rows, in the order one process with that
        batch size would see them; rank r takes the r-th of ``world`` near-equal contiguous
        slices, so the ranks' rows are disjoint and together are the global batch. Every rank
        plans the same batches, so all run the same number of steps. A last batch of an epoch
        with fewer rows than ranks is left out (with more ranks than rows, a rank would have
        nothing to compute)."""
        self.rank, self.world = rank, world
        self._plans.clear()

    @property
    def rows_per_micro(self) -> int:
        """Rows of one global micro-batch (every rank's together)."""
        return self.batch_size * self.world

    def plan(self, epoch: int) -> list[list[Row]]:
        """The (global) batches, lists of rows of group indices, of one epoch: every rank plans
        the same ones, of ``batch_size x world`` rows."""
        if epoch not in self._plans:
            order = list(range(len(self.lengths)))
            rng = random.Random(self.seed * 1_000_003 + epoch)
            if self.shuffle:
                rng.shuffle(order)
            else:  # evaluation: similar lengths together, less padding
                order.sort(key=lambda i: self.lengths[i])
            width = self.rows_per_micro
            if self.shuffle and not self.packing and self.group_by_length:
                plan = group_by_length(self.lengths, order, width, rng)
            else:
                rows = (
                    pack_rows(self.lengths, order, self.max_length)
                    if self.packing
                    else [[i] for i in order]
                )
                plan = [rows[k : k + width] for k in range(0, len(rows), width)]
            if self.world > 1 and plan and len(plan[-1]) < self.world:
                plan.pop()
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _slice(self, rows: list[Row]) -> list[Row]:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        if self.world == 1:
            return rows
        base, extra = divmod(len(rows), self.world)
        start = self.rank * base + min(self.rank, extra)
        return rows[start : start + base + (self.rank < extra)]

    def collate(self, rows: list[Row]) -> Batch:
        rows = self._slice(rows)
        g = self.group
        if self.share_prefix:
            return collate_shared(self.examples, [r[0] for r in rows], g, self.pad_id)
        if g > 1:
            rows = [[g * r[0] + m] for m in range(g) for r in rows]
        return collate(self.examples, rows, self.pad_id)

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches in the first epoch (later epochs differ by at most a few when packing)."""
        return len(self.plan(0))

    def one_pass(self) -> Iterator[Batch]:
        """The first epoch's micro-batches, once (evaluation)."""
        for rows in self.plan(0):
            yield self.collate(rows)

    def stream(self) -> Iterator[Batch]:
        """Micro-batches forever from ``position``, epoch after epoch."""
        epoch, seen = 0, 0
        while True:
            plan = self.plan(epoch)
            for k, rows in enumerate(plan):
                if seen + k >= self.position:
                    self.position += 1
                    yield self.collate(rows)
            seen += len(plan)
            epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "rows_per_micro": self.rows_per_micro,
            "world": self.world,
            "share_prefix": self.share_prefix,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``position`` micro-batches; a checkpoint written with another global
        micro-batch size (another ``batch_size x world``) is converted through the rows it had
        consumed, which must be exactly those of a whole number of the new micro-batches."""
        self.position = int(state["position"])
        saved = state.get("share_prefix", False)
        relaid = saved != self.share_prefix  # the layout decides the batches: take the saved one
        if relaid:
            if saved and not self.shareable:
                raise TunesmithError(
                    "--resume: the checkpoint's run laid each pair in one row "
                    "(data.share_prompt), which this model, method or device cannot do here; "
                    "resume it where it started (the same device, model and library versions)."
                )
            self._lay_out(saved)
        width, world = state.get("rows_per_micro", self.rows_per_micro), state.get("world", 1)
        if (width, world) != (self.rows_per_micro, self.world):
            self.position = self._convert(self.position, width, world)
        if relaid:
            say(
                "--resume: pairs laid as the checkpoint's run laid them ("
                + ("one row" if saved else "two rows")
                + " per pair), so the batches continue exactly"
            )

    def _convert(self, position: int, width: int, world: int) -> int:
        """The new position that has consumed the same rows as ``position`` did under the
        checkpoint's global batch (``width`` rows over ``world`` ranks)."""
        old = copy.copy(self)
        old.batch_size, old.world, old._plans = width // world, world, {}
        new, epoch = 0, 0
        while True:
            before, after = old.plan(epoch), self.plan(epoch)
            if position >= len(before):
                position -= len(before)
                new += len(after)
                epoch += 1
                continue
            done = sorted(tuple(r) for b in before[:position] for r in b)
            taken: list[tuple[int, ...]] = []
            k = 0
            while len(taken) < len(done) and k < len(after):
                taken.extend(tuple(r) for r in after[k])
                k += 1
            if sorted(taken) == done:
                return new + k
            raise TunesmithError(
                f"--resume: the checkpoint stopped {len(done)} rows into epoch {epoch}, which is "
                f"not a whole number of micro-batches of {self.rows_per_micro} rows (batch_size x "
                f"processes) in the same order; keep train.batch_size x train.grad_accum x "
                f"processes as they were, with a batch_size x processes "
                f"that divides {len(done)}."
            )

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
