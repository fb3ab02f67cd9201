"""Preference learning: each loss against a hand computation, TRL parity, references, reward head."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.config import DataConfig, load_config
from tunesmith.data.batching import Batches, collate, collate_shared, shared_prefix
from tunesmith.data.dataset import prepare_data
from tunesmith.data.kinds import PAIRS as PAIRS_KIND
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.methods import build_method, method_config
from tunesmith.objectives.dpo import LOSSES, DPOObjective, PairLogps
from tunesmith.objectives.reference import cached_reference_logps, compute_reference_logps
from tunesmith.objectives.reward import rewards
from tunesmith.objectives.sft import scores_shared_rows, sequence_logps
from tunesmith.tasks.base import Context, share_prompt

PAIRS = [
    {"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Q: 3+5=", "chosen": " 8", "rejected": " 9 or so"},
    {"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 11"},
    {"prompt": "Q: 7+0=", "chosen": " 7", "rejected": " 0"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def pair_data(tok, tmp_path, rows=PAIRS, **kw):
    return prepare_data(
        DataConfig(train=str(write_jsonl(tmp_path / "p.jsonl", rows)), eval=None, **kw),
        tok,
        0,
        PAIRS_KIND,
    )


def one_batch(data, tok):
    b = Batches(data.train, len(data.train) // 2, 64, tok.pad_token_id, False, 0, group=2)
    return b.collate(b.plan(0)[0])


def test_losses_against_hand_computation():
    cfg = load_config({"dpo": {"beta": 0.5, "label_smoothing": 0.2, "simpo_gamma": 0.3}}).dpo
    p = PairLogps(
        chosen=torch.tensor([-4.0]),
        rejected=torch.tensor([-6.0]),
        ref_chosen=torch.tensor([-5.0]),
        ref_rejected=torch.tensor([-5.5]),
        chosen_tokens=torch.tensor([2.0]),
        rejected_tokens=torch.tensor([4.0]),
    )
    h = (-4 + 5) - (-6 + 5.5)  # 1.5
    h_avg = (-4 / 2 + 5 / 2) - (-6 / 4 + 5.5 / 4)  # 0.625
    ls = lambda z: math.log(1 / (1 + math.exp(-z)))  # noqa: E731  log sigmoid
    expected = {
        "sigmoid": -ls(0.5 * h),
        "cdpo": -0.8 * ls(0.5 * h) - 0.2 * ls(-0.5 * h),
        "ipo": (h_avg - 1 / (2 * 0.5)) ** 2,
        "hinge": max(0.0, 1 - 0.5 * h),
        "simpo": -ls(0.5 * (-4 / 2 - (-6 / 4)) - 0.3),
    }
    assert set(LOSSES) == set(expected)
    for name, value in expected.items():
        assert float(LOSSES[name](p, cfg)) == pytest.approx(value, rel=1e-6), name


def test_dpo_loss_and_gradients_equal_trl(llama, tmp_path, tok):
    import datasets
    from trl import DPOConfig, DPOTrainer

    beta = 0.1
    policy = AutoModelForCausalLM.from_pretrained(llama)
    trl_policy = copy.deepcopy(policy)
    trainer = DPOTrainer(
        model=trl_policy,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=4,
            beta=beta,
            report_to="none",
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    data = pair_data(tok, tmp_path)
    frozen = copy.deepcopy(policy).eval()
    objective = DPOObjective(
        load_config({"dpo": {"beta": beta}}).dpo, lambda m, b: sequence_logps(frozen, b)[0]
    )
    b = one_batch(data, tok)
    loss_sum, _ = objective(policy, b)
    loss = loss_sum / objective.count(b)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=1e-4)
    for (name, p), (_, q) in zip(policy.named_parameters(), trl_policy.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_pairs_sharing_a_prompt_score_as_separate_rows(llama, tmp_path, tok, monkeypatch):
    """A pair laid in one row with its prompt once (``collate_shared``) gives the DPO loss, its
    gradients and the cached reference log-probs of the pair in two rows, in fewer token slots."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = pair_data(tok, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(llama)
    cached_reference_logps(
        model, data.train, load_config({"model": str(llama)}), torch.device("cpu")
    )
    frozen = copy.deepcopy(model).eval()
    objective = DPOObjective(
        load_config({"dpo": {"beta": 0.1}}).dpo, lambda m, b: sequence_logps(frozen, b)[0]
    )
    results = []
    for share in (False, True):
        b = Batches(data.train, 4, 64, tok.pad_token_id, False, 0, group=2, share_prefix=share)
        batch = b.collate(b.plan(0)[0])
        model.zero_grad()
        loss, metrics = objective(model, batch)
        (loss / objective.count(batch)).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((batch, loss.detach(), metrics, grads, sequence_logps(model, batch)))
    (apart, loss_a, m_a, g_a, lp_a), (shared, loss_s, m_s, g_s, lp_s) = results
    assert shared.input_ids.shape[0] == 4 and apart.input_ids.shape[0] == 8
    assert shared.input_ids.numel() < apart.input_ids.numel()
    assert shared.n_tokens == apart.n_tokens and shared.sequences == apart.sequences == 8
    torch.testing.assert_close(lp_s, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_a, rtol=1e-5, atol=1e-6)
    assert m_s == pytest.approx(m_a, rel=1e-4, abs=1e-6)
    for a, b in zip(g_a, g_s):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shared.extras["ref_logp"], apart.extras["ref_logp"])


def test_shared_prefix_ends_before_the_first_target():
    """Members share the leading tokens they agree on and that have no target: the prompt less
    its last token (whose target is each response's first token), never a response's tokens,
    and each member keeps at least one token of its own."""

    def ex(ids, prompt):
        ids = np.array(ids)
        labels = np.full(len(ids), IGNORE)
        labels[prompt - 1 : -1] = ids[prompt:]
        return Example(ids, labels, "x")

    assert shared_prefix([ex([1, 2, 3, 4, 5], 3), ex([1, 2, 3, 6], 3)]) == 2
    assert shared_prefix([ex([1, 2, 3, 4, 5], 3), ex([1, 2, 3, 4, 6], 3)]) == 2  # same reply start
    assert shared_prefix([ex([1, 2, 3, 4], 3), ex([9, 2, 3, 4], 3)]) == 0
    assert shared_prefix([ex([1, 2, 3], 3), ex([1, 2, 3], 3)]) == 2  # no targets at all
    assert shared_prefix([ex([1, 2], 1), ex([1, 3], 1)]) == 0


def test_share_prompt_needs_a_model_that_takes_the_rows_mask(llama, tmp_path, tok):
    """The check on a tiny pair passes for a model that takes a 4-D mask and fails for one that
    drops it (its second response would see the first); ``data.share_prompt: true`` then stops
    with the reason, and a task that scores rows otherwise (reward) refuses it."""
    model = AutoModelForCausalLM.from_pretrained(llama)
    assert scores_shared_rows(model, 64)
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {**kwargs, "attention_mask": None}), with_kwargs=True
    )
    assert not scores_shared_rows(model, 64)
    data = pair_data(tok, tmp_path)
    for task, model_ok, error in (
        ("dpo", False, "does not score a row with its own 4-D mask"),
        ("reward", True, "task 'reward' does not score its rows by their log-probabilities"),
    ):
        cfg = load_config({"model": str(llama), "task": task, "data": {"share_prompt": True}})
        ctx = Context(cfg, model, tok, None, torch.device("cpu"), data, True, lambda: None)
        ctx.shared["share_prompt"] = model_ok
        with pytest.raises(ConfigError, match=error):
            share_prompt(ctx)
        ctx.cfg.data.share_prompt = "auto"
        assert share_prompt(ctx) == (False, task == "dpo" and model_ok)


def test_local_attention_spans_are_read_from_the_config():
    """The spans some layers' attention is limited to: a sliding window where a layer slides
    (``layer_types``, or ``use_sliding_window`` in older configs), Llama 4's chunks where a layer
    is chunked; none where every layer is full, whatever the window field holds."""
    from types import SimpleNamespace

    from transformers import Llama4TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    from tunesmith.objectives.sft import _local_span

    def span(config):
        return _local_span(SimpleNamespace(config=config))

    assert span(MistralConfig(sliding_window=16)) == 16
    assert span(Qwen2Config(sliding_window=16, use_sliding_window=False)) is None
    assert span(Qwen2Config(sliding_window=16, use_sliding_window=True, max_window_layers=0)) == 16
    assert span(Llama4TextConfig(attention_chunk_size=12, num_hidden_layers=4)) == 12
    assert span(LlamaConfig()) is None


def test_a_sliding_window_shorter_than_the_examples_keeps_separate_rows():
    """transformers takes a 4-D mask as given for sliding-window layers too, so a shared row
    would lose the window: a model whose window is shorter than ``data.max_length`` keeps
    separate rows (the tiny pair of the check is shorter than any window and cannot show it),
    and one whose window holds every example may share (the window then hides nothing)."""
    from conftest import small_decoder
    from transformers import MistralForCausalLM

    model = small_decoder(MistralForCausalLM, sliding_window=16).eval()
    assert not scores_shared_rows(model, 32)
    assert scores_shared_rows(model, 16)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(64, (20,), generator=gen).numpy()
    pair = []
    for n in (10, 12):  # 30 and 32 tokens: longer than the window
        ids = np.concatenate([prompt, torch.randint(64, (n,), generator=gen).numpy()])
        labels = np.full(len(ids), IGNORE)
        labels[len(prompt) - 1 : -1] = ids[len(prompt) :]
        pair.append(Example(ids, labels, "x"))
    with torch.no_grad():
        apart = sequence_logps(model, collate(pair, [[0], [1]], 0))[0]
        shared = sequence_logps(model, collate_shared(pair, [0], 2, 0))[0]
    assert not torch.allclose(apart, shared, atol=1e-4)  # why: the window is lost when shared


def test_disabled_method_reference_equals_base(llama, tmp_path, tok):
    b = one_batch(pair_data(tok, tmp_path), tok)
    base = sequence_logps(AutoModelForCausalLM.from_pretrained(llama), b)[0]
    method = build_method(method_config("lora", rank=4))
    model = method.apply(AutoModelForCausalLM.from_pretrained(llama))
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.weight.normal_(0, 0.5)
    assert not torch.allclose(sequence_logps(model, b)[0], base)
    with method.disable():
        torch.testing.assert_close(sequence_logps(model, b)[0], base)


def test_cached_reference_equals_recomputed(llama, tmp_path, tok, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    cfg = load_config({"model": str(llama), "method": "full"})
    model = AutoModelForCausalLM.from_pretrained(llama)
    data = pair_data(tok, tmp_path)
    path = cached_reference_logps(model, data.train, cfg, torch.device("cpu"))
    first = [ex.extras["ref_logp"] for ex in data.train]
    for ex in data.train:
        ex.extras.clear()
    assert (
        cached_reference_logps(model, data.train, cfg, torch.device("cpu")) == path
    )  # a cache hit
    fresh = compute_reference_logps(model, data.train, 3, torch.device("cpu"), "fp32")
    assert [ex.extras["ref_logp"] for ex in data.train] == pytest.approx(first)
    assert first == pytest.approx(fresh.tolist(), rel=1e-5)
    b = one_batch(data, tok)
    torch.testing.assert_close(
        b.extras["ref_logp"], sequence_logps(model, b)[0].detach(), rtol=1e-5, atol=1e-5
    )


def test_reward_head_shape_and_hf_loading(llama, tmp_path, tok):
    model = AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    b = one_batch(pair_data(tok, tmp_path), tok)
    r = rewards(model, b)
    assert r.shape == (8,)
    model.save_pretrained(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf = loaded(
        input_ids=b.input_ids, attention_mask=(b.input_ids != tok.pad_token_id).long()
    ).logits[:, 0]
    torch.testing.assert_close(hf, r.detach(), atol=1e-5, rtol=1e-5)


def test_pair_checks(tmp_path, tok):
    with pytest.raises(DataError, match="p.jsonl:1: 'chosen' and 'rejected' are identical"):
        pair_data(tok, tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    empty = [{"prompt": "a", "chosen": " ", "rejected": "b"}, *PAIRS]
    with pytest.raises(DataError, match="p.jsonl:1: empty 'chosen'.*data.empty_completion=drop"):
        pair_data(tok, tmp_path, empty, empty_completion="error")
    data = pair_data(tok, tmp_path, empty)  # warn: kept, counted, one line
    assert len(data.train) == 2 * len(empty) and data.stats.empty == 1
    assert [n for n in data.notes if "empty completion" in n] == [
        f"warning: 1 of {len(empty)} training records have an empty completion, so the model "
        f"learns to answer nothing there (first: {tmp_path / 'p.jsonl'}:1); fill them in, or "
        "set data.empty_completion=drop or error"
    ]
    data = pair_data(tok, tmp_path, empty, empty_completion="drop")
    assert len(data.train) == 2 * len(PAIRS) and data.stats.dropped_empty == 1
    data = pair_data(
        tok, tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "b"}, *PAIRS], skip_bad_rows=True
    )
    assert len(data.train) == 2 * len(PAIRS) and data.stats.dropped_unsupervised == 1


def test_implicit_prompt_from_shared_prefix(tmp_path, tok):
    convo = [{"role": "user", "content": "hi"}]
    rows = [
        {
            "chosen": convo + [{"role": "assistant", "content": "hello"}],
            "rejected": convo + [{"role": "assistant", "content": "go away"}],
        }
    ]
    data = pair_data(tok, tmp_path, rows)
    from tunesmith.preview import mark_supervised

    assert mark_supervised(data.train[0], tok) == "User: hi\nAssistant: [[hello</s>\n]]"
    assert mark_supervised(data.train[1], tok) == "User: hi\nAssistant: [[go away</s>\n]]"
