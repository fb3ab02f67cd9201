"""glibc's mmap threshold on CPU: training-loop speed against peak resident memory.

``train.cpu_memory: lean`` (``training/memory.py``) fixes ``M_MMAP_THRESHOLD`` at 64 KB, trading
a page fault per page of every large allocation for a resident size that follows live memory;
the default (``fast``) leaves glibc's dynamic threshold alone. This script runs the same short
tunesmith SFT (LoRA or full) once per malloc setting, each a process of its own started with
glibc's ``MALLOC_MMAP_THRESHOLD_`` (and, for ``+THP``, ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``:
transparent huge pages for malloc's mappings), alternating settings over ``--repeat`` rounds, and
prints the median loop tokens/s and peak RSS of each.

    OMP_NUM_THREADS=1 python bench/malloc_threshold.py --workload short --steps 6 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import WORKLOADS, make_model  # noqa: E402
from sft_vs_trl import make_data  # noqa: E402

SETTINGS = {
    "default": None,  # glibc's dynamic threshold
    "64K": 64 * 1024,
    "1M": 2**20,
    "4M": 4 * 2**20,
    "32M": 32 * 2**20,  # glibc's largest dynamic value, fixed from the start
    "64K+THP": 64 * 1024,  # and transparent huge pages for malloc's mappings (glibc >= 2.35)
    "default+THP": None,
}


def child(model: str, data: str, out: str, method: str, steps: int, batch: int, max_len: int):
    import tunesmith

    m = {"name": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}
    res = tunesmith.train(
        {
            "model": model,
            "method": m if method == "lora" else "full",
            "data": {"train": data, "eval": None, "max_length": max_len},
            "train": {"max_steps": steps, "batch_size": batch, "lr": 2e-4, "progress": False},
            "output_dir": out,
        }
    )
    print("RESULT " + json.dumps(res.metrics), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="short", choices=list(WORKLOADS))
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated settings")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    w = WORKLOADS[a.workload]
    if a.child:
        child(*a.child, a.method, a.steps, w.batch, w.max_length)
        return
    root = Path(tempfile.mkdtemp(prefix="tunesmith-malloc-"))
    model = make_model(Path(tempfile.gettempdir()) / "tunesmith-bench-models" / a.workload, w)
    data = make_data(root, a.steps * w.batch, w)
    names = a.only.split(",") if a.only else list(SETTINGS)
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rep in range(a.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            if SETTINGS[name] is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(SETTINGS[name])
            if name.endswith("+THP"):
                env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
            out = root / f"{name}-{rep}"
            cmd = [sys.executable, __file__, "--workload", a.workload, "--method", a.method]
            cmd += ["--steps", str(a.steps), "--child", str(model), str(data), str(out)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            text = proc.stdout.read().decode() if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
            line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{text[-2000:]}")
                continue
            m = json.loads(line[7:])
            got[name].append((m["tokens_per_s"], usage.ru_maxrss / 1024))
            print(
                f"  {name:<8} round {rep}: {m['tokens_per_s']:,.0f} tok/s, peak RSS "
                f"{usage.ru_maxrss / 1024:,.0f} MB",
                flush=True,
            )
    print(
        f"== {a.workload}, {a.method}, {a.steps} steps of batch {w.batch}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    for name, rs in got.items():
        if rs:
            tok = statistics.median(r[0] for r in rs)
            rss = statistics.median(r[1] for r in rs)
            print(f"  {name:<8} {tok:>8,.0f} tok/s  peak RSS {rss:>7,.0f} MB  ({len(rs)} runs)")


if __name__ == "__main__":
    main()
