"""DPO throughput and peak memory: tunesmith DPO + LoRA against TRL's DPOTrainer + PEFT LoRA.

Same random-initialised Qwen2-layout model (~25 M parameters), same preference pairs (a prompt
and two responses of random words, of varied length), same batch size, learning rate, beta and
epochs, one run, each configuration in its own subprocess. Both use the base model with the
adapter disabled as the reference. TRL runs with its default activation checkpointing and without.

    python bench/dpo_vs_trl.py                  # ~10 min on 2 CPU cores
    python bench/dpo_vs_trl.py --examples 32    # a quick look

Tokens/s counts the real tokens of both sides of every pair seen, over the training loop's time.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main, sentence, trl_peft_runner, tunesmith_runner, words  # noqa: E402

BATCH, LR, BETA, MAX_LEN, EPOCHS, RANK, ALPHA = 8, 5e-5, 0.1, 512, 1, 16, 32


def make_data(root: Path, n: int) -> Path:
    pool, rng = words(), random.Random(0)
    path = root / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            row = {
                "prompt": sentence(rng, pool, 10, 120),
                "chosen": " " + sentence(rng, pool, 5, 100),
                "rejected": " " + sentence(rng, pool, 5, 100),
            }
            f.write(json.dumps(row) + "\n")
    return path


def dpo_config(model: str, data: str, out: str) -> dict:
    return {
        "model": model,
        "task": "dpo",
        "method": {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"},
        "dpo": {"beta": BETA},
        "data": {"train": data, "eval": None, "max_length": MAX_LEN},
        "train": {
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "lr": LR,
            "progress": False,
            "warmup": 0.0,
        },
        "output_dir": out,
    }


def trl_dpo(checkpointing: bool):
    return trl_peft_runner(
        "DPO",
        checkpointing,
        RANK,
        ALPHA,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        num_train_epochs=EPOCHS,
        max_length=MAX_LEN,
        beta=BETA,
    )


RUNS = {
    "tunesmith dpo lora": tunesmith_runner(dpo_config),
    "trl+peft dpo lora (checkpointing on, default)": trl_dpo(True),
    "trl+peft dpo lora (checkpointing off)": trl_dpo(False),
}

if __name__ == "__main__":
    main(
        __doc__,
        RUNS,
        make_data,
        f"preference pairs; batch {BATCH}, lr {LR}, beta {BETA}, {EPOCHS} epoch",
        MAX_LEN,
        pairs=True,
    )
