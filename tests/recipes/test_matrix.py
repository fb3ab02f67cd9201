"""The task x method matrix: every registered task with every registered method.

For each pair, a few steps on builtin:micro (pretrained, so every method's change shows in its
outputs) must move the task's held-out metrics the right way, change only the method's weights
(plus any new head), and save an artifact that loads back to the same held-out numbers. The
matrix grows by itself when a task or a method is registered; a new *record kind* needs its
training data below."""

import json

import pytest
from conftest import write_jsonl

from tunesmith.config import load_config
from tunesmith.evaluate import evaluate_target
from tunesmith.methods import method_names
from tunesmith.methods.base import canonical
from tunesmith.pipeline import finish_run, run_training, setup_run
from tunesmith.tasks import TASKS
from tunesmith.training.loop import LOOPS

QUESTIONS = [(a, b) for a in range(4) for b in range(4)]
DATA = {  # record kind -> rows to train (and evaluate) on
    "examples": [{"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a, b in QUESTIONS],
    "pairs": [
        {"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 3}"}
        for a, b in QUESTIONS
    ],
    # The class is a property of the sum, which the last token (a decoder's summary) predicts.
    "labeled": [
        {"text": f"Q: {a}+{b}=", "label": "low" if a + b < 3 else "high"} for a, b in QUESTIONS
    ],
    "prompts": [{"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a, b in QUESTIONS],
}
RL = {"reward": "test_matrix:digits", "max_new_tokens": 6, "group_size": 4, "temperature": 0.7}
# PPO without its KL penalty here: for prefix and prompt tuning the reference (the base with the
# method disabled) is not the starting policy, and in 16 steps the penalty pulls towards it.
# DPO at 1e-2 moves 16 steps of LoRA to either side of log 2 depending on the seed (measured over
# ten seeds); at 3e-3 every seed improves.
LR = {"dpo": 3e-3}
SETTINGS = {"grpo": {"grpo": RL}, "ppo": {"ppo": {**RL, "kl_coef": 0.0}}}  # task -> sections

# (task, method) -> why the pair's held-out metric does not rise yet. Every other check of the
# matrix (only the method's weights change, the artifact loads back to the same numbers) still
# holds for these pairs; only the direction check becomes an xfail when it fails.
# Soft prompts and RL on micro: the prompt's vocabulary init turns micro's greedy answer (spaces,
# reward 0) into " 11111" (0.69-0.83), a lucky mode, while its samples at temperature 0.7 are
# near-uniform (entropy 3.6 of 4.6 nats, reward ~0.2). Following the samples knocks the greedy
# answer back to spaces: measured for seeds 0-3 at lr 3e-3 to 1e-1, temperature 0.3 to 1.0 and
# groups of 4 to 16 (sampled reward rose to ~0.3 with groups of 16, greedy fell to 0 all the same).
# From a text init (greedy reward 0) 16 steps lift greedy reward in only 1-2 of 4 seeds. With
# per-row sampling seeds (the torchrun-invariant rollouts) no seed keeps its lucky start; before
# them seed 0 happened to pass.
RL_SOFT_PROMPT = (
    "a soft prompt's lucky greedy start on micro does not survive 16 RL steps (see KNOWN_GAPS)"
)
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("grpo", "prompt"): RL_SOFT_PROMPT,
    ("ppo", "prompt"): RL_SOFT_PROMPT,
}


def digits(prompts, completions):
    """The RL tasks' reward here: the share of digits in the response (dense, learnable fast)."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


@pytest.fixture(scope="module")
def classifier(micro, tmp_path_factory):
    """A classifier trained from micro: the teacher of distill_classify."""
    root = tmp_path_factory.mktemp("teacher")
    data = write_jsonl(root / "data.jsonl", DATA["labeled"])
    run_training(
        load_config(
            {
                "model": micro,
                "task": "classify",
                "method": "full",
                "data": {"train": str(data), "eval": None, "max_length": 32},
                "train": {"max_steps": 32, "batch_size": 8, "lr": 1e-2, "progress": False},
                "output_dir": str(root / "run"),
            }
        )
    )
    return str(root / "run")


def task_settings(task, micro, classifier):
    """Task sections a task needs to run at all (a distillation's teacher), by task name: the
    students keep 1 of the teacher's 2 layers."""
    return {
        "distill": {"distill": {"teacher": micro, "student": {"layers": [0]}}},
        "distill_classify": {
            "distill_classify": {"teacher": classifier, "student": {"layers": [0]}}
        },
    }.get(task, {})


@pytest.fixture
def cache(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))  # reference log-probs


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("task", list(TASKS))
def test_task_with_method(cache, micro, tmp_path, task, method, request):
    spec = TASKS[task]
    data = write_jsonl(tmp_path / "data.jsonl", DATA[spec.records.name])
    out = tmp_path / "run"
    cfg = load_config(
        {
            "model": micro,
            "task": task,
            "method": method,
            "data": {"train": str(data), "eval": str(data), "max_length": 32},
            "train": {
                "max_steps": 16,
                "batch_size": 8,
                "lr": LR.get(task, 1e-2),
                "eval_every": 16,
                "progress": False,
            },
            "output_dir": str(out),
            **SETTINGS.get(task, {}),
            **task_settings(
                task,
                micro,
                request.getfixturevalue("classifier") if task == "distill_classify" else None,
            ),
        }
    )
    run = setup_run(cfg)
    c = run.ctx
    before = {canonical(n): p.detach().clone() for n, p in c.model.named_parameters()}
    result = LOOPS[spec.loop](
        c.model, c.method, run.objective, run.source, run.evals, cfg.train, out, c.device
    )
    # Only the method's weights (and a new head) changed.
    trainable = {canonical(n) for n, _ in c.method.trainable_parameters()}
    assert trainable
    for name, p in c.model.named_parameters():
        plain = canonical(name)
        if plain in trainable:
            continue
        assert plain in before, f"{plain}: a parameter the method added but does not train"
        assert p.detach().equal(before[plain]), f"frozen {plain} changed"
    assert any(
        not p.detach().equal(before[canonical(n)]) for n, p in c.method.trainable_parameters()
    )
    finish_run(run, result)  # (merging for the artifact may fold the method in)

    # The saved artifact loads back to the same held-out numbers.
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and "eval_loss" in start and "eval_loss" in end
    again = evaluate_target(str(out), samples=0)
    assert again["eval_loss"] == pytest.approx(end["eval_loss"], rel=1e-4, abs=1e-5)
    for metric in spec.rising:
        assert again[metric] == pytest.approx(end[metric])

    # The task's held-out metrics move the right way.
    moved = end["eval_loss"] < start["eval_loss"] and all(end[m] > start[m] for m in spec.rising)
    if not moved and (task, method) in KNOWN_GAPS:
        pytest.xfail(KNOWN_GAPS[task, method])
    assert end["eval_loss"] < start["eval_loss"]
    for metric in spec.rising:
        assert end[metric] > start[metric], metric
