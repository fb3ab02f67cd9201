"""Shared fixtures: tiny random models built from config objects (no network), and data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tunesmith.builtin.tokenizer import build_tokenizer


def qwen2_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, no merges: one token per character) with the chat
    template of the built-in tokenizer. transformers loads Qwen2-layout folders with
    Qwen2Tokenizer whatever tokenizer_config.json says, so Qwen2 fixtures need a real one."""
    from transformers import Qwen2Tokenizer

    # Byte-level BPE shows printable ASCII bytes as themselves, space as 'Ġ' and newline as 'Ċ'.
    chars = sorted({chr(b) for b in range(33, 127)} | {"Ġ", "Ċ"})
    specials = ["<pad>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="</s>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = build_tokenizer().chat_template
    return tok


def small_decoder(cls, seed: int = 0, **overrides):
    """A random two-layer decoder of ``cls`` (Llama, Qwen2, ...): vocabulary 64, hidden 32, four
    query heads over two key/value heads (grouped-query attention)."""
    config_class = cls.config_class
    torch.manual_seed(seed)
    cfg = config_class(
        **{
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **overrides,
        }
    )
    return cls(cfg)


def _save_tiny(kind: str, path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer() if kind == "llama" else qwen2_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: _save_tiny(k, root / k) for k in ("llama", "qwen2")}


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_models) -> Path:
    """Each test using this runs once per model layout."""
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pc_data(tmp_path) -> Path:
    """Prompt/completion pairs of varied length."""
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pad = " " * rng.randint(0, 12)
        rows.append({"prompt": f"Add{pad} {a} and {b}:", "completion": f" {a + b}"})
    return write_jsonl(tmp_path / "pc.jsonl", rows)


@pytest.fixture
def chat_data(tmp_path) -> Path:
    rng = random.Random(1)
    rows = []
    for _ in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"{a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                    {"role": "user", "content": "double it"},
                    {"role": "assistant", "content": str(2 * (a + b))},
                ]
            }
        )
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def base_config(model: Path, data: Path, out: Path, **train) -> dict:
    """A small, fast config dict for recipe tests."""
    return {
        "model": str(model),
        "method": {"name": "lora", "rank": 4, "alpha": 8},
        "data": {"train": str(data), "eval": 0.25, "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "progress": False, **train},
        "output_dir": str(out),
    }


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> str:
    """builtin:micro, built once per test session into a private cache (a few seconds)."""
    import os

    from tunesmith.prepare import ensure_builtin_model

    os.environ["TUNESMITH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return str(ensure_builtin_model("micro"))


BERT_WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "acting",
    "was",
    "is",
    "very",
    "quite",
    "not",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "dull",
    "and",
    "but",
    "story",
]


def bert_tokenizer():
    """A WordPiece tokenizer over a small word list ([CLS] a [SEP] b [SEP] pair layout)."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + BERT_WORDS)})


def save_tiny_bert(path: Path, layers: int = 2, head: str = "mlm") -> Path:
    """A random BERT (hidden 32) saved as a masked LM (no pooler: like many checkpoints) or as
    a bare encoder. initializer_range 0.2 so a frozen random encoder still tells words apart."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config) if head == "mlm" else BertModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


def sentiment_rows(n: int = 160, seed: int = 0) -> list[dict]:
    """Labelled sentences whose class is carried by one word (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        word = rng.choice(["good", "great", "fine"] if pos else ["bad", "awful", "dull"])
        thing = rng.choice(["film", "movie", "plot", "story"])
        rows.append({"text": f"the {thing} was very {word}", "label": "pos" if pos else "neg"})
    return rows
