"""Causal attention over query blocks (methods/fused_attention.py) against PyTorch's
``scaled_dot_product_attention`` and against a model that uses ``sdpa``."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import small_decoder
from transformers import Qwen2ForCausalLM

from tunesmith.methods import fused_attention
from tunesmith.methods.fused_attention import BlockCausalAttention, fuse_attention

F64 = {"dtype": torch.float64}
AS_SHIPPED = dict(fused_attention.DTYPES)


@pytest.fixture(autouse=True)
def float64_too(monkeypatch):
    """The node takes bf16 work only (where it is the faster kernel); these tests check its maths
    through the model in float64 as well."""
    monkeypatch.setattr(fused_attention, "DTYPES", {**AS_SHIPPED, torch.float64: 2})


def qkv(batch, heads, kv_heads, length, dim, dtype=torch.float64, seed=0):
    """q, k, v as transformers hands them over: (B, H, T, d) views of (B, T, H, d) tensors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)]


def padding_mask(lengths, length):
    """transformers' boolean mask for right-padded rows: causal and not padding, (B, 1, T, T)."""
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return torch.ones(length, length, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]


def assert_equal_with_gradients(got, ref, real, inputs):
    """``got`` equals ``ref`` in float64 on the ``real`` query rows, and so do the gradients of
    ``inputs`` under a random upstream gradient on those rows."""
    upstream = torch.randn(got.shape, **F64) * real
    torch.testing.assert_close(got * real, ref * real, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad((got * upstream).sum(), inputs)
    theirs = torch.autograd.grad((ref * upstream).sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("length", [1 + 1, 37, 64, 150])
@pytest.mark.parametrize("padded", [None, "lengths", "mask"])
@pytest.mark.parametrize("keep", [True, False])
def test_node_equals_sdpa_with_gradients(length, padded, keep):
    """Output and the gradients of q, k and v equal SDPA's in float64 (grouped-query heads, rows
    shorter and longer than a block, right padding given as row lengths or as the boolean mask;
    padded query rows are not compared), whether ``P`` is kept or recomputed."""
    q, k, v = qkv(3, 4, 2, length, 8)
    lengths = (length, max(1, length // 2), 1)
    mask = padding_mask(list(lengths), length) if padded else None
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
    ).transpose(1, 2)
    blocked = ~mask if padded == "mask" else None
    got = BlockCausalAttention.apply(
        q, k, v, blocked, lengths if padded == "lengths" else None, 8**-0.5, keep
    )
    real = torch.ones(3, length, 1, 1, **F64)
    if padded:
        real = mask[:, 0].diagonal(dim1=1, dim2=2)[:, :, None, None].to(F64["dtype"])
    assert_equal_with_gradients(got, ref, real, (q, k, v))


def shared_rows_mask(rows, length):
    """A mask like ``collate_shared``'s: per row (prefix, first response, second response), the
    second response's queries hidden from the first response's keys, right padding after."""
    mask = torch.ones(len(rows), 1, length, length, dtype=torch.bool).tril()
    for b, (p, c, r) in enumerate(rows):
        mask[b, 0, p + c : p + c + r, p : p + c] = False
        mask[b, 0, :, p + c + r :] = False
    return mask


@pytest.mark.parametrize("keep", [True, False])
def test_rows_sharing_a_prompt_are_read_as_rectangles_and_equal_sdpa(keep):
    """A mask whose rows share a prompt (each second response hidden from the first) is read as
    row lengths plus one hidden rectangle per row (filled only there), and the node then equals
    SDPA with that mask in float64, output and gradients, on rows across several blocks."""
    rows, length = [(30, 70, 90), (5, 1, 40), (0, 20, 30)], 190
    mask = shared_rows_mask(rows, length)
    ok, blocked, lengths, spans = fused_attention._node_mask(mask, length)
    assert ok and blocked is None and lengths == (190, 46, 50)
    assert spans == ((0, 100, 190, 30, 100), (1, 6, 46, 5, 6), (2, 20, 50, 0, 20))
    q, k, v = qkv(3, 4, 2, length, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    got = BlockCausalAttention.apply(q, k, v, None, lengths, 8**-0.5, keep, spans)
    real = mask[:, 0].diagonal(dim1=1, dim2=2)[:, :, None, None].to(F64["dtype"])
    assert_equal_with_gradients(got, ref, real, (q, k, v))


def test_hidden_entries_that_are_no_rectangle_keep_the_whole_mask():
    """Hidden entries that are not one rectangle left of its queries per row (two rectangles, or
    one touching the diagonal) are not read as spans: the node takes the whole mask."""
    mask = shared_rows_mask([(2, 10, 10)], 30)
    mask[0, 0, 25, 0] = False  # a second, separate hidden entry
    ok, blocked, lengths, spans = fused_attention._node_mask(mask, 30)
    assert ok and lengths is None and spans is None and torch.equal(blocked, ~mask)
    mask = shared_rows_mask([(2, 10, 10)], 30)
    mask[0, 0, 12:22, 12] = False  # the rectangle now reaches its first query's own key
    assert fused_attention._node_mask(mask, 30)[3] is None


@pytest.mark.parametrize("keep", [True, False])
def test_node_passes_gradcheck(keep):
    q, k, v = qkv(1, 2, 1, 70, 4)  # two blocks
    assert torch.autograd.gradcheck(
        lambda q, k, v: BlockCausalAttention.apply(q, k, v, None, None, 0.5, keep), (q, k, v)
    )


@pytest.mark.parametrize("keep", [True, False])
def test_rows_that_see_no_key_give_zero_not_nan(keep):
    """Left padding: the first query rows see no key. They come out as zeros, and nothing else
    turns NaN (forward or backward)."""
    q, k, v = qkv(2, 2, 2, 9, 4)
    real = torch.arange(9)[None, :] >= torch.tensor([0, 4])[:, None]
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    out = BlockCausalAttention.apply(q, k, v, ~mask, None, 0.5, keep)
    assert torch.isfinite(out).all() and out[1, :4].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_call_under_fake_tensors_leaves_later_calls_alone():
    """Nothing a call builds outlives it: a call under a fake tensor mode (shape tracing) does not
    leave a fake mask behind for the real calls after it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t.detach()) for t in qkv(1, 2, 1, 70, 4)]
        BlockCausalAttention.apply(*fake, None, None, 0.5)
    q, k, v = qkv(1, 2, 1, 70, 4)
    BlockCausalAttention.apply(q, k, v, None, None, 0.5).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bf16_close_to_sdpa():
    """In bf16 the node rounds where the flash kernel rounds: P and dS for their products."""
    q, k, v = qkv(4, 8, 2, 200, 64, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    got = BlockCausalAttention.apply(q, k, v, None, None, 64**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.02, atol=0.02)
    upstream = torch.randn(got.shape).bfloat16()
    ours = torch.autograd.grad((got.float() * upstream).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref.float() * upstream).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.abs().max())


def node_calls(monkeypatch) -> list:
    """A list that gets one entry per call of the node."""
    calls = []
    node = BlockCausalAttention.apply
    monkeypatch.setattr(BlockCausalAttention, "apply", lambda *a: calls.append(1) or node(*a))
    return calls


def qwen2(seed=0):
    model = small_decoder(Qwen2ForCausalLM, seed)
    model.set_attn_implementation("sdpa")
    return model.double()


def test_model_with_the_node_equals_sdpa_model(monkeypatch, tmp_path):
    """A Qwen2 model's loss, logits on real tokens and every gradient equal the ``sdpa`` model's,
    with right padding; the node ran in every layer; greedy generation (a cache: ``sdpa``) is
    unchanged; the saved config names no tunesmith attention."""
    model = qwen2()
    reference = copy.deepcopy(model)
    assert fuse_attention(model) and model.config._attn_implementation == fused_attention.NAME
    assert reference.config._attn_implementation == "sdpa"
    calls = node_calls(monkeypatch)
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = {}
    for name, m in (("node", model), ("sdpa", reference)):
        res = m(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        out[name] = (res.loss, res.logits * mask[..., None])
    assert len(calls) == 2  # both layers
    torch.testing.assert_close(out["node"], out["sdpa"], rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    prompt = ids[:1, :5]
    kw = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(prompt, **kw), reference.generate(prompt, **kw))
    model.save_pretrained(tmp_path)
    assert fused_attention.NAME not in (tmp_path / "config.json").read_text()
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_sdpa_runs_where_the_node_does_not_apply(monkeypatch):
    """A mask that lets a query see a later key, dropout in training, rows past MAX_TOKENS, and
    a model not on ``sdpa`` all keep SDPA's result."""
    calls = node_calls(monkeypatch)
    model = qwen2()
    fuse_attention(model)
    attn = model.model.layers[0].self_attn
    q, k, v = qkv(1, 4, 2, 12, 8)
    bidirectional = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    got, _ = fused_attention.attention_forward(attn, q, k, v, bidirectional)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref)
    attn.train()
    fused_attention.attention_forward(attn, q, k, v, None, dropout=0.1)
    monkeypatch.setattr(fused_attention, "MAX_TOKENS", 8)
    fused_attention.attention_forward(attn, q, k, v, None)
    assert calls == []
    monkeypatch.setattr(fused_attention, "MAX_TOKENS", 1024)
    fused_attention.attention_forward(attn, q, k, v, None)
    assert calls == [1]
    eager = qwen2()
    eager.set_attn_implementation("eager")
    assert not fuse_attention(eager) and eager.config._attn_implementation == "eager"


def test_under_autocast_as_sdpa_under_autocast():
    """Under bf16 autocast, q and k come out of RoPE in float32 and v in bf16: the node takes
    all three in bf16, as SDPA does under autocast, and the model's loss stays close."""
    model = qwen2().float()
    reference = copy.deepcopy(model)
    fuse_attention(model)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0.1, atol=0.1 * q.grad.abs().max())


def test_encoders_keep_sdpa_and_long_windows_take_the_node(monkeypatch):
    """A BERT encoder (no causal attention) is left on ``sdpa``; a sliding window at least as
    long as the row changes nothing, so the node runs; a shorter one keeps SDPA."""
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            attn_implementation="sdpa",
        )
    )
    assert not fuse_attention(bert) and bert.config._attn_implementation == "sdpa"
    calls = node_calls(monkeypatch)
    model = qwen2()
    fuse_attention(model)
    attn = model.model.layers[0].self_attn
    q, k, v = qkv(1, 4, 2, 12, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    long, _ = fused_attention.attention_forward(attn, q, k, v, None, sliding_window=12)
    assert calls == [1]
    torch.testing.assert_close(long, ref)
    fused_attention.attention_forward(attn, q, k, v, None, sliding_window=4)
    assert calls == [1]


def test_float32_work_takes_the_node_from_its_shortest_row(monkeypatch):
    """In float32 the flash kernel is as fast on short rows: a float32 call keeps SDPA below
    ``DTYPES[float32]`` tokens and takes the node from there; bf16 (as the inputs' dtype or
    autocast's) takes the node at any length from 2."""
    monkeypatch.setattr(fused_attention, "DTYPES", AS_SHIPPED)
    calls = node_calls(monkeypatch)
    attn = qwen2().model.layers[0].self_attn
    shortest = AS_SHIPPED[torch.float32]
    for length, expected in ((12, []), (shortest - 1, []), (shortest, [1])):
        calls.clear()
        q, k, v = qkv(1, 4, 2, length, 8, dtype=torch.float32)
        out, _ = fused_attention.attention_forward(attn, q, k, v, None)
        assert calls == expected and out.dtype == torch.float32
    calls.clear()
    q, k, v = qkv(1, 4, 2, 12, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fused_attention.attention_forward(attn, q, k, v, None)
    assert calls == [1] and out.dtype == torch.bfloat16
    low = [t.detach().bfloat16() for t in (q, k, v)]
    fused_attention.attention_forward(attn, *low, None)
    assert calls == [1, 1]


def test_training_calls_keep_p_up_to_keep_tokens(monkeypatch):
    """A call that trains keeps ``P`` for rows up to its dtype's ``KEEP_TOKENS`` (twice that for
    rows that hold a pair sharing its prompt), and recomputes it for longer rows and dtypes
    without an entry (float32); a call without gradients (a reference model's forward) keeps
    nothing."""
    keeps = []
    node = BlockCausalAttention.apply
    monkeypatch.setattr(BlockCausalAttention, "apply", lambda *a: keeps.append(a[6]) or node(*a))
    monkeypatch.setattr(fused_attention, "KEEP_TOKENS", {torch.float64: 100})
    attn = qwen2().model.layers[0].self_attn
    for length in (100, 101):
        out, _ = fused_attention.attention_forward(attn, *qkv(1, 4, 2, length, 8), None)
        blocks = len(fused_attention._blocks(length))
        kept = len(out.grad_fn.saved_tensors) - 4  # after q, k, v and the mask (None here)
        assert kept == (blocks if length <= 100 else 0)
    with torch.no_grad():
        fused_attention.attention_forward(attn, *qkv(1, 4, 2, 100, 8), None)
    shortest = fused_attention.DTYPES[torch.float32]
    fused_attention.attention_forward(attn, *qkv(1, 4, 2, shortest, 8, torch.float32), None)
    for length in (200, 201):  # a row holding a pair that shares its prompt: twice as long
        mask = shared_rows_mask([(20, 80, length - 100)], length)
        fused_attention.attention_forward(attn, *qkv(1, 4, 2, length, 8), mask)
    assert keeps == [True, False, False, False, True, False]


def test_right_padding_masks_become_row_lengths():
    """transformers' mask for right-padded rows is read as row lengths (only the padded keys'
    columns are then filled); left padding, a bidirectional mask or a float mask are not."""
    right = padding_mask([5, 3], 5)
    assert fused_attention._node_mask(right, 5)[1:] == (None, (5, 3), None)
    assert fused_attention._node_mask(None, 5) == (True, None, None, None)
    real = torch.arange(5)[None, :] >= torch.tensor([0, 2])[:, None]
    left = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    ok, blocked, lengths, spans = fused_attention._node_mask(left, 5)
    assert ok and lengths is None and spans is None and torch.equal(blocked, ~left)
    assert not fused_attention._node_mask(torch.ones(1, 1, 5, 5, dtype=torch.bool), 5)[0]
    assert not fused_attention._node_mask(torch.zeros(1, 1, 5, 5), 5)[0]


def test_the_mask_is_read_once_per_forward(monkeypatch):
    """Every layer gets the same mask tensor: it is read once; a changed or new mask is read
    again."""
    reads = []
    read = fused_attention._read_mask
    monkeypatch.setattr(fused_attention, "_read_mask", lambda m, n: reads.append(1) or read(m, n))
    mask = padding_mask([6, 4], 6)
    first = fused_attention._node_mask(mask, 6)
    assert fused_attention._node_mask(mask, 6) == first and reads == [1]
    mask[1, 0, 2, 2] = False  # changed in place: read again, no longer plain right padding
    ok, blocked, lengths, spans = fused_attention._node_mask(mask, 6)
    assert reads == [1, 1] and lengths is None and torch.equal(blocked, ~mask)
    fused_attention._node_mask(padding_mask([6, 4], 6), 6)
    assert reads == [1, 1, 1]


@pytest.mark.parametrize("logit_scale", [1.0, 3.0])
def test_bf16_error_close_to_the_flash_kernels(logit_scale):
    """Against float64 attention on the same bf16 inputs, the node's bf16 output and gradients are
    within 1.4x the flash kernel's errors (the gradients' fall below them where the logits are
    large: ``logit_scale`` 3 makes their spread ~9)."""
    q, k, v = (t.detach() for t in qkv(4, 8, 2, 200, 64, seed=3))
    low = [(t * s).bfloat16() for t, s in zip((q, k, v), (logit_scale, logit_scale, 1.0))]
    upstream = torch.randn(4, 200, 8, 64, generator=torch.Generator().manual_seed(4))

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in low]
        out = fn(*inputs)
        grads = torch.autograd.grad((out.double() * upstream.double()).sum(), inputs)
        return [out.detach().double(), *(g.double() for g in grads)]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(
            1, 2
        )

    exact = run(sdpa, torch.float64)
    flash = run(sdpa, torch.bfloat16)
    node = run(
        lambda q, k, v: BlockCausalAttention.apply(q, k, v, None, None, 64**-0.5), torch.bfloat16
    )

    def error(x, ref):
        return float((x - ref).norm() / ref.norm())

    assert error(node[0], exact[0]) <= 1.4 * error(flash[0], exact[0])
    for ours, theirs, ref in zip(node[1:], flash[1:], exact[1:]):
        assert error(ours, ref) <= 1.4 * error(theirs, ref)


def test_float64_model_under_autocast_stays_float64():
    """Autocast leaves float64 alone, and so do the nodes: a float64 model run under bf16
    autocast with every node installed computes in float64, as without them."""
    model = qwen2()
    reference = copy.deepcopy(model)
    from tunesmith.methods.fused_lora import fuse_linear

    fuse_attention(model)
    fuse_linear(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert got.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
