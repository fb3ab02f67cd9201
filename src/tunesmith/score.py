"""``tunesmith score``: rewards of responses under a trained reward model."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.data.batching import collate
from tunesmith.data.formats import render_response
from tunesmith.data.tokenize import tokenize_segments
from tunesmith.errors import TunesmithError
from tunesmith.models import is_run_dir, load_for_inference
from tunesmith.objectives.reward import rewards


@torch.no_grad()
def score(model_dir: str, prompt: str, responses: list[str], raw: bool = False) -> list[float]:
    """Reward of each response to ``prompt``, rendered exactly as in reward training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if is_run_dir(model_dir):  # a whole model, or a base + method that could not be merged
        model, tok, _ = load_for_inference(model_dir, torch.device("cpu"))
    elif (Path(model_dir) / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    else:
        raise TunesmithError(f"{model_dir}: neither a reward run folder nor a model folder.")
    if not hasattr(model, "score"):
        raise TunesmithError(f"{model_dir}: not a reward model (no scalar head).")
    if model.config.num_labels != 1:
        raise TunesmithError(
            f"{model_dir}: a reward model has one output, this one has {model.config.num_labels}."
        )
    template = None if raw else tok.chat_template
    chat = template is not None
    examples = []
    for r in responses:
        segs = render_response(
            [{"role": "user", "content": prompt}] if chat else prompt, r, tok, template
        )
        ex, _ = tokenize_segments(segs, tok, "input", 1 << 30, "truncate", False)
        examples.append(ex)
    batch = collate(examples, [[i] for i in range(len(examples))], tok.pad_token_id)
    return rewards(model, batch).tolist()
