"""Reward sources (rewards.py): Python functions with their failures reported in one line, the
built-in arithmetic reward, and trained reward models scored exactly as in their training."""

import sys
import textwrap

import pytest
import torch
from conftest import write_jsonl

import tunesmith
from tunesmith.builtin.tasks import arith_reward
from tunesmith.rewards import (
    BuiltinReward,
    FunctionReward,
    RewardError,
    RewardModel,
    load_reward,
    missing_end_penalty,
)

MODULE = """
import math

def good(prompts, completions):
    return [float(len(c)) - (p == "skip") for p, c in zip(prompts, completions)]

def with_records(prompts, completions, records):
    return [float(c == r["answer"]) for c, r in zip(completions, records)]

def raises(prompts, completions):
    raise KeyError("no score for " + completions[0])

def short(prompts, completions):
    return [1.0]

def words(prompts, completions):
    return [1.0, "high"]

def nan(prompts, completions):
    return [0.0, math.nan]

def inf(prompts, completions):
    return [math.inf, 0.0]

def scalar(prompts, completions):
    return 3.0

def tensor(prompts, completions):
    import torch
    return torch.tensor([0.5, 1.5])
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"my_rewards_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_good_function(user_module):
    r = load_reward(f"{user_module}:good")
    assert isinstance(r, FunctionReward)
    assert r(["a", "skip"], ["xyz", "ab"]) == [3.0, 1.0]
    assert load_reward(f"{user_module}:tensor")(["a", "b"], ["x", "y"]) == [0.5, 1.5]


def test_a_function_gets_records_when_it_asks_for_them(user_module):
    r = load_reward(f"{user_module}:with_records")
    assert r(["q", "q"], ["4", "5"], [{"answer": "4"}, {"answer": "4"}]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "fn, says",
    [
        ("raises", "raised KeyError: 'no score for x'"),
        ("short", "returned 1 values for 2 completions"),
        ("words", "returned 'high' (str) for completion 1"),
        ("nan", "returned nan for completion 1"),
        ("inf", "returned inf for completion 0"),
        ("scalar", "returned 3.0 (float)"),
    ],
)
def test_a_bad_function_stops_with_one_line(user_module, fn, says):
    r = load_reward(f"{user_module}:{fn}")
    with pytest.raises(RewardError) as e:
        r(["p", "q"], ["x", "y"])
    message = str(e.value)
    assert f"reward {user_module}:{fn} " in message and says in message
    assert "\n" not in message
    assert isinstance(e.value, tunesmith.TunesmithError)


def test_bad_names_are_reported(user_module):
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:score")
    with pytest.raises(RewardError, match="has no function 'missing'"):
        load_reward(f"{user_module}:missing")
    with pytest.raises(RewardError, match="available: builtin:arith"):
        load_reward("builtin:chess")
    with pytest.raises(RewardError, match="not a folder"):
        load_reward("just-a-name")


def test_builtin_arith_matches_arith_reward():
    r = load_reward("builtin:arith")
    assert isinstance(r, BuiltinReward)
    prompts = ["What is 7 plus 5?", "What is 9 minus 4?", "What is 3 plus 3?", "What is 0 plus 1?"]
    completions = ["12", " 6 ", "six", "1"]
    expected = [arith_reward(p, c) for p, c in zip(prompts, completions)]
    assert expected == [1.0, 0.2, 0.0, 1.0]
    assert r(prompts, completions) == expected
    # Chat prompts (as the built-in task's records hold them): the last user message is read.
    chat = [[{"role": "user", "content": p}] for p in prompts]
    assert r(chat, completions) == expected
    with pytest.raises(RewardError, match="reward builtin:arith raised ValueError: not an arith"):
        r(["Tell me a joke"], ["no"])


def test_missing_end_penalty():
    assert missing_end_penalty([1.0, 0.5, 0.0], [True, False, False], 0.5) == [1.0, 0.0, -0.5]


# ---------------------------------------------------------------------------------------------
# Reward models


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory, tiny_models):
    """Two tiny reward runs on chat pairs: lora (saved merged, a whole model) and prefix (saved
    as base + method: it cannot be merged)."""
    root = tmp_path_factory.mktemp("rm")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": str(a + b + 2)}],
        }
        for a in range(3)
        for b in range(3)
    ]
    data = write_jsonl(root / "pairs.jsonl", rows)
    runs = {}
    for method in ("lora", "prefix"):
        tunesmith.train(
            {
                "model": str(tiny_models["llama"]),
                "task": "reward",
                "method": {"name": method},
                "data": {"train": str(data), "eval": 0, "max_length": 64},
                "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False},
                "output_dir": str(root / method),
            }
        )
        runs[method] = root / method
    return runs, rows


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_reward_model_scores_as_in_training(reward_runs, method):
    """The score of prompt + completion equals the trained head's reward on the very tokens the
    training pipeline made of that pair, and ``tunesmith score``'s."""
    from tunesmith.data.dataset import tokenize_records
    from tunesmith.data.io import Record
    from tunesmith.score import score

    runs, rows = reward_runs
    r = load_reward(str(runs[method]))
    assert isinstance(r, RewardModel)
    prompts = [row["prompt"] for row in rows[:3]] * 2
    completions = [row["chosen"][0]["content"] for row in rows[:3]] + [
        row["rejected"][0]["content"] for row in rows[:3]
    ]
    ours = r(prompts, completions)

    cfg = tunesmith.config.load_config(runs[method] / "config.yaml")
    records = [Record(row, f"pairs #{i}") for i, row in enumerate(rows[:3])]
    examples, _ = tokenize_records(
        records, "preference", cfg.data, r.tokenizer, r.tokenizer.chat_template, False
    )
    order = [0, 2, 4, 1, 3, 5]  # examples alternate chosen, rejected
    with torch.no_grad():
        for k, i in enumerate(order):
            ids = torch.from_numpy(examples[i].input_ids)[None]
            assert ids[0].tolist() == r.encode(prompts[k], completions[k])
            logits = r.model(input_ids=ids).logits
            # the head reads the last non-padding token: the response's end, not one before it
            last = int((ids[0] != r.model.config.pad_token_id).nonzero().max())
            assert ours[k] == pytest.approx(float(logits[0, 0]), abs=1e-5)
            assert last == ids.shape[1] - 1

    text = rows[0]["prompt"][0]["content"]
    assert score(str(runs[method]), text, [completions[0], completions[3]]) == pytest.approx(
        [ours[0], ours[3]], abs=1e-5
    )
    # Batching (right padding) changes nothing: each alone scores the same.
    alone = [r([p], [c])[0] for p, c in zip(prompts, completions)]
    assert ours == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 4) for x in ours)) > 1  # a real head, not a constant


def test_a_folder_that_is_no_reward_model_is_refused(tiny_models):
    with pytest.raises(RewardError, match="not a reward model"):
        RewardModel(tiny_models["llama"])


def test_a_module_beside_the_run_is_found_and_its_own_errors_are_named(tmp_path, monkeypatch):
    """The installed `tunesmith` script does not put the folder it runs from on sys.path (as
    `python -m` does); reward modules there are found all the same."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "here_reward_mod.py").write_text("def score(p, c):\n    return [1.0] * len(c)\n")
    assert load_reward("here_reward_mod:score")(["p"], ["c"]) == [1.0]
    assert str(tmp_path) not in sys.path  # put back
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('no key set')\n")
    with pytest.raises(
        RewardError, match="importing 'broken_reward_mod' raised RuntimeError: no key set"
    ):
        load_reward("broken_reward_mod:score")
    (tmp_path / "pkg_reward_mod").mkdir()  # the package is there, its module is not
    (tmp_path / "pkg_reward_mod" / "__init__.py").write_text("")
    with pytest.raises(RewardError, match="cannot import module 'pkg_reward_mod.nope'"):
        load_reward("pkg_reward_mod.nope:score")
    (tmp_path / "needs_reward_mod.py").write_text("import not_installed_pkg_xyz\n")
    with pytest.raises(RewardError, match="importing 'needs_reward_mod' failed: No module named"):
        load_reward("needs_reward_mod:score")
