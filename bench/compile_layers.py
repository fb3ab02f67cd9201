"""Step time of the short-workload model (bench/common.py, batch 8 x 430 tokens), eager or with
``torch.compile`` of each decoder layer: first step (compile included) and the median of six
more, for full fine-tuning or tunesmith's LoRA, in the precision ``auto`` picks here (or the one
given). Run it once per mode (the short model is built by
``python bench/sft_vs_trl.py --workload short``):

    OMP_NUM_THREADS=2 python bench/compile_layers.py eager --method lora
    OMP_NUM_THREADS=2 python bench/compile_layers.py compiled --method lora
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from tunesmith.methods import build_method, method_config
from tunesmith.training.memory import set_cpu_malloc
from tunesmith.training.precision import autocast, resolve_precision

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("mode", choices=["eager", "compiled"])
p.add_argument("--method", default="full", choices=["full", "lora"])
p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
a = p.parse_args()
cpu = torch.device("cpu")
set_cpu_malloc(cpu, "fast")  # as a tunesmith run does
torch.manual_seed(0)
path = "/tmp/tunesmith-bench-models/short/model"  # noqa: S108 (where the benches build it)
m = AutoModelForCausalLM.from_pretrained(path)
precision = resolve_precision(a.precision, cpu, m)
lora = a.method == "lora"
m = build_method(method_config("lora", rank=16, alpha=32) if lora else method_config("full")).apply(
    m
)
m.train()
if a.mode == "compiled":
    for layer in m.model.layers:
        layer.compile()
x = torch.randint(0, 390, (8, 430))
params = [q for q in m.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)


def step():
    with autocast(cpu, precision):
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
print(
    f"{a.mode}, {a.method}, {precision}: first step {first:.1f} s, then median {med:.2f} s/step "
    f"(min {min(times):.2f})"
)
