"""Reward and DPO specifics (every method with every task is in test_matrix.py).

builtin:micro (pretrained, so its outputs respond to every method; a random model's frozen tiny
output layer barely does) is trained and evaluated on the same small set of pairs: these tests
check the mechanics (metrics start at chance and improve as the model fits); the built-in task's
real numbers come from `tunesmith train configs/dpo_lora.yaml`."""

import json
import re

import pytest
import torch
from conftest import write_jsonl

import tunesmith
from tunesmith.cli import main


@pytest.fixture
def cache(micro, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TUNESMITH_CACHE", str(tmp_path / "cache")
    )  # reference log-probs stay per test


@pytest.fixture
def pairs(tmp_path):
    rows = [
        {"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 3}"}
        for a in range(4)
        for b in range(4)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def run(task, method, out, model, data, lr=1e-2, data_settings=None, **extra):
    cfg = {
        "model": str(model),
        "task": task,
        "method": method,
        "data": {"train": str(data), "eval": str(data), "max_length": 32, **(data_settings or {})},
        "train": {
            "max_steps": 16,
            "batch_size": 8,
            "lr": lr,
            "eval_every": 16,
            "progress": False,
        },
        "output_dir": str(out),
        **extra,
    }
    result = tunesmith.train(cfg)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in history if "eval_loss" in r]
    return result, evals[0], evals[-1]


@pytest.mark.parametrize("loss", ["cdpo", "ipo", "hinge", "simpo"])
def test_dpo_siblings_run(cache, tmp_path, micro, pairs, loss):
    _, before, after = run(
        "dpo",
        "lora",
        tmp_path / loss,
        micro,
        pairs,
        lr=3e-3,  # DPO with LoRA at 1e-2 lands on either side of log 2 depending on the seed
        dpo={"loss": loss, "label_smoothing": 0.1},
    )
    assert after["eval_loss"] < before["eval_loss"]


def test_dpo_with_shared_prompt_rows_trains_as_with_separate_rows(
    cache, tmp_path, micro, pairs, capsys
):
    """``data.share_prompt`` (on by default on CPU) changes how pairs are laid out, not what is
    learned: the held-out loss and accuracy after training are those of separate rows."""
    _, first, shared = run("dpo", "lora", tmp_path / "a", micro, pairs, lr=3e-3)
    assert (
        "data.share_prompt: pairs laid one per row with the prompt once" in capsys.readouterr().err
    )
    _, _, apart = run(
        "dpo", "lora", tmp_path / "b", micro, pairs, lr=3e-3, data_settings={"share_prompt": False}
    )
    assert "data.share_prompt" not in capsys.readouterr().err
    assert shared["eval_loss"] < first["eval_loss"]
    assert shared["eval_loss"] == pytest.approx(apart["eval_loss"], rel=1e-4)
    assert shared["eval_accuracy"] == apart["eval_accuracy"]


def test_dpo_full_with_frozen_copy_matches_cache(cache, tmp_path, micro, pairs):
    _, _, cached = run("dpo", "full", tmp_path / "a", micro, pairs, dpo={"reference": "cache"})
    _, _, copied = run("dpo", "full", tmp_path / "b", micro, pairs, dpo={"reference": "copy"})
    assert copied["eval_loss"] == pytest.approx(cached["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "prefix"])  # merged whole model / base + method
def test_score_command(cache, tmp_path, micro, pairs, capsys, method):
    run("reward", method, tmp_path / "rm", micro, pairs)
    assert (
        main(
            [
                "score",
                str(tmp_path / "rm"),
                "--prompt",
                "What is 2 plus 3?",
                "--response",
                "5",
                "--response",
                "6",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("  5")
    from tunesmith.score import score

    r = score(str(tmp_path / "rm"), "What is 2 plus 3?", ["5"])
    assert isinstance(r[0], float) and torch.isfinite(torch.tensor(r)).all()


def test_dpo_refuses_sft_data(cache, tmp_path, llama):
    with pytest.raises(tunesmith.ConfigError, match="does not fit this task"):
        tunesmith.train(
            {
                "model": str(llama),
                "task": "dpo",
                "data": {"train": "builtin:arith"},
                "output_dir": str(tmp_path / "x"),
            }
        )


def test_data_preview_shows_pairs(cache, tmp_path, micro, pairs, capsys):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": micro, "task": "dpo", "data": {"train": str(pairs), "eval": None}})
    )
    assert main(["data", "preview", str(cfg), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- chosen: " in out and "--- rejected: " in out and "[[ 0</s>]]" in out
    saved = re.search(
        r"shared prompt +([0-9.]+)% fewer tokens to compute with each of the pairs", out
    )
    assert saved and 0 < float(saved.group(1)) < 50  # a prompt shared by two responses
    cfg.write_text(
        yaml.safe_dump(
            {"model": micro, "task": "reward", "data": {"train": str(pairs), "eval": None}}
        )
    )
    assert main(["data", "preview", str(cfg), "-n", "1"]) == 0
    assert "shared prompt" not in capsys.readouterr().out  # a reward model scores rows otherwise


@pytest.mark.parametrize(
    "task, method", [("dpo", "lora"), ("dpo", "full"), ("reward", "prefix"), ("reward", "lora")]
)
def test_eval_command_matches_training_eval(cache, tmp_path, micro, pairs, task, method):
    """`tunesmith eval RUN` recomputes the held-out metrics the run logged at its end (for DPO
    against the same reference: the base with the method off, or the base model for full)."""
    from tunesmith.evaluate import evaluate_target

    _, _, final = run(task, method, tmp_path / "r", micro, pairs)
    again = evaluate_target(str(tmp_path / "r"))
    assert again["eval_pairs"] == 16
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4, abs=1e-5)
    assert again["eval_accuracy"] == pytest.approx(final["eval_accuracy"])
