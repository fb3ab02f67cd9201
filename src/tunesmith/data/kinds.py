"""Record kinds: what one training record is for a task, declared once and read by the data
pipeline, the batcher and the preview (shared code never tests a task's name).

A record renders into ``len(sides)`` tokenised rows that stay together: one for examples to
imitate, two (chosen, rejected) for preference pairs. A batch of B records has B x sides rows,
all first sides, then all second sides, so a pair goes through the model in one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecordKind:
    name: str
    formats: tuple[str, ...]
    """Data formats whose records are of this kind (``data.format``, or what ``auto`` detects)."""
    sides: tuple[str, ...] = ("",)
    """Names of the rows one record renders into, in order."""
    unit: str = "examples"
    """What a record is called in logs and reports."""
    describe: str = ""
    """What the task trains on, for error messages."""
    packable: bool = True
    """Whether several records may share a row (never for groups of rows compared together)."""
    encode: Callable[..., Any] | None = None
    """Tokenises records of this kind itself, ``(records, fmt, data_cfg, tokenizer, template,
    skip_bad) -> (examples, stats)``, instead of rendering segments with token targets (labelled
    text: the tokenizer's pair layout, a class id per record)."""
    token_targets: bool = True
    """Whether examples carry next-token targets (and the end-of-sequence pre-flight applies)."""
    tokenized: bool = True
    """Whether the pipeline tokenises records into training rows; False for kinds whose rows are
    produced while training (prompts: the responses are sampled by the policy)."""

    @property
    def group(self) -> int:
        return len(self.sides)


EXAMPLES = RecordKind(
    "examples",
    ("chat", "prompt_completion", "alpaca", "text"),
    describe="examples to imitate, not preference pairs",
)
PAIRS = RecordKind(
    "pairs",
    ("preference",),
    sides=("chosen", "rejected"),
    unit="pairs",
    describe="preference pairs (prompt, chosen, rejected)",
    packable=False,
)


def _encode_labeled(*args: Any, **kwargs: Any) -> Any:
    from tunesmith.data.labeled import encode_labeled

    return encode_labeled(*args, **kwargs)


LABELED = RecordKind(
    "labeled",
    ("labeled",),
    unit="labelled texts",
    describe="labelled text ('text', optional 'text_pair', 'label')",
    packable=False,
    encode=_encode_labeled,
    token_targets=False,
)
PROMPTS = RecordKind(
    "prompts",
    ("prompt", "chat", "prompt_completion", "alpaca", "preference"),
    unit="prompts",
    describe="prompts to answer (prompt-only, chat, prompt/completion, alpaca or preference rows)",
    packable=False,
    tokenized=False,
)
