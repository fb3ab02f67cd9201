"""task: classify on a tiny random BERT: every method trains, saves and loads back; data in
JSONL / CSV / TSV with names or ids; text pairs carry token types; PEFT and transformers load
the artifacts."""

import csv
import json

import pytest
import torch
from conftest import sentiment_rows, write_jsonl

from tunesmith.config import load_config
from tunesmith.data.dataset import prepare_data
from tunesmith.data.kinds import LABELED
from tunesmith.errors import DataError
from tunesmith.evaluate import evaluate_target
from tunesmith.methods import method_names
from tunesmith.models import load_for_inference
from tunesmith.objectives.classify import confusion_matrix, macro_f1
from tunesmith.pipeline import run_training
from tunesmith.predict import predict
from tunesmith.tasks.classify import resolve_labels

LR = {"full": 2e-3, "lora": 5e-3}  # methods on the input side and adapters want more


def classify_cfg(model, train, out, method="lora", **data):
    return load_config(
        {
            "model": str(model),
            "task": "classify",
            "method": method,
            "data": {"train": str(train), "eval": 0.25, "max_length": 32, **data},
            "train": {
                "epochs": 4,
                "batch_size": 8,
                "lr": LR.get(method, 1e-2),
                "eval_every": 1000,
                "progress": False,
            },
            "output_dir": str(out),
        }
    )


@pytest.fixture
def sentiment(tmp_path):
    return write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows())


@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_on_bert_and_loads_back(tiny_bert, sentiment, tmp_path, method):
    out = tmp_path / "run"
    result = run_training(classify_cfg(tiny_bert, sentiment, out, method))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["eval_loss"] < start["eval_loss"]
    assert end["eval_accuracy"] >= start["eval_accuracy"]
    if method in LR:  # the backbone adapts: the cue word is learnt in these few steps (a frozen
        # random encoder under adapters / virtual tokens moves, but more slowly)
        assert result.metrics["eval_accuracy"] >= 0.9
    assert 0 < result.metrics["eval_macro_f1"] <= 1
    report = (out / "report.md").read_text()
    assert "| true \\ predicted | neg | pos |" in report
    again = evaluate_target(str(out))
    assert again["eval_loss"] == pytest.approx(end["eval_loss"], rel=1e-4, abs=1e-5)
    assert again["eval_accuracy"] == pytest.approx(result.metrics["eval_accuracy"])


def test_saved_classifier_loads_in_transformers_and_a_pipeline(tiny_bert, sentiment, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = tmp_path / "run"
    run_training(classify_cfg(tiny_bert, sentiment, out, "lora"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.label2id == {"neg": 0, "pos": 1}
    clf = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(out))
    texts = ["the film was very great", "the plot was very awful"]
    got = clf(texts)
    ours = predict(str(out), [(t, None) for t in texts])
    assert [g["label"] for g in got] == [p.label for p in ours] == ["pos", "neg"]
    for g, p in zip(got, ours):
        assert g["score"] == pytest.approx(p.probabilities[p.label], abs=1e-5)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_peft_loads_the_artifact_with_the_same_logits(tiny_bert, sentiment, tmp_path, method):
    import inspect

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, BertModel

    if (
        method == "prefix"
        and "past_key_values" not in inspect.signature(BertModel.forward).parameters
    ):
        pytest.skip(
            "PEFT runs sequence-classification prefix-tuning only through a 'past_key_values' "
            "argument, which this transformers version's BertModel names 'cache'"
        )

    out = tmp_path / "run"
    run_training(classify_cfg(tiny_bert, sentiment, out, method))
    adapter = out / "adapter" if (out / "adapter").exists() else out
    ours, tok, _ = load_for_inference(str(out), torch.device("cpu"))
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    enc = tok(["the film was very good", "the story was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**enc).logits
        b = theirs(**enc).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_adapter_sits_after_bert_sublayer_projections(tiny_bert, sentiment, tmp_path):
    from tunesmith.pipeline import setup_model

    for placement, per_layer in (("houlsby", 2), ("pfeiffer", 1)):
        cfg = classify_cfg(tiny_bert, sentiment, tmp_path / "x", "adapter")
        cfg.method.placement = placement
        resolve_labels(cfg)
        _, _, method, _ = setup_model(cfg, "classifier", torch.device("cpu"))
        names = method.wrapped_modules()
        assert len(names) == 2 * per_layer
        assert all(n.endswith(("attention.output.dense", ".output.dense")) for n in names)
        assert not any("intermediate" in n for n in names)


def test_labels_from_csv_tsv_ids_and_pairs(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [
        {"text": "the film", "text_pair": "was good", "label": "1"},
        {"text": "the plot", "text_pair": "was bad", "label": "0"},
        {"text": "a story", "text_pair": "was dull", "label": "2"},
    ]
    for suffix, delim in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"d{suffix}"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, ["text", "text_pair", "label"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
        cfg = classify_cfg(tiny_bert, path, tmp_path / "o", eval=None)
        resolve_labels(cfg)
        assert cfg.data.labels == ["0", "1", "2"]  # integer ids: 0..K-1
        data = prepare_data(cfg.data, tok, 0, LABELED)
        assert [ex.extras["label"] for ex in data.train] == [1, 0, 2]
        ex = data.train[0]
        assert list(ex.input_ids) == tok("the film", "was good")["input_ids"]
        assert list(ex.token_types) == [0, 0, 0, 0, 1, 1, 1]


def test_a_label_training_never_saw_stops_with_file_and_line(tiny_bert, sentiment, tmp_path):
    from transformers import AutoTokenizer

    held = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"text": "the film was good", "label": "pos"}, {"text": "meh", "label": "mixed"}],
    )
    cfg = classify_cfg(tiny_bert, sentiment, tmp_path / "o")
    cfg.data.eval = str(held)
    resolve_labels(cfg)
    with pytest.raises(
        DataError, match=r"eval\.jsonl:2: label 'mixed' is not one of the 2 classes"
    ):
        prepare_data(cfg.data, AutoTokenizer.from_pretrained(tiny_bert), 0, LABELED)


def test_macro_f1_and_confusion_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 4, (200,), generator=g)
    pred = torch.where(
        torch.rand(200, generator=g) < 0.6, gold, torch.randint(0, 4, (200,), generator=g)
    )
    pred[pred == 3] = 2  # class 3 is never predicted: its F1 is 0 and still counts
    m = confusion_matrix(pred, gold, 4)
    assert m.tolist() == metrics.confusion_matrix(gold, pred, labels=range(4)).tolist()
    assert macro_f1(m) == pytest.approx(
        metrics.f1_score(gold, pred, average="macro", labels=range(4), zero_division=0)
    )


def test_classify_on_a_decoder_reads_the_last_token(llama, tmp_path):
    rows = [{"text": f"{w} {a}", "label": w} for w in ("yes", "no") for a in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    result = run_training(classify_cfg(llama, data, out, "lora"))
    assert result.metrics["eval_accuracy"] >= 0.5
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}


def test_predict_command_with_pairs_and_a_file(tiny_bert, sentiment, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "run"
    run_training(classify_cfg(tiny_bert, sentiment, out, "full"))
    assert (
        main(["predict", str(out), "--text", "the film was very good", "--text-pair", "the plot"])
        == 0
    )
    line = capsys.readouterr().out.strip()
    label, probs, text = line.split("\t")
    assert label in ("pos", "neg") and text == "the film was very good ||| the plot"
    assert sum(float(p.split("=")[1]) for p in probs.split()) == pytest.approx(1, abs=2e-3)
    inputs = write_jsonl(
        tmp_path / "in.jsonl", [{"text": "the story was awful"}, {"text": "great"}]
    )
    assert main(["predict", str(out), "--file", str(inputs)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["predict", str(out), "--text", "a", "--text-pair", "b", "--text-pair", "c"]) == 2


def test_distilled_bert_student_from_a_classify_run(tiny_bert, sentiment, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    run_training(classify_cfg(tiny_bert, sentiment, teacher, "full"))
    cfg = classify_cfg(tiny_bert, sentiment, tmp_path / "student", "full")
    raw = cfg.to_dict()
    raw["task"] = "distill_classify"
    raw["distill_classify"] = {
        "teacher": str(teacher),
        "student": {"layers": [1]},
        "weights": {"kl": 1.0, "hard": 0.5, "hidden": 0.5},
    }
    raw["data"]["labels"] = None
    result = run_training(load_config(raw))
    m = result.metrics
    assert m["student_params"] < m["teacher_params"]
    assert m["student_eval_accuracy"] >= 0.9 * m["teacher_eval_accuracy"]
    assert "## Student and teacher (held out)" in (tmp_path / "student" / "report.md").read_text()
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 1

    # Offline: the teacher's class log-probs are computed once; a second run reuses them.
    from tunesmith.objectives import teacher_cache

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    computed = []
    compute = teacher_cache.compute_teacher_top_k
    monkeypatch.setattr(
        teacher_cache,
        "compute_teacher_top_k",
        lambda *a, **k: computed.append(1) or compute(*a, **k),
    )
    raw["distill_classify"]["weights"] = {"kl": 1.0, "hard": 0.5}
    raw["distill_classify"]["teacher_cache"] = "offline"
    for out in ("offline-a", "offline-b"):
        raw["output_dir"] = str(tmp_path / out)
        m = run_training(load_config(raw)).metrics
        assert m["student_eval_accuracy"] >= 0.9 * m["teacher_eval_accuracy"]
    assert len(computed) == 2  # train and eval, in the first run only
    cached = sorted((tmp_path / "cache" / "teacher").glob("*.safetensors"))
    assert len(cached) == 2
