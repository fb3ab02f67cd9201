"""The CPU allocator (``train.cpu_memory``): training-loop speed against peak resident memory.

``train.cpu_memory`` (``training/memory.py``) is ``fast`` (default: where the system has
tcmalloc, the CLI restarts itself with it preloaded; else glibc with mmap threshold 1 GiB and trim
threshold 2 GiB - 1, so freed activation memory is reused from the heap), ``lean`` (mmap
threshold 64 KB: memory goes back to the system on ``free``, a page fault per page of every
large tensor) or ``system`` (glibc's dynamic defaults). This script runs the same short tunesmith
SFT (LoRA or full) once per setting, each a process of its own, alternating settings over
``--repeat`` rounds, and prints the median loop tokens/s, peak RSS and minor page faults of
each. ``fast`` starts its process as the CLI does (with tcmalloc where there is one);
``fast-glibc`` is ``fast`` without it (what the Python API or a system without tcmalloc gets);
``jemalloc`` preloads jemalloc with its page return turned off, for comparison.
``system+THP`` adds transparent huge pages for malloc's mappings
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35).

    OMP_NUM_THREADS=2 python bench/malloc_threshold.py --workload short --steps 6 --repeat 2
"""

from __future__ import annotations

import argparse
import ctypes.util
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

from tunesmith.training.memory import PRELOADED, allocator_env, caching_allocator  # noqa: E402

JEMALLOC = ctypes.util.find_library("jemalloc")
SETTINGS = {  # name: (train.cpu_memory, extra environment)
    "fast": ("fast", {}),  # + the CLI's restart environment, below
    "fast-glibc": ("fast", {}),
    "jemalloc": (
        "system",
        {"LD_PRELOAD": JEMALLOC or "", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    ),
    "lean": ("lean", {}),
    "system": ("system", {}),
    "system+THP": ("system", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    # variants of fast, set with glibc's own environment knobs (tunesmith then sets nothing)
    "mmap1G": ("fast", {"MALLOC_MMAP_THRESHOLD_": str(2**30)}),
    "mmap64M+trim": (
        "fast",
        {"MALLOC_MMAP_THRESHOLD_": str(2**26), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
    ),
    "mmap128M+trim": (
        "fast",
        {"MALLOC_MMAP_THRESHOLD_": str(2**27), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
    ),
}


def child(
    model: str, data: str, out: str, memory: str, method: str, steps: int, batch: int, max_len: int
):
    import tunesmith

    m = {"name": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}
    res = tunesmith.train(
        {
            "model": model,
            "method": m if method == "lora" else "full",
            "data": {"train": data, "eval": None, "max_length": max_len},
            "train": {
                "max_steps": steps,
                "batch_size": batch,
                "lr": 2e-4,
                "progress": False,
                "cpu_memory": memory,
            },
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
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    w = WORKLOADS[a.workload]
    if a.child:
        child(*a.child, a.method, a.steps, w.batch, w.max_length)
        return
    root = Path(tempfile.mkdtemp(prefix="tunesmith-malloc-"))
    model = make_model(Path(tempfile.gettempdir()) / "tunesmith-bench-models" / a.workload, w)
    data = make_data(root, a.steps * w.batch, w)
    names = a.only.split(",") if a.only else [n for n in SETTINGS if n != "jemalloc" or JEMALLOC]
    print(f"fast preloads: {caching_allocator() or 'nothing (no tcmalloc here)'}", flush=True)
    got: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
    for rep in range(a.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            memory, extra = SETTINGS[name]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            for knob in ("GLIBC_TUNABLES", "LD_PRELOAD", PRELOADED):
                env.pop(knob, None)
            env.update(extra)
            if name == "fast":  # as the CLI starts it
                env = allocator_env(env, memory, caching_allocator()) or env
            out = root / f"{name}-{rep}"
            cmd = [sys.executable, __file__, "--workload", a.workload, "--method", a.method]
            cmd += ["--steps", str(a.steps), "--child", str(model), str(data), str(out), memory]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            text = proc.stdout.read().decode() if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
            line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{text[-2000:]}")
                continue
            m = json.loads(line[7:])
            got[name].append((m["tokens_per_s"], usage.ru_maxrss / 1024, usage.ru_minflt))
            print(
                f"  {name:<10} round {rep}: {m['tokens_per_s']:,.0f} tok/s, peak RSS "
                f"{usage.ru_maxrss / 1024:,.0f} MB, {usage.ru_minflt:,} page faults",
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
            faults = statistics.median(r[2] for r in rs)
            print(
                f"  {name:<10} {tok:>8,.0f} tok/s  peak RSS {rss:>7,.0f} MB  "
                f"{faults:>10,.0f} page faults  ({len(rs)} runs)"
            )


if __name__ == "__main__":
    main()
