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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main, peak_mb, sentence, words  # noqa: E402

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


def tunesmith_dpo(model: str, data: str, out: str) -> dict:
    import tunesmith

    res = tunesmith.train(
        {
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
    )
    return {
        "seconds": res.metrics["train_seconds"],
        "peak_mb": peak_mb(),
        "loss": res.metrics["train_loss"],
    }


def trl_run(checkpointing: bool):
    def run(model: str, data: str, out: str) -> dict:
        import torch
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            num_train_epochs=EPOCHS,
            max_length=MAX_LEN,
            beta=BETA,
            gradient_checkpointing=checkpointing,
            lr_scheduler_type="cosine",
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model),
            args=args,
            train_dataset=load_dataset("json", data_files=data, split="train"),
            processing_class=AutoTokenizer.from_pretrained(model),
            peft_config=LoraConfig(
                r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
        t0 = time.perf_counter()
        result = trainer.train()
        return {
            "seconds": time.perf_counter() - t0,
            "peak_mb": peak_mb(),
            "loss": result.training_loss,
        }

    return run


RUNS = {
    "tunesmith dpo lora": tunesmith_dpo,
    "trl+peft dpo lora (checkpointing on, default)": trl_run(True),
    "trl+peft dpo lora (checkpointing off)": trl_run(False),
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
