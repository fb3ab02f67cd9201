"""GRPO throughput and peak memory: tunesmith ``task: grpo`` + LoRA against TRL's GRPOTrainer +
PEFT LoRA.

Same random-initialised Qwen2-layout model (~25 M parameters, bench/common.py), same prompts
(random words), same group size, completion length, sampling temperature, learning rate, steps
and reward (the share of letters 'e' in the completion: any cheap function does); no KL term (so
neither needs a reference pass), no vLLM, one run each in its own subprocess. TRL runs with its
default activation checkpointing and without.

    python bench/grpo_vs_trl.py                 # defaults below; a few minutes on 2 CPU cores
    python bench/grpo_vs_trl.py --steps 4       # a quick look

Tokens/s counts, over the training loop's time, every token generated plus every token trained
on: for each response, its prompt and completion tokens (each response is one sequence of the
update), measured from what each run actually produced.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    child_env,
    child_result,
    make_model,
    parse_args,
    peak_mb,
    print_profile,
    sentence,
    tagged,
    words,
)

PROMPTS, GROUP, COMPLETION, LR, RANK, ALPHA = 4, 8, 32, 1e-5, 16, 32


def reward(completions: list[str]) -> list[float]:
    return [t.count("e") / max(len(t), 1) for t in completions]


def make_prompts(root: Path, n: int) -> Path:
    pool, rng = words(), random.Random(0)
    path = root / "prompts.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": sentence(rng, pool, 8, 24)}) + "\n")
    return path


def run_tunesmith(model: str, data: str, out: str, steps: int) -> dict:
    import tunesmith

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench_reward.py").write_text(
        "def score(prompts, completions):\n"
        "    return [t.count('e') / max(len(t), 1) for t in completions]\n"
    )
    sys.path.insert(0, str(root))
    res = tunesmith.train(
        {
            "model": model,
            "task": "grpo",
            "method": {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"},
            "grpo": {
                "reward": "bench_reward:score",
                "group_size": GROUP,
                "max_new_tokens": COMPLETION,
                "temperature": 1.0,
                "kl_coef": 0.0,
                "samples_every": 0,
            },
            "data": {"train": data, "eval": None, "max_length": 512},
            "train": {
                "max_steps": steps,
                "batch_size": PROMPTS,
                "lr": LR,
                "warmup": 0.0,
                "progress": False,
            },
            "output_dir": str(root / "run"),
        }
    )
    from tunesmith.training.logging import read_metrics

    rows = read_metrics(root / "run" / "metrics.jsonl")
    tokens = rows[-1]["tokens"]  # real prompt + response tokens of every response trained on
    return {
        "seconds": res.metrics["train_seconds"],
        "tokens": tokens,
        "peak_mb": peak_mb(),
        "reward": sum(r["reward_mean"] for r in rows if "reward_mean" in r) / steps,
    }


def run_trl(model: str, data: str, out: str, steps: int, checkpointing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model)
    counted = {"tokens": 0, "rewards": []}

    def score(prompts, completions, **kwargs):
        # Tokens of each response: its prompt and its completion (as tokenised for training).
        for p, c in zip(prompts, completions):
            counted["tokens"] += len(tok(p)["input_ids"]) + len(tok(c)["input_ids"])
        r = reward(completions)
        counted["rewards"].extend(r)
        return r

    config = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP,
        max_completion_length=COMPLETION,
        temperature=1.0,
        beta=0.0,
        learning_rate=LR,
        max_steps=steps,
        lr_scheduler_type="cosine",
        gradient_checkpointing=checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        reward_funcs=[score],
        args=config,
        train_dataset=load_dataset("json", data_files=data, split="train"),
        processing_class=tok,
        peft_config=LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    t0 = time.perf_counter()
    trainer.train()
    return {
        "seconds": time.perf_counter() - t0,
        "tokens": counted["tokens"],
        "peak_mb": peak_mb(),
        "reward": sum(counted["rewards"]) / max(len(counted["rewards"]), 1),
    }


RUNS = {
    "tunesmith grpo lora": lambda m, d, o, s: run_tunesmith(m, d, o, s),
    "trl+peft grpo lora (checkpointing on, default)": lambda m, d, o, s: run_trl(m, d, o, s, True),
    "trl+peft grpo lora (checkpointing off)": lambda m, d, o, s: run_trl(m, d, o, s, False),
}


def main() -> None:
    a = parse_args(__doc__, "--steps", 10, "optimiser steps = rollout batches (default 10)")
    if a.child:
        child_result(lambda: RUNS[a.child](a.model, a.data, a.out, a.steps), a.profile)
        return
    root = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    model, data = make_model(root), make_prompts(root, 64)
    print(
        f"{PROMPTS} prompts x {GROUP} responses per step, completions up to {COMPLETION} tokens, "
        f"{a.steps} steps, LoRA rank {RANK}, no KL; {os.cpu_count()} cores visible",
        flush=True,
    )
    results = {}
    for k, name in enumerate(RUNS):
        cmd = [sys.executable, sys.argv[0], "--child", name, "--steps", str(a.steps)]
        cmd += ["--model", str(model), "--data", str(data), "--out", str(root / f"run{k}")]
        cmd += ["--profile", str(a.profile)] if a.profile else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(name))
        r = tagged(proc.stdout, "RESULT")
        if r is None:
            print(f"  {name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        r["tok_s"] = r["tokens"] / r["seconds"]
        results[name] = r
        print(
            f"  {name:<48} {r['tok_s']:>8,.0f} tokens/s ({r['tokens']:,} in {r['seconds']:.0f} s)  "
            f"peak {r['peak_mb']:>6,.0f} MB  mean reward {r['reward']:.3f}",
            flush=True,
        )
        if found := tagged(proc.stdout, "PROFILE"):
            print_profile(found)
    peers = [v for k, v in results.items() if not k.startswith("tunesmith")]
    ours = results.get("tunesmith grpo lora")
    if peers and ours:
        best = max(peers, key=lambda r: r["tok_s"])
        print(
            f"\ntunesmith against TRL's faster setting: speed x{ours['tok_s'] / best['tok_s']:.2f}, "
            f"peak memory x{ours['peak_mb'] / best['peak_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
