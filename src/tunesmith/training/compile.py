"""``train.compile``: each repeated block of the model (a decoder layer) through ``torch.compile``.

Compiling the blocks rather than the whole model keeps one compiled graph for all of them (they
share code), leaves the model's own Python (masks, caches, heads) eager, and works under DDP and
after FSDP2 has sharded each block. The first steps pay the compile (tens of seconds on a CPU;
a second compile when the sequence length first changes, after which shapes are dynamic), so it
pays back only in long runs: on the short bench workload (2-core AVX512_BF16 CPU, LoRA, bf16)
a step went from 1.40 to 1.26 s after a 30 s first step, even after ~210 steps
(``bench/compile_layers.py``, ``bench/IDEAS.md``). Off by default.
"""

from __future__ import annotations

from torch import nn

from tunesmith.training.distributed import layer_classes


def compile_layers(model: nn.Module) -> int:
    """Compile, in place, every module whose class the model declares as a repeated block
    (``_no_split_modules``), or the whole model when it declares none; return how many modules
    were compiled."""
    names = layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks or [model]:
        block.compile()
    return len(blocks) or 1
