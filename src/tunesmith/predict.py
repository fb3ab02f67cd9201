"""``tunesmith predict``: class labels and probabilities from a classifier run (or model folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import DataError, TunesmithError
from tunesmith.models import load_for_inference


@dataclass
class Prediction:
    text: str
    text_pair: str | None
    label: str
    probabilities: dict[str, float]


def read_inputs(path: str) -> list[tuple[str, str | None]]:
    """(text, text_pair) pairs from a JSONL file with ``text`` (and ``text_pair``) or a text
    file with one input per line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--file: {p} does not exist.")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg}).") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{p}:{lineno}: expected an object with a 'text' string.")
            out.append((obj["text"], obj.get("text_pair")))
        else:
            out.append((line, None))
    return out


@torch.no_grad()
def predict(
    model_path: str, inputs: list[tuple[str, str | None]], batch_size: int = 32
) -> list[Prediction]:
    """Predictions of the classifier at ``model_path`` for each (text, text_pair)."""
    model, tok, _ = load_for_inference(model_path)
    id2label = getattr(model.config, "id2label", None) or {}
    if (
        getattr(model.config, "num_labels", 0) < 2
        or not hasattr(model, "classifier")
        and not hasattr(model, "score")
    ):
        raise TunesmithError(
            f"{model_path}: not a sequence classifier (train one with task: classify)."
        )
    device = next(model.parameters()).device
    out = []
    for k in range(0, len(inputs), batch_size):
        chunk = inputs[k : k + batch_size]
        texts = [t for t, _ in chunk]
        pairs = [p for _, p in chunk]
        enc = tok(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        probs = torch.softmax(model(**enc).logits.float(), dim=-1).cpu()  # (B, K)
        for (text, pair), row in zip(chunk, probs):
            names = [str(id2label.get(i, i)) for i in range(len(row))]
            out.append(
                Prediction(text, pair, names[int(row.argmax())], dict(zip(names, row.tolist())))
            )
    return out
