"""The built-in default: deterministic base model, stable tasks, quickstart and example configs."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from tunesmith.builtin.specs import SPECS
from tunesmith.builtin.tasks import TASKS, all_facts, arith_reward, fact_split, task_records
from tunesmith.cli import main
from tunesmith.errors import DataError
from tunesmith.prepare import build_model

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.fixture
def cache(micro):
    """builtin:micro in the session's private cache."""


def test_build_is_deterministic(tmp_path):
    spec = SPECS["micro"]
    a = load_file(str(build_model(spec, tmp_path / "a", progress=False) / "model.safetensors"))
    b = load_file(str(build_model(spec, tmp_path / "b", progress=False) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "build.json").exists() and not (tmp_path / "a.building").exists()


def test_task_splits_disjoint_and_stable():
    train, held = fact_split()
    assert len(train) + len(held) == len(all_facts()) == 610
    assert not set(train) & set(held)
    assert fact_split() == (train, held)
    for name in TASKS:
        tr, ev = task_records(f"builtin:{name}"), task_records(f"builtin:{name}:eval")
        per = 4 if name == "arith_pref" else 1  # several comparisons per question
        assert (len(tr), len(ev)) == (488 * per, 122 * per)
        assert [r.fields for r in tr] == [r.fields for r in task_records(f"builtin:{name}")]
    first = task_records("builtin:arith")[0].fields["messages"]
    assert first == [
        {"role": "user", "content": "What is 3 minus 3?"},
        {"role": "assistant", "content": "0"},
    ]
    prefs = task_records("builtin:arith_pref:eval")
    assert all(p.fields["chosen"] != p.fields["rejected"] for p in prefs)
    first_question = [p.fields["rejected"][0]["content"] for p in prefs[:4]]
    assert len(set(first_question)) == 4 and prefs[4].fields["prompt"] != prefs[0].fields["prompt"]
    checks = [r.fields["label"] for r in task_records("builtin:arith_check")]
    assert 0.4 < sum(checks) / len(checks) < 0.6
    with pytest.raises(DataError, match="unknown built-in data"):
        task_records("builtin:nope")


def test_reward_function():
    assert arith_reward("What is 7 plus 5?", " 12") == 1.0
    assert arith_reward("What is 7 plus 5?", "13") == 0.2
    assert arith_reward("What is 7 minus 5?", "two") == 0.0


def test_quickstart_end_to_end_reduced(cache, tmp_path, capsys):
    from tunesmith.quickstart import quickstart

    out = tmp_path / "qs"
    result = quickstart(
        out,
        [
            "model.name=builtin:micro",
            "train.epochs=3",
            "train.lr=1e-2",
            "train.progress=false",
            "train.eval_every=20",
        ],
    )
    printed = capsys.readouterr().out
    assert "held-out exact match:" in printed and "after LoRA SFT" in printed
    assert result["n"] == 122 and result["after"] >= result["before"]
    history = [yaml.safe_load(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    assert evals[-1] < evals[0]  # the held-out loss falls
    assert "Quickstart: before and after" in (out / "report.md").read_text()
    assert (out / "loss.svg").stat().st_size > 0


def test_base_eval_loss_falls_after_training(cache, tmp_path, capsys):
    cfg = Path(__file__).parents[2] / "configs" / "sft_lora.yaml"
    assert main(["eval", str(cfg), "model.name=builtin:micro", "--samples", "0"]) == 0
    before = float(
        next(x for x in capsys.readouterr().out.splitlines() if x.startswith("eval_loss")).split()[
            1
        ]
    )
    run = tunesmith.train(
        cfg,
        [
            "model.name=builtin:micro",
            "train.max_steps=30",
            "train.lr=1e-2",
            f"output_dir={tmp_path / 'r'}",
            "train.progress=false",
        ],
    )
    assert run.metrics["eval_loss"] < before


OUTPUTS = {yaml.safe_load(c.read_text()).get("output_dir"): c for c in CONFIGS}


def prerequisites(config: Path) -> list[Path]:
    """The example configs whose runs ``config`` reads besides its model (a reward model, a
    teacher), found by their output_dir among the values of its sections."""
    cfg = yaml.safe_load(config.read_text())
    sections = [v for k, v in cfg.items() if isinstance(v, dict)]
    return [
        OUTPUTS[v] for sec in sections for v in sec.values() if isinstance(v, str) and v in OUTPUTS
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_configs_run(cache, tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ folders land here
    short = ["model.name=builtin:micro", "train.max_steps=3", "train.progress=false"]
    for needed in prerequisites(config):
        tunesmith.train(needed, short)
    run = tunesmith.train(
        config,
        [
            *short,
            "train.eval_every=2",
            "train.save_every=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert run.metrics["steps"] == 3 and (tmp_path / "run" / "run.json").exists()


def test_compare_methods(cache, tmp_path, capsys):
    from tunesmith.compare import compare

    cfg = Path(__file__).parents[2] / "configs" / "sft_lora.yaml"
    out = tmp_path / "cmp"
    rows = compare(
        str(cfg),
        ["lora", "prompt"],
        [
            "model.name=builtin:micro",
            "train.max_steps=3",
            "train.save_every=null",
            "train.progress=false",
            f"output_dir={out}",
        ],
        ["lora.rank=2", "prompt.train.lr=0.1", "prompt.virtual_tokens=4"],
        samples=8,
    )
    assert [r["method"] for r in rows] == ["base (untrained)", "lora", "prompt"]
    assert rows[0]["trainable_params"] == 0 and rows[0]["exact_match"] is not None
    assert all(
        r["trainable_params"] > 0 and r["artifact_mb"] > 0 and r["exact_match"] is not None
        for r in rows[1:]
    )
    lora = yaml.safe_load((out / "lora.yaml").read_text())
    assert lora["method"]["rank"] == 2 and lora["method"]["name"] == "lora"
    assert lora["train"]["lr"] == 2e-3  # another method's setting stays with that method
    prompt = yaml.safe_load((out / "prompt.yaml").read_text())
    assert prompt["train"]["lr"] == 0.1 and prompt["method"]["virtual_tokens"] == 4
    assert (
        "| lora |" in (out / "compare.md").read_text() and (out / "compare.svg").stat().st_size > 0
    )
    assert "exact match" in capsys.readouterr().out
