"""Built-in tasks, generated deterministically, each with a disjoint held-out split.

All tasks are built on one small world of 610 arithmetic facts: ``a plus b`` for every a, b in
0..19 and ``a minus b`` for 0 <= b <= a <= 19. The built-in base model reads every fact during
pretraining, in sentences and in several question-and-answer layouts ("Q: What is 7 plus 5?
A: 12."), but never in the chat layout the tasks use ("User: ... / Assistant: 12</s>"). Every task splits the facts the same way (a fixed seeded
shuffle: 80% train, 20% held out), so no held-out fact is ever trained on by any task.

Use them by name anywhere a data file goes: ``builtin:arith`` (train split) and
``builtin:arith:eval`` (held-out split).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from tunesmith.data.io import register_source
from tunesmith.data.records import Record
from tunesmith.errors import DataError

OPS = {"plus": "+", "minus": "-"}


@dataclass(frozen=True)
class Fact:
    a: int
    op: str  # plus | minus
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "plus" else self.a - self.b


@cache
def all_facts() -> tuple[Fact, ...]:
    facts = [Fact(a, "plus", b) for a in range(20) for b in range(20)]
    facts += [Fact(a, "minus", b) for a in range(20) for b in range(a + 1)]
    return tuple(facts)


@cache
def fact_split() -> tuple[tuple[Fact, ...], tuple[Fact, ...]]:
    """(train facts, held-out facts): a fixed 80/20 split shared by every task."""
    facts = list(all_facts())
    random.Random(1234).shuffle(facts)
    cut = int(0.8 * len(facts))
    return tuple(facts[:cut]), tuple(facts[cut:])


def question(f: Fact) -> str:
    return f"What is {f.a} {f.op} {f.b}?"


WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3, 10)  # plausible slips: near misses and a carry error
PAIRS_PER_QUESTION = 4


def _arith(f: Fact, rng: random.Random) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": question(f)},
                {"role": "assistant", "content": str(f.answer)},
            ]
        }
    ]


def _wrong_answers(f: Fact, rng: random.Random, k: int) -> list[int]:
    """k distinct plausible wrong answers (never negative)."""
    wrong = [f.answer + d for d in WRONG_OFFSETS if f.answer + d >= 0]
    return rng.sample(wrong, k)


def _arith_pref(f: Fact, rng: random.Random) -> list[dict]:
    """Several comparisons per question (like datasets that rank several completions per prompt):
    with one wrong answer per question, DPO learns to avoid that number in that context, which on
    held-out questions also pushes down right answers; with several it learns to prefer the right one."""
    return [
        {
            "prompt": [{"role": "user", "content": question(f)}],
            "chosen": [{"role": "assistant", "content": str(f.answer)}],
            "rejected": [{"role": "assistant", "content": str(w)}],
        }
        for w in _wrong_answers(f, rng, PAIRS_PER_QUESTION)
    ]


def _arith_check(f: Fact, rng: random.Random) -> list[dict]:
    correct = rng.random() < 0.5
    shown = f.answer if correct else _wrong_answers(f, rng, 1)[0]
    return [{"text": f"{f.a} {OPS[f.op]} {f.b} = {shown}", "label": int(correct)}]


@dataclass(frozen=True)
class Task:
    name: str
    make: object  # (Fact, Random) -> list of records' fields
    about: str


TASKS = {
    "arith": Task(
        "arith",
        _arith,
        "instruction task (chat): 'What is 7 plus 5?' -> '12'. Scored by exact match of the greedy answer on held-out facts.",
    ),
    "arith_pref": Task(
        "arith_pref",
        _arith_pref,
        f"preference task: prompt, chosen (the right answer), rejected (a wrong one), {PAIRS_PER_QUESTION} pairs per question. Scored by preference accuracy.",
    ),
    "arith_check": Task(
        "arith_check",
        _arith_check,
        "classification task: 'text' is an equation, 'label' 1 if it is right, 0 if wrong (balanced). Scored by accuracy.",
    ),
}


def task_records(source: str) -> list[Record]:
    """Records of ``builtin:NAME`` (train split) or ``builtin:NAME:eval`` (held-out split)."""
    parts = source.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
    if name not in TASKS or split not in ("train", "eval") or len(parts) > 3:
        raise DataError(
            f"{source}: unknown built-in data; available: "
            + ", ".join(f"builtin:{n}[:eval]" for n in TASKS)
            + "."
        )
    train, held = fact_split()
    facts = train if split == "train" else held
    rng = random.Random(f"{name}:{split}")
    fields = [r for f in facts for r in TASKS[name].make(f, rng)]
    return [Record(r, f"{source} #{i}") for i, r in enumerate(fields)]


register_source("builtin:", task_records)


def arith_reward(prompt: str, completion: str) -> float:
    """Reward for RL on arithmetic prompts: 1 for the right number, 0.2 for a bare wrong number
    (right format), 0 otherwise."""
    m = re.search(r"What is (\d+) (plus|minus) (\d+)\?", prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    truth = Fact(int(m.group(1)), m.group(2), int(m.group(3))).answer
    answer = completion.strip()
    if not re.fullmatch(r"-?\d+", answer):
        return 0.0
    return 1.0 if int(answer) == truth else 0.2


def describe_tasks() -> str:
    train, held = fact_split()
    lines = [f"built-in tasks ({len(train)} train / {len(held)} held-out facts each):"]
    lines += [f"  builtin:{t.name:<12} {t.about}" for t in TASKS.values()]
    lines.append(
        "  reward function: tunesmith.builtin.tasks.arith_reward(prompt, completion): 1 right, 0.2 a wrong bare number, 0 else."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Pretraining corpus for the built-in base model: facts in plain sentences, never as chat.

SENTENCES = (
    "{a} {op} {b} is {c}.",
    "{a} {sym} {b} = {c}.",
    "Q: What is {a} {op} {b}? A: {c}.",
    "Question: What is {a} {op} {b}?\nAnswer: {c}.",
    "Student: What is {a} {op} {b}?\nTeacher: {c}.",
    "Human: What is {a} {op} {b}?\nBot: {c}.",
)


def pretraining_corpus(documents: int, seed: int = 0) -> list[str]:
    """Documents of a few fact sentences each, covering every fact (train and held-out alike:
    the base model knows the arithmetic; the tasks teach it the format)."""
    rng = random.Random(seed)
    facts = list(all_facts())
    docs = []
    for _ in range(documents):
        parts = []
        for f in rng.sample(facts, k=rng.randint(3, 6)):
            parts.append(
                rng.choice(SENTENCES).format(a=f.a, op=f.op, sym=OPS[f.op], b=f.b, c=f.answer)
            )
        docs.append(" ".join(parts))
    return docs
