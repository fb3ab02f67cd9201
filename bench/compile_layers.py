"""Step time of the short-workload model (bench/common.py, full fine-tuning, batch 8 x 430
tokens), eager or with ``torch.compile`` of each decoder layer: first step (compile included)
and the median of six more. Run it once per mode (the short model is built by
``python bench/sft_vs_trl.py --workload short``):

    OMP_NUM_THREADS=2 python bench/compile_layers.py eager
    OMP_NUM_THREADS=2 python bench/compile_layers.py compiled
"""

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
path = "/tmp/tunesmith-bench-models/short/model"  # noqa: S108 (where the benches build it)
mode = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(path)
m.train()
if mode == "compiled":
    for layer in m.model.layers:
        layer.compile()
x = torch.randint(0, 390, (8, 430))
opt = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)


def step():
    out = m(input_ids=x, labels=x, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


t0 = time.perf_counter()
step()
first = time.perf_counter() - t0
times = []
for _ in range(6):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"{mode}: first step {first:.1f} s, then median {med:.2f} s/step (min {min(times):.2f})")
