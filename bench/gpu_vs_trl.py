"""GPU bench, one call of under 10 minutes: tunesmith against TRL (+ PEFT) for SFT, full and
LoRA, on Qwen2.5-0.5B's shape with random weights (hidden 896 x 24 layers, a 151,936-row
vocabulary), sequences of 2048 tokens, bf16 autocast (both tools). Prints loop tokens/s,
whole-process time, peak GPU memory (max allocated) and MFU = 6 x parameters x tokens/s / the
GPU's dense bf16 peak (989 TFLOP/s on an H100 or H200; 6N counts a full training step's FLOPs,
so for LoRA it overstates the work done: read it as throughput in the same unit).

    python bench/gpu_vs_trl.py                       # on the GPU: 4 runs, ~5-8 minutes
    python bench/gpu_vs_trl.py --workload gpu-tiny   # check the script on CPU in a few minutes

The runs and their config are bench/sft_vs_trl.py's; this file picks the GPU workload, sizes
and comparisons (TRL with random batches by default; `--only lora-grouped,full-grouped` adds its
length-grouped sampler: three processes per comparison). Each run is its own process, tunesmith
and TRL alternate.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import main  # noqa: E402
from sft_vs_trl import COMPARISONS, LR, RUNS, make_data  # noqa: E402

# TRL with random batches only: the GPU rows are 1,700-2,000 tokens of 2,048, so its
# length-grouped sampler has little padding to save, and a third run per comparison would not fit
# one 10-minute call (`--only lora-grouped,full-grouped` measures it when time allows)
GPU_COMPARISONS = {
    "lora": ("tunesmith lora", "trl+peft lora"),
    "full": ("tunesmith full", "trl full"),
    "lora-grouped": COMPARISONS["lora"],
    "full-grouped": COMPARISONS["full"],
}

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--child" not in args:  # the parent: GPU defaults unless given
        defaults = {"--workload": "gpu-0.5b", "--examples": "128", "--repeat": "1"}
        for flag, value in defaults.items():
            if flag not in args:
                sys.argv += [flag, value]
    main(
        __doc__,
        GPU_COMPARISONS,
        RUNS,
        make_data,
        lambda w: f"prompt/completion pairs; batch {w.batch}, lr {LR}, max length {w.max_length}",
        default=("lora", "full"),
    )
