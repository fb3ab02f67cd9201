"""One GPU: the same SFT config as one plain process and under ``torchrun`` with FSDP2 (bf16
mixed precision), and FSDP2 with CPU offload; each a whole ``tunesmith train`` process. Prints
tokens/s, peak GPU memory (max allocated) and the final loss of each, from its ``run.json``.

    python bench/fsdp_gpu.py                        # on a GPU: Qwen2.5-0.5B shape, ~2-3 minutes
    python bench/fsdp_gpu.py --workload gpu-tiny    # check the script on CPU (gloo, fp32)

FSDP2 on one process shards nothing: what it shows is that the path (``fully_shard`` per layer,
the mixed-precision policy, the gathered final save) runs on NCCL and what it costs next to the
plain loop. Offload moves parameters, gradients and optimiser state to CPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import WORKLOADS, make_model  # noqa: E402
from sft_vs_trl import make_data  # noqa: E402

RUNS = {
    "one process": ([], {"strategy": "none"}),
    "torchrun fsdp2": (["torchrun", "--nproc_per_node", "1"], {"strategy": "fsdp"}),
    "torchrun fsdp2 + cpu offload": (
        ["torchrun", "--nproc_per_node", "1"],
        {"strategy": "fsdp", "fsdp_cpu_offload": True},
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="gpu-0.5b", choices=list(WORKLOADS))
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--only", default=None, help="comma-separated run names")
    a = p.parse_args()
    w = WORKLOADS[a.workload]
    root = Path(tempfile.mkdtemp(prefix="tunesmith-fsdp-"))
    model = make_model(Path(tempfile.gettempdir()) / "tunesmith-bench-models" / a.workload, w)
    data = make_data(root, a.examples, w)
    bindir = Path(sys.executable).parent
    print(f"== {w.about}; {a.examples} examples, batch {w.batch}, max length {w.max_length}")
    for name, (launcher, train) in RUNS.items():
        if a.only and name not in a.only.split(","):
            continue
        out = root / name.replace(" ", "-").replace("+", "")
        cfg = {
            "model": str(model),
            "method": "full",
            "data": {"train": str(data), "eval": None, "max_length": w.max_length},
            "train": {"epochs": 1, "batch_size": w.batch, "lr": 2e-4, "progress": False, **train},
            "output_dir": str(out),
        }
        cfg_path = root / f"{out.name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        if launcher:
            cmd = [str(bindir / launcher[0]), *launcher[1:], "-m", "tunesmith", "train"]
            if not (bindir / launcher[0]).exists():
                cmd[0] = launcher[0]
        else:
            cmd = [sys.executable, "-m", "tunesmith", "train"]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, str(cfg_path)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (out / "run.json").exists():
            print(
                f"  {name}: failed (exit {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
            continue
        m = json.loads((out / "run.json").read_text())
        print(
            f"  {name:<30} {m['tokens_per_s']:>9,.0f} tok/s  peak {m['peak_memory_mb']:>8,.0f} MB"
            f"  loss {m['train_loss']:.4f}  {m['steps']} steps  train {m['train_seconds']:.1f} s"
            f"  whole process {wall:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
