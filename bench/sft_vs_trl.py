"""SFT throughput and peak memory: tunesmith (full, LoRA) against TRL's SFTTrainer + PEFT LoRA.

Same random-initialised Qwen2-layout model (~25 M parameters, a 16k byte-level BPE vocabulary),
same prompt/completion pairs of varied length, same batch size, learning rate and epochs, same
machine, one run. Each configuration trains in its own subprocess so peak memory is its own.
TRL runs twice: with its default activation checkpointing, and without.

    python bench/sft_vs_trl.py                  # ~10 min on 2 CPU cores
    python bench/sft_vs_trl.py --examples 32    # a quick look

Tokens/s counts real (non-padding) tokens of the examples seen, divided by the training loop's
wall time (data preparation excluded for both). Peak memory is the GPU's max allocated memory
on CUDA, else the process's peak resident set size.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main, sentence, trl_peft_runner, tunesmith_runner, words  # noqa: E402

BATCH, LR, MAX_LEN, EPOCHS, RANK, ALPHA = 8, 2e-4, 512, 1, 16, 32


def make_data(root: Path, n: int) -> Path:
    """Prompt/completion pairs of random words, 10 to 150 words each side."""
    pool, rng = words(), random.Random(0)
    path = root / "data.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": sentence(rng, pool, 10, 150),
                        "completion": " " + sentence(rng, pool, 10, 150),
                    }
                )
                + "\n"
            )
    return path


def tunesmith_sft(method: str):
    def config(model: str, data: str, out: str) -> dict:
        m = (
            {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"}
            if method == "lora"
            else "full"
        )
        return {
            "model": model,
            "method": m,
            "data": {"train": data, "eval": None, "max_length": MAX_LEN, "packing": True},
            "train": {
                "epochs": EPOCHS,
                "batch_size": BATCH,
                "lr": LR,
                "progress": False,
                "warmup": 0.0,
            },
            "output_dir": out,
        }

    return tunesmith_runner(config)


def trl_sft(checkpointing: bool):
    return trl_peft_runner(
        "SFT",
        checkpointing,
        RANK,
        ALPHA,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        num_train_epochs=EPOCHS,
        max_length=MAX_LEN,
    )


RUNS = {
    "tunesmith full": tunesmith_sft("full"),
    "tunesmith lora": tunesmith_sft("lora"),
    "trl+peft lora (checkpointing on, default)": trl_sft(True),
    "trl+peft lora (checkpointing off)": trl_sft(False),
}

if __name__ == "__main__":
    main(
        __doc__,
        RUNS,
        make_data,
        f"prompt/completion pairs; batch {BATCH}, lr {LR}, {EPOCHS} epoch",
        MAX_LEN,
    )
