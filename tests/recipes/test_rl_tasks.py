"""``task: grpo`` and ``task: ppo`` end to end on tiny random models: prompts from every
prompt-bearing format, learning a reward through the whole pipeline, exact resume (rollout RNG and
KL controller included), the logged RL metrics, samples.jsonl, ``tunesmith eval`` and one-line
errors."""

import json
import sys

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

import tunesmith
from tunesmith.config import load_config
from tunesmith.data.dataset import prepare_data
from tunesmith.data.formats import prompt_of
from tunesmith.data.io import Record
from tunesmith.data.kinds import PROMPTS
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluate import evaluate_target
from tunesmith.models import load_tokenizer
from tunesmith.rewards import RewardError

REWARDS = '''
def lower(prompts, completions):
    """Share of lowercase letters: about a quarter of the tiny vocabulary at random."""
    return [sum(c.islower() for c in t) / max(len(t), 1) for t in completions]

def match(prompts, completions, records):
    return [float(c.strip() == r["completion"].strip()) for c, r in zip(completions, records)]

def broken(prompts, completions):
    return [1.0]
'''


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "rl_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rl_rewards"
    sys.modules.pop("rl_rewards", None)


@pytest.fixture
def prompts(tmp_path):
    rows = [
        {"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a in range(6) for b in range(6)
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def rl_config(model, data, out, task="grpo", method="lora", **section):
    train = section.pop("train", {})
    return {
        "model": str(model),
        "task": task,
        "method": method,
        "data": {"train": str(data), "eval": 0.25, "max_length": 64},
        task: {"max_new_tokens": 6, "eval_prompts": 8, "samples_every": 1, **section},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "progress": False,
            "warmup": 0,
            **train,
        },
        "output_dir": str(out),
    }


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Prompts from every prompt-bearing format


def test_prompt_of_every_format(llama):
    tok = load_tokenizer(load_config({"model": str(llama)}).model, str(llama))
    tpl = tok.chat_template
    chat = [{"role": "user", "content": "2+2?"}]
    cases = {
        "prompt": ({"prompt": "Say hi"}, "Say hi", None),
        "prompt_completion": ({"prompt": "1+1=", "completion": "2"}, "1+1=", "2"),
        "preference": ({"prompt": chat, "chosen": "4", "rejected": "5"}, None, "4"),
        "chat": ({"messages": chat + [{"role": "assistant", "content": "4"}]}, None, "4"),
        "alpaca": ({"instruction": "Add 1 and 1", "output": "2"}, None, "2"),
    }
    for fmt, (fields, rendered, ref) in cases.items():
        r, raw, reference = prompt_of(Record(fields, f"x.jsonl:{fmt}"), fmt, tok, tpl)
        assert reference == ref, fmt
        if rendered is not None:
            assert r == rendered and raw == rendered
    r, raw, _ = prompt_of(Record({"messages": chat}, "x:1"), "chat", tok, tpl)
    assert raw == chat and r.endswith(
        tok.apply_chat_template(
            chat, chat_template=tpl, tokenize=False, add_generation_prompt=True
        )[-10:]
    )
    with pytest.raises(DataError, match="x.jsonl:7: an empty prompt"):
        prompt_of(Record({"prompt": ""}, "x.jsonl:7"), "prompt", tok, tpl)


def test_prompt_only_data_trains_rl_and_is_refused_by_sft(llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Q{i}"} for i in range(10)])
    tok = load_tokenizer(load_config({"model": str(llama)}).model, str(llama))
    cfg = load_config(rl_config(llama, data, tmp_path / "o"))
    prepared = prepare_data(cfg.data, tok, 0, PROMPTS)
    assert prepared.format == "prompt" and not prepared.train
    assert len(prepared.train_records) + len(prepared.eval_records) == 10
    with pytest.raises(ConfigError, match="data.format: 'prompt' does not fit this task"):
        prepare_data(cfg.data, tok, 0)  # sft's examples


def test_rl_config_errors(llama, prompts, tmp_path):
    c = rl_config(llama, prompts, tmp_path / "o", group_size=1)
    with pytest.raises(ConfigError, match="grpo.group_size"):
        load_config(c)
    c = rl_config(llama, prompts, tmp_path / "o", task="ppo")
    c["train"]["max_steps"] = None
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(c)
    c = rl_config(llama, prompts, tmp_path / "o", task="ppo", minibatches=5)
    with pytest.raises(ConfigError, match="ppo.minibatches"):
        load_config(c)


# ----------------------------------------------------------------------------------------------
# Learning through the whole pipeline


def test_grpo_raises_the_reward_through_the_pipeline(llama, prompts, rewards, tmp_path):
    out = tmp_path / "grpo"
    c = rl_config(
        llama,
        prompts,
        out,
        method="full",
        reward=f"{rewards}:lower",
        group_size=8,
        epochs=4,
        temperature=1.0,
        train={"max_steps": 40, "lr": 3e-2, "schedule": "constant", "max_grad_norm": None},
    )
    tunesmith.train(c)
    rows = [r for r in metrics(out) if "reward_mean" in r]
    assert len(rows) == 40
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert first < 0.4 and last > 0.7, (first, last)
    # Rollout statistics are the rollout batch's own, identical over its 4 steps.
    assert len({r["reward_mean"] for r in rows[:4]}) == 1
    for key in ("reward_std", "response_len", "entropy", "clip_frac", "approx_kl"):
        assert key in rows[-1], key
    evals = [r for r in metrics(out) if "eval_reward" in r]  # greedy: already lowercase here
    assert evals[-1]["eval_loss"] == pytest.approx(-evals[-1]["eval_reward"])
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "rollout"} <= set(samples[0])
    report = (out / "report.md").read_text()
    assert "rl.svg" in report and (out / "rl.svg").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_raises_the_reward_through_the_pipeline(llama, prompts, rewards, tmp_path, method):
    out = tmp_path / "ppo"
    c = rl_config(
        llama,
        prompts,
        out,
        task="ppo",
        method=method if method == "full" else {"name": "lora", "rank": 8, "alpha": 32},
        reward=f"{rewards}:lower",
        group_size=4,
        epochs=4,
        kl_coef=0.01,
        value_coef=0.5,
        train={
            "max_steps": 40,
            "lr": 3e-2,
            "schedule": "constant",
            "max_grad_norm": None,
        },
    )
    tunesmith.train(c)
    rows = [r for r in metrics(out) if "reward_mean" in r]
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-4:]) / 4
    if method == "full":  # (LoRA on a random model learns this too slowly for a unit test)
        assert first < 0.4 and last > first + 0.25, (first, last)
    assert rows[-1]["value_loss"] > 0 and rows[-1]["kl_coef"] == 0.01
    assert "kl_penalty" in rows[-1] and "value_clip_frac" in rows[-1]
    if method == "lora":  # the reference is the base with the adapter off: a KL for free
        assert rows[-1]["kl_ref_seq"] != 0


def test_adaptive_kl_coefficient_moves(llama, prompts, rewards, tmp_path):
    out = tmp_path / "ppo"
    c = rl_config(
        llama,
        prompts,
        out,
        task="ppo",
        reward=f"{rewards}:lower",
        kl_control="adaptive",
        kl_target=0.01,
        kl_horizon=8,
        train={"max_steps": 3, "lr": 3e-2},
    )
    tunesmith.train(c)
    rows = [r for r in metrics(out) if "kl_coef" in r]
    assert rows[0]["kl_coef"] == pytest.approx(0.05)
    for before, after in zip(rows, rows[1:]):  # one rollout batch of 4 responses per step
        error = min(max(before["kl_penalty"] / 0.01 - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 4 / 8))
    assert len({r["kl_coef"] for r in rows}) == 3


# ----------------------------------------------------------------------------------------------
# Resume, eval, errors


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_resume_equals_uninterrupted(llama, prompts, rewards, tmp_path, task):
    """Checkpoints fall inside a rollout batch (2 epochs x 2 mini-batches per rollout, a
    checkpoint every 3 steps): the pending micro-batches, the sampling generator and the KL
    controller all come back."""
    import tunesmith.training.loop as loop

    def cfg(out):
        extra = (
            {"kl_control": "adaptive", "kl_target": 0.01, "kl_horizon": 16} if task == "ppo" else {}
        )
        return rl_config(
            llama,
            prompts,
            out,
            task=task,
            reward=f"{rewards}:lower",
            epochs=2,
            minibatches=2,
            **extra,
            train={"max_steps": 8, "save_every": 3, "keep_checkpoints": 5},
        )

    tunesmith.train(cfg(tmp_path / "full"))

    class Stop(Exception):
        pass

    original = loop.save_checkpoint

    def save_then_stop(*a, **k):
        original(*a, **k)
        raise Stop

    loop.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            tunesmith.train(cfg(tmp_path / "part"))
    finally:
        loop.save_checkpoint = original
    tunesmith.train(cfg(tmp_path / "part"), resume=True)
    a = [r for r in metrics(tmp_path / "full") if "loss" in r]
    b = [r for r in metrics(tmp_path / "part") if "loss" in r]
    for key in ("loss", "reward_mean", "response_len"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
    wa = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_eval_reports_reward_and_exact_match(llama, prompts, rewards, tmp_path):
    out = tmp_path / "run"
    c = rl_config(llama, prompts, out, reward=f"{rewards}:match", train={"max_steps": 2})
    result = tunesmith.train(c)
    again = evaluate_target(str(out))
    assert again["eval_prompts"] == 9
    assert {"eval_reward", "eval_exact_match", "eval_response_len"} <= set(again)
    assert again["eval_reward"] == pytest.approx(result.metrics["eval_reward"])
    # With the reference answers as the reward, reward and exact match agree.
    assert again["eval_reward"] == pytest.approx(again["eval_exact_match"])
    # The starting model of a config can be scored too (the "before" of a comparison).
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(c))
    before = evaluate_target(str(cfg_path))
    assert "eval_reward" in before


def test_a_bad_reward_stops_with_one_line(llama, prompts, rewards, tmp_path):
    c = rl_config(llama, prompts, tmp_path / "o", reward=f"{rewards}:broken")
    with pytest.raises(RewardError, match="reward rl_rewards:broken returned 1 values for 16"):
        tunesmith.train(c)


def test_data_preview_shows_prompts(llama, prompts, tmp_path, capsys):
    import yaml

    from tunesmith.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(rl_config(llama, prompts, tmp_path / "o")))
    assert main(["data", "preview", str(cfg_path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "27 train, 9 eval prompts" in out and "Q: " in out and "(reference answer: " in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_keeps_a_frozen_reference_copy_in_its_dtype(llama, prompts, rewards, tmp_path, dtype):
    """With ``full`` the base itself trains, so the reference is a frozen copy of the starting
    model (in ``reference_dtype``) that gives the starting policy's log-probs; a method with a
    frozen base gets no copy."""
    from tunesmith.pipeline import setup_run
    from tunesmith.training.rollout import response_logps, rollout

    cfg = load_config(
        rl_config(
            llama,
            prompts,
            tmp_path / "run",
            method="full",
            reward=f"{rewards}:lower",
            kl_coef=0.1,
            reference_dtype=dtype,
        )
    )
    run = setup_run(cfg)
    policy, reference = run.ctx.model, run.ctx.shared["rl"]["reference"]
    frozen = reference.model
    assert frozen is not policy
    assert all(p.dtype == getattr(torch, dtype) for p in frozen.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    out = rollout(policy, run.ctx.tokenizer, ["Q: 1+2=", "Q: 3+3="], 4, 1.0)
    R = out.response_mask.shape[1]
    mine = response_logps(policy, out.input_ids, out.attention_mask, R)[0] * out.response_mask
    ref = reference(policy, out.input_ids, out.attention_mask, R) * out.response_mask
    tol = 1e-5 if dtype == "float32" else 0.1
    torch.testing.assert_close(ref, mine, atol=tol, rtol=0)
    with torch.no_grad():  # the policy moves; the reference stays where it started
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = reference(policy, out.input_ids, out.attention_mask, R) * out.response_mask
    assert torch.equal(again, ref)

    lora = load_config(
        rl_config(llama, prompts, tmp_path / "lora", reward=f"{rewards}:lower", kl_coef=0.1)
    )
    assert not hasattr(setup_run(lora).ctx.shared["rl"]["reference"], "model")
