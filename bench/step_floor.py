"""How close a training step is to the time its matrix products and attention need on this
machine: the floor below which no tool doing the same arithmetic can go.

For one micro-batch of the workload's shape (``--batch`` rows of ``--length`` tokens; by default
the workload's batch and the mean length of its grouped batches), this times, each alone and at
the step's exact shapes in the precision ``train.precision: auto`` picks here:

- every linear layer's forward product, its input-gradient product, and (for ``full``) its
  weight-gradient product; LoRA adds its rank-r products;
- attention forward and backward, per layer: the faster of PyTorch's causal
  ``scaled_dot_product_attention`` (the CPU flash kernel) and tunesmith's block-causal node
  (``methods/fused_attention.py``), both with the model's grouped key/value heads;
- the LM head's products over the whole vocabulary at every position (tunesmith computes
  only supervised positions, so its step can undercut this term);

and then a whole tunesmith SFT step (objective, backward, optimiser; the fused nodes a run
installs) on the same batch. A tool whose step is the same arithmetic with the same kernels
cannot beat the floor, so ``step / floor`` bounds the speed-up left to win by kernels.

    OMP_NUM_THREADS=2 python bench/step_floor.py --workload short --method lora
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import WORKLOADS, make_model  # noqa: E402


def best(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="short", choices=list(WORKLOADS))
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--batch", type=int, default=None, help="rows (default: the workload's batch)")
    p.add_argument("--length", type=int, default=430, help="tokens per row (short: ~430)")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.data.batching import Batch
    from tunesmith.methods import build_method, method_config
    from tunesmith.methods.fused_attention import KEEP_TOKENS, BlockCausalAttention, fuse_attention
    from tunesmith.methods.fused_lora import fuse_linear
    from tunesmith.methods.fused_mlp import fuse_swiglu
    from tunesmith.methods.fused_norm import fuse_rmsnorm
    from tunesmith.objectives.sft import SFTObjective
    from tunesmith.training.memory import set_cpu_malloc
    from tunesmith.training.precision import autocast, resolve_precision

    set_cpu_malloc(torch.device("cpu"), "fast")  # as a tunesmith run does (training/memory.py)

    w = WORKLOADS[a.workload]
    rows, length = a.batch or w.batch, a.length
    n = rows * length
    path = make_model(Path(tempfile.gettempdir()) / "tunesmith-bench-models" / a.workload, w)
    model = AutoModelForCausalLM.from_pretrained(path)
    precision = resolve_precision("auto", torch.device("cpu"), model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    lora = a.method == "lora"

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype)

    layer0 = model.model.layers[0]
    shapes = [
        (m.in_features, m.out_features) for m in layer0.modules() if isinstance(m, torch.nn.Linear)
    ]

    def products(d_in: int, d_out: int) -> float:
        """Seconds of one linear layer's products in a step: forward, input gradient, and the
        weight gradient (full) or LoRA's rank-16 products."""
        x, wt, g = rand(n, d_in), rand(d_out, d_in), rand(n, d_out)
        t = best(lambda: x @ wt.t()) + best(lambda: g @ wt)
        if not lora:
            return t + best(lambda: g.t() @ x)
        a_, b_ = rand(16, d_in), rand(d_out, 16)
        h = x @ a_.t()
        t += best(lambda: torch.addmm(g, h, b_.t())) + best(lambda: x @ a_.t())
        return t + best(lambda: (g @ b_) @ a_) + best(lambda: g.t() @ h)

    linear = sum(products(d_in, d_out) for d_in, d_out in shapes)
    linear *= cfg.num_hidden_layers
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    q = rand(rows, cfg.num_attention_heads, length, head_dim).requires_grad_()
    k = rand(rows, kv_heads, length, head_dim).requires_grad_()
    v = rand(rows, kv_heads, length, head_dim).requires_grad_()
    kernels = {
        "flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "block-causal node": lambda: BlockCausalAttention.apply(
            q,
            k,
            v,
            None,
            None,
            head_dim**-0.5,
            length <= KEEP_TOKENS.get(dtype, 0),  # as a training call
        ),
    }
    per_kernel = {
        name: cfg.num_hidden_layers * best(lambda f=f: f().sum().backward())
        for name, f in kernels.items()
    }
    fastest = min(per_kernel, key=per_kernel.get)
    attention = per_kernel[fastest]
    hidden, emb, gl = rand(n, cfg.hidden_size), rand(cfg.vocab_size, cfg.hidden_size), None
    gl = rand(n, cfg.vocab_size)
    head = best(lambda: hidden @ emb.t()) + best(lambda: gl @ emb)

    method = build_method(
        method_config("lora", rank=16, alpha=32) if lora else method_config("full")
    )
    model = method.apply(model)
    for fuse in (fuse_swiglu, fuse_rmsnorm, fuse_linear, fuse_attention):  # as a run does
        fuse(model)
    model.train()
    params = [p for _, p in method.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, min(cfg.vocab_size, 400), (rows, length))
    labels = ids.clone()
    labels[:, : length // 3] = -100  # the prompt third is not scored
    batch = Batch(
        ids,
        torch.ones_like(ids),
        torch.arange(length).expand(rows, length).contiguous(),
        torch.roll(labels, -1, 1),
        n,
    )
    objective = SFTObjective()

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            loss, _ = objective(model, batch)
        (loss / objective.count(batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = best(step, repeat=6)
    floor = linear + attention + head
    print(
        f"== {a.workload}, {a.method}, {rows} rows x {length} tokens, precision {precision}\n"
        f"  attention per step: "
        + ", ".join(f"{name} {t:.3f} s" for name, t in per_kernel.items())
        + f"; the floor takes {fastest}\n"
        f"  linear layers {linear:.3f} s + attention {attention:.3f} s + LM head {head:.3f} s"
        f" = floor {floor:.3f} s per step\n"
        f"  tunesmith step {seconds:.3f} s = {seconds / floor:.2f}x the floor "
        f"({n / seconds:,.0f} tokens/s; the floor allows {n / floor:,.0f})"
    )


if __name__ == "__main__":
    main()
