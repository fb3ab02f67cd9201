"""Supervised fine-tuning objective: next-token cross-entropy on supervised tokens.

    L = -(1/N) * sum_{t in S} log p_theta(y_t | x_<=t)

where S is the set of supervised positions over *all* micro-batches of an optimiser step and
N = |S|. The objective returns the sum over one micro-batch; the loop divides by N, so batch 8 x
accumulation 1 and batch 1 x accumulation 8 give the same gradient.

Speed: logits are computed only at supervised positions, so prompt tokens cost no vocabulary
projection. The objective calls the root model's forward (the object DDP or FSDP would wrap) with
``logits_to_keep`` set to the (B, T) boolean mask of supervised positions; transformers then
applies the LM head (and any logit post-processing of the model: soft-capping, scaling) to those
positions only and returns (N, V) logits. Releases of transformers before the boolean mask (5.17
and older: their models index ``hidden[:, logits_to_keep]``) get the 1-D tensor of positions
supervised in any row instead, and the (B, P, V) result is narrowed to the mask; a model whose
forward takes no ``logits_to_keep`` returns (B, T, V) logits, from which the same positions are
taken.

Memory: when the supervised positions times the vocabulary exceed ``logps.CHUNK_ELEMENTS`` and
the output head is a plain bias-free linear layer whose output the model returns unchanged, the
head's forward is swapped for the identity during the call, so the root forward returns the
(N, H) final hidden states, and ``logps.chunked_logps`` computes the log-probabilities a chunk
of rows at a time (never the whole (N, V) logits; see that module for the maths).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import Batch, collate, collate_shared
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.objectives import logps as _logps

_POSTPROCESSED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Heads whose model changes the head's output (soft-capping, scaling): never chunked."""


@functools.cache
def _keep_mode(cls: type) -> str | None:
    """How a model class's forward takes ``logits_to_keep``: ``mask`` (a (B, T) boolean mask,
    through transformers' ``slice_logits_to_keep``), ``positions`` (a 1-D tensor of positions
    kept in every row: what every release since the argument appeared accepts), or None."""
    if "logits_to_keep" not in inspect.signature(cls.forward).parameters:
        return None
    module = sys.modules.get(cls.__module__)
    return "mask" if hasattr(module, "slice_logits_to_keep") else "positions"


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return _keep_mode(type(getattr(model, "module", model))) is not None


def keep_positions(
    model: nn.Module, mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``logits_to_keep`` for the root forward so that it projects little more than the ``mask``
    (B, T) positions, and the function that takes those rows, in row-major order, from what the
    forward returns ((N, X) from a (B, T, X), (B, P, X) or already (N, X) output)."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module; FSDP2 does not wrap
    mode = _keep_mode(type(inner))
    if mode == "mask":
        return {"logits_to_keep": mask}, lambda out: out if out.dim() == 2 else out[mask]
    if mode == "positions":
        cols = mask.any(0).nonzero().squeeze(1)
        sub = mask[:, cols]
        return {"logits_to_keep": cols}, lambda out: out[sub]
    return {}, lambda out: out[mask]


def supervised_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at supervised positions (N, V), their targets (N,)), from the root forward."""
    mask = batch.supervised  # (B, T)
    targets = batch.labels[mask]  # (N,)
    kwargs, take = keep_positions(model, mask)
    logits = take(model(**batch.model_inputs(), use_cache=False, **kwargs).logits)
    return logits, targets  # (N, V), (N,)


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head if it is a plain bias-free ``nn.Linear`` with an ordinary weight (not
    sharded, not wrapped by a method) that the model is not known to post-process; else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or type(head.weight.data) is not torch.Tensor
        or head in _POSTPROCESSED
    ):
        return None
    return head


def supervised_token_logps(
    model: nn.Module, batch: Batch, chunk_elements: int | None = None
) -> torch.Tensor:
    """log p of every supervised target token (N,), in row-major order of ``batch.supervised``.

    Small (N x V) problems take the whole logits at once; large ones with a plain head go
    through ``logps.chunked_logps`` (see the module docstring)."""
    chunk_elements = _logps.CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    mask = batch.supervised
    inner = getattr(model, "module", model)
    head = _plain_head(inner) if _accepts_logits_to_keep(model) else None
    if head is None or int(mask.sum()) * head.out_features <= chunk_elements:
        return _logps.full_logps(*supervised_logits(model, batch))
    captured: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        captured.append(x)
        return x

    head.forward = capture  # the root forward runs (DDP hooks and all) but skips the projection
    kwargs, take = keep_positions(model, mask)
    try:
        out = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
    finally:
        del head.forward
    hidden = captured[0]
    if out is not hidden and not (out.dtype == hidden.dtype and torch.equal(out, hidden)):
        _POSTPROCESSED.add(head)  # the model changes its logits after the head: do it whole
        return _logps.full_logps(*supervised_logits(model, batch))
    hidden = take(hidden)
    return _logps.chunked_logps(hidden, head.weight, batch.labels[mask], chunk_elements)


class SFTObjective:
    """Token-level cross-entropy; the step is normalised by supervised tokens."""

    name = "sft"

    def count(self, batch: Batch) -> int:
        return batch.n_supervised

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return -supervised_token_logps(model, batch).sum(), {}


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (a row, or a member of a row that shares its prompt): (sum of log p of its
    supervised tokens (R,), number of them (R,)).

    For preference pairs a sequence is one response with its prompt:
    log pi(y | x) = sum_t log pi(y_t | x, y_<t).
    """
    token_logps = supervised_token_logps(model, batch)  # (N,)
    seqs = batch.supervised_sequence()  # (N,) sequence of each supervised token
    n = batch.sequences
    sums = torch.zeros(n, device=token_logps.device).index_add(0, seqs, token_logps)
    counts = torch.zeros(n, device=token_logps.device).index_add(
        0, seqs, torch.ones_like(token_logps)
    )
    return sums, counts


LOCAL_SPANS = (("sliding_window", "sliding"), ("attention_chunk_size", "chunked"))
"""Config fields that limit some layers' attention to nearby keys, each with the word its
layers carry in ``layer_types``: a sliding window (Mistral, Gemma, Phi3, ...) and chunks
(Llama 4)."""


def _local_span(model: nn.Module) -> int | None:
    """The shortest span some attention layer of the model is limited to (a sliding window, or
    chunks), or None if every layer sees every earlier key."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(config, "layer_types", None)
    spans = []
    for field_name, word in LOCAL_SPANS:
        span = getattr(config, field_name, None)
        if not isinstance(span, int) or span <= 0:
            continue
        if kinds is not None:
            used = any(word in str(k) for k in kinds)
        else:  # older configs: a window applies unless switched off
            used = getattr(config, "use_sliding_window", True)
        if used:
            spans.append(span)
    return min(spans, default=None)


@torch.no_grad()
def scores_shared_rows(model: nn.Module, longest: int) -> bool:
    """Whether ``model`` gives a pair laid in one row with its prompt shared
    (``batching.collate_shared``) the same sequence log-probs as the pair in two rows, for
    examples of up to ``longest`` tokens. No attention layer may be limited to a span shorter
    than ``longest`` (a sliding window, chunks): transformers takes a 4-D mask as given for
    those layers too, so the limit would be lost in a shared row (where a tiny pair cannot show
    it). And it must take the 4-D mask as given and place tokens by the position ids: checked on
    a tiny random pair, in the model's own dtype, with dropout off. Any error in either check
    (a model that rejects the mask, a config that cannot be read) fails it."""
    try:
        return _scores_shared_rows(model, longest)
    except Exception:  # a model that cannot run a shared row at all: keep separate rows
        return False


def _scores_shared_rows(model: nn.Module, longest: int) -> bool:
    span = _local_span(model)
    if span is not None and span < longest:
        return False
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None:
        return False
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(emb.num_embeddings, (5,), generator=gen).numpy()
    pair = []
    for n in (3, 4):
        ids = np.concatenate(
            [prompt, torch.randint(emb.num_embeddings, (n,), generator=gen).numpy()]
        )
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[len(prompt) - 1 : -1] = ids[len(prompt) :]
        pair.append(Example(ids, labels, "probe"))
    was_training = model.training
    model.eval()
    try:
        apart, _ = sequence_logps(model, collate(pair, [[0], [1]], 0).to(weight.device))
        shared, _ = sequence_logps(model, collate_shared(pair, [0], 2, 0).to(weight.device))
    finally:
        model.train(was_training)
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    return bool(torch.allclose(apart.float(), shared.float(), rtol=0, atol=tolerance))
