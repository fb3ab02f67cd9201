"""Distillation losses against their formulas, the from_teacher student, vocabulary checks."""

import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert

from tunesmith.data.batching import collate
from tunesmith.data.tokenize import IGNORE, Example
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.objectives.distill import (
    DistillConfig,
    DistillObjective,
    DistillWeights,
    check_same_vocabulary,
    cosine_alignment,
    generalised_jsd,
    hard_label,
    kl_divergence,
    reverse_kl,
    vocab_width,
)
from tunesmith.student import build_student, student_from


def test_kl_with_temperature_equals_the_hand_computed_value():
    t, s, temp = [2.0, 0.0, -1.0], [0.5, 0.5, 0.0], 2.0

    def soft(x):
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]

    p, q = soft(t), soft(s)
    expected = temp**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = kl_divergence(torch.tensor([t]), torch.tensor([s]), temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    back = temp**2 * sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert reverse_kl(torch.tensor([t]), torch.tensor([s]), temp).item() == pytest.approx(
        back, rel=1e-6
    )


def test_jsd_is_symmetric_zero_on_equal_inputs_and_bounded():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    torch.testing.assert_close(generalised_jsd(a, b, 1.0), generalised_jsd(b, a, 1.0))
    assert generalised_jsd(a, a, 1.0).abs().max() < 1e-6
    assert (generalised_jsd(a, b, 1.0) <= math.log(2) + 1e-6).all()
    # By hand for beta = 0.3 on one row.
    p, q = torch.softmax(a[0], -1), torch.softmax(b[0], -1)
    m = 0.3 * p + 0.7 * q
    by_hand = 0.3 * (p * (p / m).log()).sum() + 0.7 * (q * (q / m).log()).sum()
    assert generalised_jsd(a[:1], b[:1], 1.0, 0.3).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_hard_label_and_cosine_alignment():
    s, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([1])
    assert hard_label(s, y).item() == pytest.approx(-torch.log_softmax(s, -1)[0, 1].item())
    h = torch.randn(4, 8)
    assert cosine_alignment(h, 2 * h).abs().max() < 1e-6
    assert cosine_alignment(h, -h).sub(2).abs().max() < 1e-6


def test_weights_are_validated():
    with pytest.raises(ConfigError, match="weights"):
        DistillConfig(weights=DistillWeights(kl=0.0)).check("distill")
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0).check("distill")


def _llama(layers, vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_from_teacher_copies_exactly_the_chosen_layers():
    teacher = _llama(5)
    student = student_from(teacher, [0, 3, 4])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for k, i in enumerate([0, 3, 4]):
        ts, ss = teacher.model.layers[i].state_dict(), student.model.layers[k].state_dict()
        assert ts.keys() == ss.keys() and all(ts[n].equal(ss[n]) for n in ts)
        assert student.model.layers[k].self_attn.layer_idx == k
    assert student.model.embed_tokens.weight.equal(teacher.model.embed_tokens.weight)
    assert student.lm_head.weight.equal(teacher.lm_head.weight)
    assert teacher.config.num_hidden_layers == 5  # the teacher is untouched
    default = student_from(teacher)
    assert len(default.model.layers) == 3  # every other: 0, 2, 4
    assert default.model.layers[1].mlp.up_proj.weight.equal(
        teacher.model.layers[2].mlp.up_proj.weight
    )
    ids = torch.randint(0, 40, (2, 6))
    assert student(ids).logits.shape == (2, 6, 40)
    with pytest.raises(ConfigError, match="layers"):
        student_from(teacher, [0, 7])


def test_student_of_a_bert_folder_loads_back(tmp_path):
    from transformers import AutoModel

    teacher = save_tiny_bert(tmp_path / "t", layers=4, head="encoder")
    out = build_student(str(teacher), tmp_path / "s", [1, 3])
    s, t = AutoModel.from_pretrained(out), AutoModel.from_pretrained(teacher)
    assert s.config.num_hidden_layers == 2
    assert s.encoder.layer[1].output.dense.weight.equal(t.encoder.layer[3].output.dense.weight)
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_a_different_vocabulary_stops_with_one_line(llama, tiny_models):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(llama)
    b = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    check_same_vocabulary(a, AutoTokenizer.from_pretrained(llama), "t")  # same: fine
    with pytest.raises(TunesmithError, match=r"distill.teacher: t has another vocabulary") as e:
        check_same_vocabulary(a, b, "t")
    assert "\n" not in str(e.value)


def _batch():
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = [[IGNORE, IGNORE, 7, 2, IGNORE], [IGNORE, 9, 2, IGNORE, IGNORE]]
    exs = [
        Example(ids[0].numpy(), torch.tensor(labels[0]).numpy(), "a"),
        Example(ids[1, :4].numpy(), torch.tensor(labels[1][:4]).numpy(), "b"),
    ]
    return collate(exs, [[0], [1]], 0)


def test_causal_distillation_scores_supervised_tokens_only_and_ignores_padding_rows():
    teacher, student = _llama(2, seed=1), _llama(1, seed=2)
    teacher.resize_token_embeddings(64)  # padding rows past the real vocabulary of 40
    assert vocab_width(list(range(40)), student, teacher) == 40
    cfg = DistillConfig(temperature=2.0, weights=DistillWeights(kl=1.0, hard=0.5))
    obj = DistillObjective(cfg, teacher, 40, token_level=True)
    batch = _batch()
    loss, metrics = obj(student, batch)
    assert obj.count(batch) == batch.n_supervised == 4
    mask = batch.supervised
    with torch.no_grad():
        t = teacher(**batch.model_inputs()).logits[mask][:, :40]
    s = student(**batch.model_inputs()).logits[mask]
    expected = kl_divergence(t, s, 2.0).sum() + 0.5 * hard_label(s, batch.labels[mask]).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl_divergence(t, s, 2.0).sum().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never trains


def test_a_teacher_of_another_vocabulary_stops_the_run(llama, tiny_models, tmp_path):
    from conftest import write_jsonl

    from tunesmith.config import load_config
    from tunesmith.pipeline import setup_run

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(8)]
    )
    cfg = load_config(
        {
            "model": str(llama),
            "task": "distill",
            "method": "full",
            "distill": {"teacher": str(tiny_models["qwen2"])},
            "data": {"train": str(data), "eval": None},
            "train": {"progress": False},
            "output_dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(TunesmithError, match="has another vocabulary"):
        setup_run(cfg)


def _attach(teacher, examples, k, width, tmp_path, token_level=True):
    from tunesmith.objectives.teacher_cache import attach_teacher_top_k, compute_teacher_top_k

    def compute():
        return compute_teacher_top_k(
            teacher, examples, k, width, token_level, 2, torch.device("cpu"), "fp32"
        )

    return attach_teacher_top_k(examples, tmp_path / f"k{k}.safetensors", compute)


def _examples():
    ids = [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 4, 3, 3, 6, 2]]
    labels = [
        [IGNORE, IGNORE, 7, 2, IGNORE],
        [IGNORE, 9, 2, IGNORE],
        [IGNORE, IGNORE, IGNORE, 6, 2, IGNORE],
    ]
    return [
        Example(np.array(i, dtype=np.int64), np.array(y, dtype=np.int64), str(n))
        for n, (i, y) in enumerate(zip(ids, labels))
    ]


def test_offline_teacher_with_k_equal_to_the_vocabulary_gives_the_online_loss(tmp_path):
    teacher, student = _llama(2, seed=1), _llama(1, seed=2)
    cfg = DistillConfig(
        temperature=2.0, weights=DistillWeights(kl=1.0, reverse_kl=0.3, jsd=0.2, hard=0.5)
    )
    examples = _examples()
    assert _attach(teacher, examples, 40, 40, tmp_path) is False  # computed, not reused
    batch = collate(examples, [[0], [1], [2]], 0)
    assert batch.extras["teacher_logp"].shape == (batch.n_supervised, 40)
    offline, m_off = DistillObjective(cfg, None, 40, token_level=True)(student, batch)
    online_batch = collate([Example(e.input_ids, e.labels, e.origin) for e in examples], [[0], [1], [2]], 0)  # fmt: skip
    online, m_on = DistillObjective(cfg, teacher, 40, token_level=True)(student, online_batch)
    assert offline.item() == pytest.approx(online.item(), rel=1e-6)
    assert m_off["agreement"] == m_on["agreement"]
    offline.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_cached_top_k_equals_the_online_teachers_top_k_and_the_loss_renormalises(tmp_path):
    teacher, student = _llama(2, seed=1), _llama(1, seed=2)
    examples = _examples()
    _attach(teacher, examples, 5, 40, tmp_path)
    batch = collate(examples, [[0], [1], [2]], 0)
    mask = batch.supervised
    with torch.no_grad():
        logp = torch.log_softmax(teacher(**batch.model_inputs()).logits[mask], -1)
    want_values, want_index = logp.topk(5, -1)
    torch.testing.assert_close(batch.extras["teacher_logp"], want_values)
    assert batch.extras["teacher_index"].long().equal(want_index)
    cfg = DistillConfig(temperature=3.0, weights=DistillWeights(kl=1.0))
    loss, _ = DistillObjective(cfg, None, 40, token_level=True)(student, batch)
    # By hand: KL between the teacher's and the student's distributions restricted to the
    # teacher's top 5 and renormalised, at T = 3 (x T^2).
    s = student(**batch.model_inputs()).logits[mask].gather(-1, want_index)
    log_p, log_q = torch.log_softmax(want_values / 3, -1), torch.log_softmax(s / 3, -1)
    by_hand = 9 * (log_p.exp() * (log_p - log_q)).sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # A second call reads the file back: the same values, reused.
    again = _examples()
    assert _attach(None, again, 5, 40, tmp_path) is True
    assert all(
        (a.extras["teacher_logp"] == b.extras["teacher_logp"]).all()
        for a, b in zip(examples, again)
    )


def test_packed_rows_carry_their_cached_positions_in_label_order(tmp_path):
    examples = _examples()
    _attach(_llama(2, seed=1), examples, 3, 40, tmp_path)
    packed = collate(examples, [[0, 2], [1]], 0)
    assert packed.packed
    want = np.concatenate([examples[i].extras["teacher_index"] for i in (0, 2, 1)])
    assert packed.extras["teacher_index"].numpy().tolist() == want.tolist()
    assert packed.extras["teacher_index"].shape[0] == packed.n_supervised


def test_offline_settings_are_validated():
    with pytest.raises(ConfigError, match="teacher_cache"):
        DistillConfig(teacher_cache="disk").check("distill")
    with pytest.raises(ConfigError, match="top_k"):
        DistillConfig(teacher_cache="offline", top_k=0).check("distill")
    with pytest.raises(ConfigError, match=r"distill.weights.hidden: .*teacher_cache=online"):
        DistillConfig(teacher_cache="offline", weights=DistillWeights(hidden=1.0)).check("distill")


def test_a_second_offline_run_reuses_the_cache_without_loading_the_teacher(
    llama, pc_data, tmp_path, monkeypatch
):
    from tunesmith.config import load_config
    from tunesmith.objectives import teacher_cache
    from tunesmith.pipeline import setup_run
    from tunesmith.tasks import distill as distill_task

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    calls = {"compute": 0, "load": 0}
    compute, load = teacher_cache.compute_teacher_top_k, distill_task.load_teacher

    def counting_compute(*a, **k):
        calls["compute"] += 1
        return compute(*a, **k)

    def counting_load(*a, **k):
        calls["load"] += 1
        return load(*a, **k)

    monkeypatch.setattr(teacher_cache, "compute_teacher_top_k", counting_compute)
    monkeypatch.setattr(distill_task, "load_teacher", counting_load)

    def run(out):
        cfg = load_config(
            {
                "model": str(llama),
                "task": "distill",
                "method": "full",
                "distill": {"teacher": str(llama), "teacher_cache": "offline", "top_k": 4},
                "data": {"train": str(pc_data), "eval": 0.25, "max_length": 64},
                "train": {"progress": False, "batch_size": 4},
                "output_dir": str(tmp_path / out),
            }
        )
        return setup_run(cfg)

    first = run("a")
    assert calls == {"compute": 2, "load": 1}  # train and eval split, one teacher load
    assert first.objective.teacher is None  # training holds no teacher
    second = run("b")
    assert calls == {"compute": 2, "load": 1}  # reused: no teacher loaded, none run
    batch = next(second.source.stream())
    assert batch.extras["teacher_logp"].shape == (batch.n_supervised, 4)
    loss, metrics = second.objective(second.ctx.model, batch)
    # The student is the teacher's model: the cached positions line up, so the KL is 0 and
    # every position agrees.
    assert abs(loss.item()) < 1e-5 and metrics["agreement"] == batch.n_supervised


def test_offline_classifier_teacher_caches_its_class_log_probs(tmp_path):
    from conftest import bert_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    tok = bert_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    teacher, student = BertForSequenceClassification(config), BertForSequenceClassification(config)
    teacher.eval(), student.eval()
    texts = ["the film was good", "the plot was very dull", "great"]
    examples = []
    for n, text in enumerate(texts):
        ids = np.array(tok(text)["input_ids"], dtype=np.int64)
        ex = Example(ids, np.full_like(ids, IGNORE), str(n), token_types=np.zeros_like(ids))
        ex.extras["label"] = n
        examples.append(ex)
    _attach(teacher, examples, 32, 3, tmp_path, token_level=False)  # k above the 3 classes: all
    batch = collate(examples, [[0], [1], [2]], 0)
    with torch.no_grad():
        want = torch.log_softmax(teacher(**batch.model_inputs()).logits, -1).sort(-1, True)
    torch.testing.assert_close(batch.extras["teacher_logp"], want.values)
    cfg = DistillConfig(weights=DistillWeights(kl=1.0, hard=1.0))
    offline, _ = DistillObjective(cfg, None, 3, token_level=False)(student, batch)
    plain = collate([Example(e.input_ids, e.labels, e.origin, {"label": e.extras["label"]}, e.token_types) for e in examples], [[0], [1], [2]], 0)  # fmt: skip
    online, _ = DistillObjective(cfg, teacher, 3, token_level=False)(student, plain)
    assert offline.item() == pytest.approx(online.item(), rel=1e-6)


def test_weights_fingerprint_follows_weight_files_not_checkpoints(tmp_path):
    import os

    from tunesmith.models import weights_fingerprint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"0" * 8)
    before = weights_fingerprint(str(tmp_path))
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"1")
    (tmp_path / "report.md").write_text("notes")
    assert weights_fingerprint(str(tmp_path)) == before
    st = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_fingerprint(str(tmp_path)) != before
    assert weights_fingerprint("org/model") != weights_fingerprint("org/model", "v2")
