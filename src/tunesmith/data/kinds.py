"""Record kinds: what one training record is for a task, declared once and read by the data
pipeline, the batcher and the preview (shared code never tests a task's name).

A record renders into ``len(sides)`` tokenised rows that stay together: one for examples to
imitate, two (chosen, rejected) for preference pairs. A batch of B records has B x sides rows,
all first sides, then all second sides, so a pair goes through the model in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass


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
PROMPTS = RecordKind(
    "prompts",
    ("prompt", "chat", "prompt_completion", "alpaca", "preference"),
    unit="prompts",
    describe="prompts to answer (prompt-only, chat, prompt/completion, alpaca or preference rows)",
    packable=False,
    tokenized=False,
)
