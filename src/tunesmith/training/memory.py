"""How glibc's ``malloc`` serves a CPU run's activations: fast (reuse) or lean (return at once).

Activation tensors are megabytes each and are freed and allocated again every step. glibc serves
a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps it on ``free``;
smaller blocks come from the heap, whose top is handed back to the system when more than
``M_TRIM_THRESHOLD`` bytes there are free. Memory that goes back to the system comes back as
fresh pages: a page fault, and the kernel zeroing the page, for every 4 KB touched. glibc's
defaults are dynamic (the mmap threshold rises to the size of each freed mapped block, up to
32 MB, and the trim threshold with it), so blocks above 32 MB (log-prob chunks at a 150k
vocabulary are 64 MB) are always mapped anew, and the heap's top keeps being trimmed and
refaulted.

``train.cpu_memory`` (on CPU, with glibc; set before the model loads, for the whole process):

- ``fast`` (default): mmap threshold 1 GiB and trim threshold 2 GiB - 1: freed activation memory
  stays in the heap and the next step reuses it, so pages fault once, when the heap first
  grows to its peak. Measured (``bench/IDEAS.md``, SFT + LoRA, 32 examples, bf16): short
  workload loop 6.3 -> 5.8 s, peak RSS 1.61 -> 1.55 GB; vocab150k 5.6 -> 3.4 s at 1.12 -> 1.17
  GB; DPO short 9.8 -> 9.2 s at the same peak. Page faults per run 0.52 M -> 0.37 M (short),
  2.3 M -> 0.25 M (vocab150k).
- ``lean``: mmap threshold 64 KB: every large tensor in its own mapping, returned on ``free``,
  so the resident size follows live memory (peak about 0.6x on SFT), at a page fault per page
  of every large tensor (steps about 1.6x slower on SFT, 1.8x on GRPO).
- ``system``: leave glibc's own behaviour.

Nothing is set when the user set glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, or malloc tunables in ``GLIBC_TUNABLES``): theirs stand.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
SETTINGS: dict[str, list[tuple[int, tuple[int, ...]]]] = {
    # (parameter, values to try in turn): glibc before 2.3x refuses an mmap threshold above
    # 32 MiB, and a refused threshold must not leave the trim setting alone (setting either turns
    # glibc's dynamic threshold off, which would pin the mmap threshold at 128 KB).
    "fast": [(M_MMAP_THRESHOLD, (2**30, 2**25)), (M_TRIM_THRESHOLD, (2**31 - 1,))],
    "lean": [(M_MMAP_THRESHOLD, (64 * 1024,))],
    "system": [],
}
USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def user_set_malloc(env: dict[str, str]) -> bool:
    """Whether the environment already tunes glibc's malloc thresholds."""
    return any(k in env for k in USER_KNOBS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (whose ``mallopt`` the settings are for)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not a GNU system
        return False


def set_cpu_malloc(device: torch.device, mode: str) -> bool:
    """Apply ``train.cpu_memory`` = ``mode`` (see the module doc) when training runs on CPU with
    glibc and the user has not tuned malloc themselves; True if it was set."""
    wanted = SETTINGS[mode]
    if not wanted or device.type != "cpu" or user_set_malloc(dict(os.environ)) or not is_glibc():
        return False
    return apply_settings(ctypes.CDLL(None).mallopt, wanted)  # glibc's, in the process's symbols


def apply_settings(
    mallopt: Callable[[int, int], int], wanted: list[tuple[int, tuple[int, ...]]]
) -> bool:
    """Set each (parameter, values) in turn, trying its values until ``mallopt`` accepts one;
    stop at the first parameter refused (the rest stay as glibc has them). True if all were set."""
    return all(any(mallopt(param, value) for value in values) for param, values in wanted)
