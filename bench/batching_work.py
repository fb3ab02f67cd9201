"""Work per epoch of each way of batching, computed (no timing) on the bench workloads' data:
micro-batches, examples per micro-batch, real share of token slots (1 - padding), and
attention-score entries (a packed row attends over its whole width under its block mask, an
unpacked row over its padded width). Needs the workload models the SFT bench built (their
tokenizers); the 150k-vocabulary workload shares the long workload's tokenizer.

    python bench/sft_vs_trl.py --workload all --examples 8 --only lora   # builds the models once
    python bench/batching_work.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CPU_WORKLOADS, WORKLOADS  # noqa: E402
from sft_vs_trl import make_data  # noqa: E402

from tunesmith.config import DataConfig, ModelConfig  # noqa: E402
from tunesmith.data.batching import Batches  # noqa: E402
from tunesmith.data.dataset import prepare_data  # noqa: E402
from tunesmith.models import load_tokenizer  # noqa: E402

WAYS = {
    "random padded": {"packing": False},
    "length-grouped": {"packing": False, "group_by_length": True},
    "packed rows": {"packing": True},
}

if __name__ == "__main__":
    models = Path(tempfile.gettempdir()) / "tunesmith-bench-models"
    for name in CPU_WORKLOADS:
        w = WORKLOADS[name]
        model = models / ("long" if name == "vocab150k" else name) / "model"
        tok = load_tokenizer(ModelConfig(name=str(model)), str(model))
        data = make_data(Path(tempfile.mkdtemp()), 256, w)
        ex = prepare_data(DataConfig(train=str(data), eval=None, max_length=w.max_length), tok, 0)
        ex = ex.train
        real = sum(len(e) for e in ex)
        print(f"{name}: {len(ex)} examples, mean length {real / len(ex):.0f} tokens")
        for way, kw in WAYS.items():
            plan = Batches(ex, w.batch, w.max_length, tok.pad_token_id, seed=0, **kw).plan(0)
            slots = attention = n = 0
            for rows in plan:
                width = max(sum(len(ex[i]) for i in r) for r in rows)
                slots += width * len(rows)
                attention += len(rows) * width**2
                n += sum(len(r) for r in rows)
            print(
                f"  {way:<15} {len(plan):>3} micro-batches, {n / len(plan):5.1f} examples each,"
                f" real/padded tokens {real / slots:5.1%}, attention entries {attention / 1e6:6.1f} M"
            )
