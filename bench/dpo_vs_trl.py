"""DPO throughput, whole-process time and peak memory: tunesmith DPO + LoRA against TRL's
DPOTrainer + PEFT LoRA on three workloads (bench/common.py ``WORKLOADS``).

Same random-initialised Qwen2-layout model, same preference pairs (a prompt and two responses of
random words), same batch size (pairs per optimiser step), learning rate, beta and epochs, each
configuration a process of its own, tunesmith and TRL alternating. Both use the base model with
the adapter disabled as the reference. TRL runs with activation checkpointing off (its faster
setting here).

    OMP_NUM_THREADS=2 python bench/dpo_vs_trl.py --workload all --examples 32

Tokens/s counts the real tokens of both sides of every pair seen, over the training loop's time.
``--only shared-vs-separate`` times tunesmith with each pair in one row against two rows
(``data.share_prompt: true / false``), e.g. on a GPU (``--workload gpu-0.5b``), where ``auto``
keeps two rows until this is measured.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Workload, main, sentence, trl_runner, tunesmith_runner, words  # noqa: E402

LR, BETA, EPOCHS, RANK, ALPHA = 5e-5, 0.1, 1, 16, 32


def make_data(root: Path, n: int, w: Workload) -> Path:
    pool, rng = words(), random.Random(0)
    path = root / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            row = {
                "prompt": sentence(rng, pool, *w.prompt_words),
                "chosen": " " + sentence(rng, pool, *w.response_words),
                "rejected": " " + sentence(rng, pool, *w.response_words),
            }
            f.write(json.dumps(row) + "\n")
    return path


def dpo_config(model: str, data: str, out: str, w: Workload, **data_settings) -> dict:
    return {
        "model": model,
        "task": "dpo",
        "method": {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"},
        "dpo": {"beta": BETA},
        "data": {"train": data, "eval": None, "max_length": w.max_length, **data_settings},
        "train": {
            "epochs": EPOCHS,
            "batch_size": w.dpo_batch,
            "lr": LR,
            "progress": False,
            "warmup": 0.0,
        },
        "output_dir": out,
    }


def trl_dpo(**settings):
    """``settings`` go to DPOConfig on top of the bench's (``bf16`` where native: ``native_bf16``)."""
    return trl_runner(
        "DPO",
        True,
        RANK,
        ALPHA,
        lambda w: {
            "per_device_train_batch_size": w.dpo_batch,
            "learning_rate": LR,
            "num_train_epochs": EPOCHS,
            "max_length": w.max_length,
            "beta": BETA,
            **settings,
        },
    )


RUNS = {
    "tunesmith dpo lora": tunesmith_runner(dpo_config),
    # data.share_prompt explicitly, to decide `auto` where it is not measured yet (GPUs)
    "tunesmith dpo lora shared rows": tunesmith_runner(
        lambda *a: dpo_config(*a, share_prompt=True)
    ),
    "tunesmith dpo lora separate rows": tunesmith_runner(
        lambda *a: dpo_config(*a, share_prompt=False)
    ),
    "trl+peft dpo lora": trl_dpo(),
    "trl+peft dpo lora bf16": trl_dpo(bf16=True),
}
COMPARISONS = {
    "lora": ("tunesmith dpo lora", "trl+peft dpo lora"),
    # TRL with bf16 autocast named (the "lora" comparison takes it where it is native, its
    # faster setting there). transformers' length-grouped sampler, TRL's faster SFT setting on a
    # CPU, is not one for DPO: DPOTrainer stops with "Can only automatically infer lengths for
    # datasets whose items are dictionaries with an 'input_ids' key", and a `length` column does
    # not survive its tokenisation (TRL 1.16, checked 2026-11-29)
    "lora-bf16": ("tunesmith dpo lora", "trl+peft dpo lora bf16"),
    # each pair in one row against two rows (tunesmith both): `data.share_prompt`
    "shared-vs-separate": ("tunesmith dpo lora shared rows", "tunesmith dpo lora separate rows"),
}
DEFAULT = ("lora",)

if __name__ == "__main__":
    main(
        __doc__,
        COMPARISONS,
        RUNS,
        make_data,
        lambda w: f"preference pairs; batch {w.dpo_batch}, lr {LR}, beta {BETA}, {EPOCHS} epoch",
        pairs=True,
        default=DEFAULT,
    )
