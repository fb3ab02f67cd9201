"""Chunked log-probabilities equal the whole-logits ones, in value and in gradient."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.config import DataConfig
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.objectives import sft
from tunesmith.objectives.logps import chunked_logps, full_logps


def _grads(fn, h, w, weights):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = fn(h, w)
    (out * weights).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("uniform", [True, False])
def test_chunked_matches_full(uniform):
    """Uniform per-token weights (SFT) and per-row ones (DPO) both give the same gradients."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (37,), generator=g)
    weights = torch.full((37,), -0.25) if uniform else torch.randn(37, generator=g)
    ref = _grads(lambda h, w: full_logps(h @ w.t(), y), h, w, weights)
    got = _grads(lambda h, w: chunked_logps(h, w, y, chunk_elements=50 * 5), h, w, weights)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient():
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen (LoRA leaves the head alone)
    y = torch.randint(0, 20, (9,))
    chunked_logps(h, w, y, chunk_elements=40).sum().backward()
    assert h.grad is not None and w.grad is None


def test_objective_chunked_equals_whole(tiny_model, pc_data, monkeypatch):
    """The SFT loss and every parameter's gradient are the same with the head chunked."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare_data(DataConfig(train=str(pc_data), eval=None, max_length=64), tok, 0).train
    batch = next(Batches(data, 4, 64, tok.pad_token_id, packing=False, seed=0).stream())
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def loss_and_grads(chunk: int):
        model.zero_grad()
        monkeypatch.setattr(sft._logps, "CHUNK_ELEMENTS", chunk)
        loss, _ = sft.SFTObjective()(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, chunked = loss_and_grads(10**12), loss_and_grads(model.config.vocab_size * 3)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-5)
    for name, grad in whole[1].items():
        torch.testing.assert_close(chunked[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert sft._plain_head(model) is model.get_output_embeddings()  # it really took the chunks


def test_post_processed_logits_fall_back(tiny_model, pc_data, monkeypatch):
    """A model that changes its head's output (soft-capping here) is never chunked."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare_data(DataConfig(train=str(pc_data), eval=None, max_length=64), tok, 0).train
    batch = next(Batches(data, 4, 64, tok.pad_token_id, packing=False, seed=0).stream())
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: 5.0 * torch.tanh(o / 5.0))
    monkeypatch.setattr(sft._logps, "CHUNK_ELEMENTS", 10**12)
    whole = sft.supervised_token_logps(model, batch)
    got = sft.supervised_token_logps(model, batch, chunk_elements=model.config.vocab_size * 3)
    torch.testing.assert_close(got, whole)
    assert sft._plain_head(model) is None


def test_no_gradient_work_without_grad_mode():
    """Under no_grad (evaluation, a reference pass) the chunks compute log-probs only."""
    h, w = torch.randn(9, 8), torch.randn(20, 8, requires_grad=True)
    y = torch.randint(0, 20, (9,))
    with torch.no_grad():
        out = chunked_logps(h, w, y, chunk_elements=40)
    torch.testing.assert_close(out, full_logps(h @ w.detach().t(), y))
    assert not out.requires_grad


@pytest.mark.parametrize("chunk", [10**12, 3])
def test_older_transformers_positions_equal_mask(tiny_model, pc_data, monkeypatch, chunk):
    """Releases of transformers whose models take ``logits_to_keep`` only as positions kept in
    every row (5.17 and older) give the same supervised log-probs as the boolean mask, whole or
    chunked; so does a forward that takes no ``logits_to_keep`` at all."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare_data(DataConfig(train=str(pc_data), eval=None, max_length=64), tok, 0).train
    batch = next(Batches(data, 4, 64, tok.pad_token_id, packing=False, seed=0).stream())
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert sft._keep_mode(type(model)) == "mask"  # this install's transformers takes the mask
    chunk_elements = model.config.vocab_size * chunk if chunk < 100 else chunk
    want = sft.supervised_token_logps(model, batch, chunk_elements=chunk_elements)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True
    )
    for mode in ("positions", None):
        monkeypatch.setattr(sft, "_keep_mode", lambda cls, mode=mode: mode)
        got = sft.supervised_token_logps(model, batch, chunk_elements=chunk_elements)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen[0].dim() == 1 and seen[0].numel() < batch.supervised.shape[1]
    assert seen[1] is None
