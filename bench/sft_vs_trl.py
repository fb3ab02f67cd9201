"""SFT throughput, whole-process time and peak memory: tunesmith (full, LoRA) against TRL's
SFTTrainer (full, PEFT LoRA) on three workloads (bench/common.py ``WORKLOADS``).

Same random-initialised Qwen2-layout model, same prompt/completion pairs, same batch size
(examples per optimiser step), learning rate and epochs, same machine, one run. Each
configuration trains as a process of its own; tunesmith and TRL alternate, ``--repeat`` rounds
each, and the ratios are the median of the round-by-round ratios. TRL runs at its faster setting
(activation checkpointing off), with and without transformers' length-grouped sampler
(`train_sampling_strategy="group_by_length"`): on a CPU the grouped batches are its faster loop
and usually its larger memory, and the last ratio line of a comparison takes each axis against
TRL's better setting there. TRL's precision follows the rule tunesmith's `auto` does (bf16
autocast where the hardware multiplies bf16 natively: ``native_bf16`` in bench/common.py)
unless a comparison names it.

    OMP_NUM_THREADS=2 python bench/sft_vs_trl.py --workload all --examples 64
    python bench/sft_vs_trl.py --workload short --only lora --repeat 3

Batches: ``train.batch_size`` is examples per micro-batch for tunesmith whether it packs or not
(a packed micro-batch lays those examples end to end in as few rows as fit ``max_length``), and
TRL's ``per_device_train_batch_size`` is examples too: both take the same examples per optimiser
step, printed next to each run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Workload, main, sentence, trl_runner, tunesmith_runner, words  # noqa: E402

LR, EPOCHS, RANK, ALPHA = 2e-4, 1, 16, 32


def make_data(root: Path, n: int, w: Workload) -> Path:
    """Prompt/completion pairs of random words, of the workload's lengths."""
    pool, rng = words(), random.Random(0)
    path = root / "data.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            row = {
                "prompt": sentence(rng, pool, *w.prompt_words),
                "completion": " " + sentence(rng, pool, *w.completion_words),
            }
            f.write(json.dumps(row) + "\n")
    return path


def tunesmith_sft(method: str, train: dict | None = None, **data_settings):
    """``data_settings`` override the data section and ``train`` the train section (the ideas in
    bench/IDEAS.md: packing, grouping, precision) on top of the defaults a user gets."""

    def config(model: str, data: str, out: str, w: Workload) -> dict:
        m = (
            {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"}
            if method == "lora"
            else "full"
        )
        return {
            "model": model,
            "method": m,
            "data": {"train": data, "eval": None, "max_length": w.max_length, **data_settings},
            "train": {
                "epochs": EPOCHS,
                "batch_size": w.batch,
                "lr": LR,
                "progress": False,
                "warmup": 0.0,
                **(train or {}),
            },
            "output_dir": out,
        }

    return tunesmith_runner(config)


def trl_sft(lora: bool, **settings):
    """``settings`` go to SFTConfig on top of the bench's (``bf16`` where native: ``native_bf16``)."""
    return trl_runner(
        "SFT",
        lora,
        RANK,
        ALPHA,
        lambda w: {
            "per_device_train_batch_size": w.batch,
            "learning_rate": LR,
            "num_train_epochs": EPOCHS,
            "max_length": w.max_length,
            **settings,
        },
    )


GROUPED = {"train_sampling_strategy": "group_by_length"}  # transformers' length-grouped sampler

RUNS = {
    "tunesmith full": tunesmith_sft("full"),
    "tunesmith lora": tunesmith_sft("lora"),
    "tunesmith lora packed": tunesmith_sft("lora", packing=True),
    "tunesmith lora ungrouped": tunesmith_sft("lora", packing=False, group_by_length=False),
    "tunesmith lora fp32": tunesmith_sft("lora", train={"precision": "fp32"}),
    "tunesmith lora bf16": tunesmith_sft("lora", train={"precision": "bf16"}),
    "tunesmith full bf16": tunesmith_sft("full", train={"precision": "bf16"}),
    "trl full": trl_sft(False),  # bf16 autocast where native (bench/common.py native_bf16)
    "trl+peft lora": trl_sft(True),
    "trl+peft lora fp32": trl_sft(True, bf16=False),
    "trl+peft lora fp32 grouped": trl_sft(True, bf16=False, **GROUPED),
    "trl full grouped": trl_sft(False, **GROUPED),
    "trl+peft lora grouped": trl_sft(True, **GROUPED),
    "trl full bf16": trl_sft(False, bf16=True),
    "trl+peft lora bf16": trl_sft(True, bf16=True),
    "trl full bf16 grouped": trl_sft(False, bf16=True, **GROUPED),
    "trl+peft lora bf16 grouped": trl_sft(True, bf16=True, **GROUPED),
}
# (tunesmith's run, TRL's settings to measure against). TRL's SFT has two settings worth
# measuring: transformers' length-grouped sampler is its faster loop (1.13-1.46x on the three
# CPU workloads), and its random batches were its smaller peak memory on two of them (the
# grouped batches' new shapes fill oneDNN's kernel caches), so the ratios against the peer's
# best take each axis from the setting that is best there in that run.
COMPARISONS = {
    "lora": ("tunesmith lora", "trl+peft lora grouped", "trl+peft lora"),
    "full": ("tunesmith full", "trl full grouped", "trl full"),
    # ideas (bench/IDEAS.md), run with --only
    "lora-packed": ("tunesmith lora packed", "trl+peft lora"),
    "lora-ungrouped": ("tunesmith lora ungrouped", "trl+peft lora"),
    # precision named on both sides (the defaults above take bf16 where it is native)
    "lora-bf16-vs-fp32": ("tunesmith lora bf16", "tunesmith lora fp32"),
    "lora-bf16": ("tunesmith lora bf16", "trl+peft lora bf16 grouped", "trl+peft lora bf16"),
    "lora-bf16-vs-trl-fp32": (
        "tunesmith lora bf16",
        "trl+peft lora fp32 grouped",
        "trl+peft lora fp32",
    ),
    "full-bf16": ("tunesmith full bf16", "trl full bf16 grouped", "trl full bf16"),
    # both in float32: what a CPU without native bf16 gets
    "lora-fp32": ("tunesmith lora fp32", "trl+peft lora fp32 grouped", "trl+peft lora fp32"),
    # TRL against itself: is the length-grouped sampler its faster setting here?
    "trl-lora-grouped": ("trl+peft lora bf16 grouped", "trl+peft lora bf16"),
    "trl-full-grouped": ("trl full bf16 grouped", "trl full bf16"),
}
DEFAULT = ("lora", "full")

if __name__ == "__main__":
    main(
        __doc__,
        COMPARISONS,
        RUNS,
        make_data,
        lambda w: (
            f"prompt/completion pairs; batch {w.batch}, lr {LR}, {EPOCHS} epoch, max length {w.max_length}"
        ),
        default=DEFAULT,
    )
