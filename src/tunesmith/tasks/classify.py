"""``task: classify``: a sequence classifier from any encoder (BERT-like) or decoder.

Records are labelled text (``text``, optional ``text_pair``, ``label``: a name or an integer id;
``data/labeled.py``). The class list is fixed from the data before the model is built and saved
as ``id2label`` / ``label2id`` in the model config. The model is the backbone with a fresh
classification head (``models.HEADS["classifier"]``), trained whole whatever the method; the run
folder is a whole ``*ForSequenceClassification`` model where the method merges (full, LoRA), so
``AutoModelForSequenceClassification`` and a ``transformers`` pipeline load it, and PEFT-layout
artifacts (task type ``SEQ_CLS``, the head in ``modules_to_save``) otherwise. Held out: loss,
accuracy, macro-F1 and the confusion matrix (in ``report.md``). ``tunesmith predict RUN`` prints
labels and probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.config import Config
from tunesmith.data.io import read_records
from tunesmith.data.kinds import LABELED
from tunesmith.data.labeled import labels_of
from tunesmith.errors import ConfigError
from tunesmith.objectives.classify import (
    ClassifyObjective,
    confusion_matrix,
    macro_f1,
    predictions,
)
from tunesmith.tasks.base import Context, Task, held_out, register


@dataclass
class ClassifyConfig:
    label_smoothing: float = 0.0
    """Label smoothing eps of the cross-entropy (0 = plain cross-entropy)."""

    def check(self, prefix: str) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"{prefix}.label_smoothing: got {self.label_smoothing}; must be in [0, 1)."
            )


def resolve_labels(cfg: Config) -> None:
    """Fix ``data.labels`` from the training records when the config does not list them."""
    if cfg.data.labels is None:
        records, _ = read_records(cfg.data.train, cfg.data.split, cfg.data.skip_bad_rows)
        cfg.data.labels = labels_of(records)
    if len(cfg.data.labels) < 2:
        raise ConfigError(
            f"data.labels: a classifier needs at least 2 classes, got {cfg.data.labels}."
        )


def classification_report(ctx: Context) -> tuple[dict[str, Any], str]:
    """Accuracy, macro-F1 and the confusion matrix over the whole held-out split."""
    labels = list(ctx.cfg.data.labels)
    pred, gold = predictions(ctx.model, held_out(ctx).one_pass(), ctx.device)
    m = confusion_matrix(pred, gold, len(labels))
    metrics = {
        "eval_accuracy": float((pred == gold).float().mean()),
        "eval_macro_f1": macro_f1(m),
    }
    head = "| true \\ predicted | " + " | ".join(labels) + " |"
    rule = "| --- |" + " --- |" * len(labels)
    rows = [
        f"| **{name}** | " + " | ".join(str(int(v)) for v in m[i]) + " |"
        for i, name in enumerate(labels)
    ]
    text = (
        f"## Held-out classification ({len(gold)} examples)\n\n"
        f"Accuracy {metrics['eval_accuracy']:.4f}, macro-F1 {metrics['eval_macro_f1']:.4f}.\n\n"
        + "\n".join([head, rule, *rows])
        + "\n\n"
    )
    return metrics, text


CLASSIFY = register(
    Task(
        name="classify",
        about="sequence classification (text or text pairs -> labels), scored by accuracy and macro-F1",
        records=LABELED,
        head="classifier",
        objective=lambda ctx: ClassifyObjective(ctx.cfg.classify.label_smoothing),
        section=ClassifyConfig,
        extra_eval=lambda ctx, samples: classification_report(ctx)[0],
        compare_metrics=("eval_loss", "eval_accuracy", "eval_macro_f1"),
        rising=("eval_accuracy",),
        prepare=resolve_labels,
        report=classification_report,
    )
)
