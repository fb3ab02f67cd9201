"""Rollouts (training/rollout.py): the KV-cache loop equals full forward passes, for every method;
greedy equals transformers' generate; stopping and masking at the end token; exact resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.data.dataset import end_token_ids
from tunesmith.methods import build_method, method_config, method_names
from tunesmith.training.rollout import (
    encode_prompts,
    positions_from_mask,
    response_logps,
    rollout,
    sample_tokens,
)

PROMPTS = ["What is 12 plus 7?", "Hi", "A longer prompt, to pad the others on the left."]


def policy(path, name):
    """A model with ``name`` applied and its weights moved off their initial values."""
    torch.manual_seed(0)
    method = build_method(method_config(name))
    model = method.apply(AutoModelForCausalLM.from_pretrained(path))
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, method


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def seeded(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_cache_equals_no_cache(llama, tok, name, temperature, top_p):
    """Same tokens with and without the key/value cache, greedy and seeded sampling, on a
    left-padded batch, with every method applied (prefix and prompt act through the cache)."""
    model, _ = policy(llama, name)
    kw = dict(max_new_tokens=10, temperature=temperature, top_p=top_p)
    cached = rollout(model, tok, PROMPTS, generator=seeded(), use_cache=True, **kw)
    full = rollout(model, tok, PROMPTS, generator=seeded(), use_cache=False, **kw)
    assert torch.equal(cached.response_ids, full.response_ids)
    assert torch.equal(cached.response_mask, full.response_mask)
    torch.testing.assert_close(cached.logps, full.logps, rtol=1e-4, atol=1e-5)
    assert cached.completions == full.completions
    assert cached.prompt_mask[:, 0].tolist() == [0, 0, 1]  # the batch really is left-padded


@pytest.mark.parametrize("name", ["lora", "prefix", "prompt"])
def test_greedy_equals_transformers_generate(llama, tok, name):
    """An independent reference: transformers' own generate, with its stopping at end tokens."""
    model, _ = policy(llama, name)
    ours = rollout(model, tok, PROMPTS, max_new_tokens=12, temperature=0.0)
    ids, mask = encode_prompts(tok, PROMPTS, torch.device("cpu"))
    with torch.no_grad():
        theirs = model.eval().generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=sorted(end_token_ids(tok)),
            pad_token_id=tok.pad_token_id,
        )[:, ids.shape[1] :]
    width = ours.response_ids.shape[1]
    assert torch.equal(ours.response_ids, theirs[:, :width])
    assert (theirs[:, width:] == tok.pad_token_id).all()


def test_a_padded_row_gets_the_response_it_gets_alone(llama, tok):
    model, _ = policy(llama, "prefix")
    batch = rollout(model, tok, PROMPTS, max_new_tokens=8, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        alone = rollout(model, tok, [p], max_new_tokens=8, temperature=0.0)
        n = int(alone.response_mask.sum())
        assert torch.equal(batch.response_ids[i, :n], alone.response_ids[0, :n])


def test_stops_and_masks_at_the_end_token(llama, tok):
    """Declare the token row 0 produces third to be an end token: row 0 stops there (the end
    token kept in its mask), everything after it is padding, and the rest run on."""
    model, _ = policy(llama, "lora")
    free = rollout(model, tok, PROMPTS, max_new_tokens=10, temperature=0.0, end_ids=set())
    assert free.response_mask.all() and not free.ended.any()
    assert free.response_ids.shape[1] == 10
    stop = int(free.response_ids[0, 2])
    first = [
        int((r == stop).nonzero()[0]) if (r == stop).any() else None for r in free.response_ids
    ]
    out = rollout(model, tok, PROMPTS, max_new_tokens=10, temperature=0.0, end_ids={stop})
    for b, k in enumerate(first):
        if k is None:
            assert out.response_mask[b].all() and not out.ended[b]
            assert torch.equal(out.response_ids[b], free.response_ids[b])
        else:
            assert out.ended[b] and k <= 2
            assert out.response_mask[b].tolist() == [1] * (k + 1) + [0] * (9 - k)
            assert torch.equal(out.response_ids[b, : k + 1], free.response_ids[b, : k + 1])
            assert (out.response_ids[b, k + 1 :] == tok.pad_token_id).all()
            assert (out.logps[b, k + 1 :] == 0).all()
    assert out.completions == tok.batch_decode(out.response_ids, skip_special_tokens=True)


def test_the_real_end_token_stops_a_response(llama, tok):
    """With the tokenizer's own end tokens: make EOS the model's favourite token, so every row
    ends at once; the decoded completion is empty (the end token is special)."""
    model = AutoModelForCausalLM.from_pretrained(llama)
    eos = tok.eos_token_id
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():  # logits = bias: EOS first whatever the hidden state
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 1.0
    model.lm_head = head
    out = rollout(model, tok, PROMPTS, max_new_tokens=6, temperature=0.0)
    assert out.ended.all() and out.response_ids.shape[1] == 1
    assert out.response_ids[:, 0].tolist() == [eos] * 3
    assert out.response_mask.tolist() == [[1]] * 3
    assert out.completions == ["", "", ""]


def test_sampling_is_reproducible_and_resumes_from_the_generator_state(llama, tok):
    model, _ = policy(llama, "lora")
    kw = dict(max_new_tokens=8, temperature=1.0)
    g = seeded(5)
    first, second = rollout(model, tok, PROMPTS, generator=g, **kw), None
    state = g.get_state()  # what a checkpoint stores
    second = rollout(model, tok, PROMPTS, generator=g, **kw)
    resumed = torch.Generator()
    resumed.set_state(state)
    again = rollout(model, tok, PROMPTS, generator=resumed, **kw)
    assert torch.equal(again.response_ids, second.response_ids)
    assert torch.equal(
        rollout(model, tok, PROMPTS, generator=seeded(5), **kw).response_ids, first.response_ids
    )
    assert not torch.equal(first.response_ids, second.response_ids)


def test_sample_tokens_follows_temperature_and_top_p():
    """Evenly spaced uniforms give each token a share equal to its probability (to 1/N); top-p
    keeps the smallest most-likely set holding p of the mass, renormalised."""
    logits = torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25]))
    n = 10_000
    u = (torch.arange(n) + 0.5) / n
    tokens = sample_tokens(logits.expand(n, -1), u, 1.0, 1.0)
    share = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(share, torch.tensor([0.1, 0.5, 0.15, 0.25]), atol=2e-4, rtol=0)
    hot = torch.softmax(logits / 0.5, -1)
    tokens = sample_tokens(logits.expand(n, -1), u, 0.5, 1.0)
    share = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(share, hot, atol=2e-4, rtol=0)
    # top-p 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it -> tokens 1 and 3 only
    tokens = sample_tokens(logits.expand(n, -1), u, 1.0, 0.7)
    share = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(share, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]), atol=2e-4, rtol=0)
    assert sample_tokens(logits[None], torch.tensor([0.99]), 0.0, 1.0).item() == 1


@pytest.mark.parametrize("name", ["lora", "prefix", "prompt"])
def test_response_logps_match_sampling_and_a_plain_forward(llama, tok, name):
    """The one-pass log-probs equal those recorded while sampling (so they can be the PPO
    update's old log-probs) and a plain forward's log-softmax; under ``disable()`` they are the
    frozen base's (the reference) and differ from the policy's."""
    model, method = policy(llama, name)
    out = rollout(model, tok, PROMPTS, max_new_tokens=8, temperature=0.7, generator=seeded(3))
    R = out.response_ids.shape[1]
    logps, entropy = response_logps(
        model, out.input_ids, out.attention_mask, R, temperature=0.7, with_entropy=True
    )
    m = out.response_mask
    torch.testing.assert_close(logps * m, out.logps, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = model(
            input_ids=out.input_ids,
            attention_mask=out.attention_mask,
            position_ids=positions_from_mask(out.attention_mask),
        ).logits
    plain = torch.log_softmax(logits[:, -R - 1 : -1] / 0.7, -1)  # (B, R, V)
    expected = plain.gather(-1, out.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logps * m, expected * m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, -(plain.exp() * plain).sum(-1), rtol=1e-4, atol=1e-5)
    with torch.no_grad(), method.disable():
        ref, _ = response_logps(model, out.input_ids, out.attention_mask, R, temperature=0.7)
    base = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        expected_ref, _ = response_logps(
            base, out.input_ids, out.attention_mask, R, temperature=0.7
        )
    torch.testing.assert_close(ref * m, expected_ref * m, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref * m, logps * m, atol=1e-3)


def test_response_logps_carry_gradients(llama, tok):
    model, method = policy(llama, "lora")
    out = rollout(model, tok, PROMPTS[:2], max_new_tokens=4, temperature=1.0, generator=seeded())
    logps, _ = response_logps(model, out.input_ids, out.attention_mask, 4)
    (logps * out.response_mask).sum().backward()
    grads = [p.grad for _, p in method.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_select_picks_rows(llama, tok):
    model, _ = policy(llama, "lora")
    out = rollout(model, tok, PROMPTS, max_new_tokens=4, temperature=1.0, generator=seeded())
    sub = out.select([2, 0])
    assert torch.equal(sub.response_ids, out.response_ids[[2, 0]])
    assert sub.completions == [out.completions[2], out.completions[0]]
    assert torch.equal(sub.input_ids, out.input_ids[[2, 0]])


def test_per_row_generators_make_a_row_independent_of_how_the_batch_is_split(llama, tok):
    """One generator per row (what the RL source uses under torchrun): the whole batch samples
    what its halves sample apart, and extra decode steps forced by ``all_done`` (other
    processes still sampling) only add padding."""
    model, _ = policy(llama, "lora")
    kw = dict(max_new_tokens=12, temperature=1.0)

    def gens(rows):
        return [seeded(100 + j) for j in rows]

    whole = rollout(model, tok, PROMPTS, generator=gens(range(3)), **kw)
    first = rollout(model, tok, PROMPTS[:1], generator=gens(range(1)), **kw)
    rest = rollout(model, tok, PROMPTS[1:], generator=gens(range(1, 3)), **kw)
    assert whole.completions == first.completions + rest.completions
    steps = []
    longer = rollout(
        model,
        tok,
        PROMPTS[:1],
        generator=gens(range(1)),
        all_done=lambda done: steps.append(done) or False,  # never agree to stop early
        **kw,
    )
    assert longer.response_ids.shape[1] == 12 and len(steps) == 12
    assert longer.completions == first.completions
    with pytest.raises(ValueError, match="one generator per prompt"):
        rollout(model, tok, PROMPTS, generator=gens(range(2)), **kw)
