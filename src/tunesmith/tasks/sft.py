"""``task: sft``: supervised fine-tuning on examples to imitate, any method, any record format.

The objective is next-token cross-entropy on the supervised tokens (``objectives/sft.py``);
held out, it reports loss and perplexity, and exact match of greedy generations when the records
have a reference answer.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.kinds import EXAMPLES
from tunesmith.generate import exact_match
from tunesmith.objectives.sft import SFTObjective
from tunesmith.tasks.base import Context, Task, register


def generation_metrics(ctx: Context, samples: int) -> dict[str, Any]:
    """Exact match of the greedy answer on up to ``samples`` held-out records."""
    if not samples or ctx.data.format == "text" or not ctx.data.eval_records:
        return {}
    em = exact_match(
        ctx.model,
        ctx.tokenizer,
        ctx.data.eval_records,
        ctx.data.format,
        ctx.data.template,
        samples,
    )
    return {"exact_match": em.score, "exact_match_n": em.n}


SFT = register(
    Task(
        name="sft",
        about="supervised fine-tuning: imitate examples (chat, prompt/completion, alpaca, text)",
        records=EXAMPLES,
        head="lm",
        objective=lambda ctx: SFTObjective(),
        extra_eval=generation_metrics,
        compare_metrics=("eval_loss", "exact_match"),
        base_comparable=True,
    )
)
