"""Explicit preparation of a model source, so that loading it has no side effects.

Two kinds of ``model.name`` need work before they can be loaded: ``builtin:NAME`` (pretrained by
tunesmith on first use) and the run folder of a parameter-efficient method (merged into a plain
model, ``RUN/merged``, so DPO or RL can start from an SFT run). ``ensure_model`` does that work;
``tunesmith.models`` only resolves and loads. Entry points call it once, before anything loads
(under several processes, one process would do it and the others wait).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tunesmith.builtin.specs import SPECS, BuiltinSpec, builtin_path, is_built
from tunesmith.config import load_config
from tunesmith.console import say
from tunesmith.merge import merge_run
from tunesmith.models import is_run_dir, resolve_model_path
from tunesmith.pipeline import run_training


def ensure_model(name: str) -> str:
    """Build or merge what ``name`` needs, then return its loadable path (or hub id)."""
    if name.startswith("builtin:"):
        return str(ensure_builtin_model(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if is_run_dir(path) and json.loads((path / "run.json").read_text())["artifact"] == "adapter":
        merged = path / "merged"
        if not (merged / "config.json").exists():
            merge_run(path, merged)
    return resolve_model_path(name)


# ----------------------------------------------------------------------------------------------
# The built-in base model: a small Llama-layout causal LM that tunesmith pretrains itself.
#
# No pretrained causal LM can be downloaded offline, so ``builtin:tiny`` is made here: a
# character-level tokenizer, a randomly initialised Llama of a few million parameters, and full
# training from scratch with tunesmith's own SFT recipe (``method: full``, ``loss_on: all``) on
# the generated arithmetic corpus (``tunesmith.builtin.tasks.pretraining_corpus``). Seeds are
# fixed, so a build is reproducible. The result is a standard Hugging Face folder in the user's
# cache (``$TUNESMITH_CACHE``, else ``$XDG_CACHE_HOME/tunesmith``, else ``~/.cache/tunesmith``),
# so every command takes it like any other model.


def ensure_builtin_model(name: str = "tiny", rebuild: bool = False) -> Path:
    """The folder of built-in model ``name``, built first if missing (or if ``rebuild``)."""
    path = builtin_path(name)
    if rebuild or not is_built(name):
        build_model(SPECS[name], path)
    return path


def build_model(spec: BuiltinSpec, path: Path, progress: bool = True) -> Path:
    """Pretrain a model per ``spec`` and save it (with tokenizer) at ``path``, atomically."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.builtin.tasks import pretraining_corpus
    from tunesmith.builtin.tokenizer import build_tokenizer

    path = Path(path)
    work = path.with_name(path.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(f"building the built-in base model in {path} (once; later runs load it)")
    t0 = time.perf_counter()
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_length,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    LlamaForCausalLM(config).save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    with (work / "corpus.jsonl").open("w") as f:
        for doc in pretraining_corpus(spec.documents, spec.seed):
            f.write(json.dumps({"text": doc}) + "\n")

    result = run_training(
        load_config(
            {
                "model": str(work / "init"),
                "method": "full",
                "data": {
                    "train": str(work / "corpus.jsonl"),
                    "eval": 0.02,
                    "format": "text",
                    "loss_on": "all",
                    "max_length": spec.max_length,
                    "packing": True,
                },
                "train": {
                    "epochs": spec.epochs,
                    "batch_size": spec.batch_size,
                    "lr": spec.lr,
                    "warmup": 0.05,
                    "weight_decay": 0.01,
                    "seed": spec.seed,
                    "device": "cpu",
                    "progress": progress,
                },
                "output_dir": str(work / "pretrain"),
            }
        )
    )
    final = work / "pretrain"
    (final / "build.json").write_text(
        json.dumps(
            {"spec": asdict(spec), "seconds": time.perf_counter() - t0, **result.metrics}, indent=2
        )
    )
    # A model folder, not a run folder: the run's config points at the deleted work files.
    for name in ("config.yaml", "run.json"):
        (final / name).unlink()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(final, path)
    shutil.rmtree(work, ignore_errors=True)
    say(f"built-in model ready at {path} ({time.perf_counter() - t0:.0f}s)")
    return path
