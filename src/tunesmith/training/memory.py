"""How a CPU run's activations are allocated: fast (reuse, a caching allocator where the system
has one) or lean (return at once).

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

- ``fast`` (default): where the system has tcmalloc (Debian/Ubuntu: ``libtcmalloc-minimal4``),
  the ``tunesmith`` command restarts itself once with it preloaded (``LD_PRELOAD``, as PyTorch's
  own ``torch.backends.xeon.run_cpu`` launcher does). glibc's heap keeps freed activation memory
  but fragments: on the short bench workload its resident peak was ~2x the live peak (1.50 GB
  against 0.76 GB), tcmalloc's size classes reuse blocks instead. Measured (``bench/IDEAS.md``,
  SFT bf16, 32 examples, two runs each): peak RSS 0.78x (LoRA short), 0.79x (full short), 0.90x
  (LoRA vocab150k), loop speed 1.03-1.11x. Without tcmalloc (or from the Python API, whose
  process is already running; start Python under ``LD_PRELOAD`` to get it there), glibc as
  follows: mmap threshold 1 GiB and trim threshold 2 GiB - 1: freed activation memory
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
``MALLOC_TRIM_THRESHOLD_``, or malloc tunables in ``GLIBC_TUNABLES``) or preloads a library of
their own (``LD_PRELOAD``): theirs stand.

**Kernel caches.** PyTorch's CPU bf16 products go through oneDNN, which keeps every primitive it
builds (one per shape) in a cache of 1,024 entries, and ideep, PyTorch's layer over it, keeps
another of 1,024. Length-grouped batches give nearly every step a new row length, so both grow
through a run: on the short SFT LoRA workload with 512 examples (64 steps, tcmalloc), the
resident size rose from 0.94 to 1.70 GB, step after step, until the caches filled (measured
after handing free memory back to the system each step: 0.54 -> 1.12 GB, flat from step ~50).
A batch holds ~25 distinct shapes, so ``fast`` and ``lean`` cap each cache at
:data:`KERNEL_CACHE` entries (about two steps): the resident size then stays at 1.09-1.11 GB
from the third step on (peak 1.11 GB against 1.69 GB), at the same loop time (69.8-70.0 s
against 69.3-72.1 s, two alternating rounds; 256 entries: 1.23 GB, within the same spread).
Both libraries read their capacity when first used, so it is set in the environment before the
model loads, unless the user set it (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
``LRU_CACHE_CAPACITY``); a process that multiplied in bf16 before training keeps its caches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
CACHING_ALLOCATORS = ("tcmalloc_minimal", "tcmalloc")
"""Libraries (as the dynamic loader names them) ``fast`` preloads, the first found."""
PRELOADED = "TUNESMITH_PRELOADED"
"""Set in the restarted process to the library preloaded (and so: restart once only)."""
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}
"""tcmalloc reports every allocation over 1 GiB on stderr by default; a big logits chunk is one."""
KERNEL_CACHE = 64
"""Entries each of oneDNN's and ideep's caches of built primitives may hold (module doc)."""
KERNEL_CACHE_KNOBS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def user_set_malloc(env: dict[str, str]) -> bool:
    """Whether the environment already tunes glibc's malloc thresholds."""
    return any(k in env for k in USER_KNOBS) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (whose ``mallopt`` the settings are for)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not a GNU system
        return False


def caching_allocator() -> str | None:
    """The first of :data:`CACHING_ALLOCATORS` the dynamic loader finds, or None (not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return next(filter(None, map(ctypes.util.find_library, CACHING_ALLOCATORS)), None)


def allocator_env(env: Mapping[str, str], mode: str, library: str | None) -> dict[str, str] | None:
    """The environment to restart the CLI in with ``library`` preloaded, for ``train.cpu_memory``
    = ``mode``; None to stay as it is: not for ``lean`` or ``system``, not twice, and not where
    the user preloads a library or tunes glibc's malloc themselves."""
    if (
        mode != "fast"
        or library is None
        or PRELOADED in env
        or env.get("LD_PRELOAD", "").strip()
        or user_set_malloc(dict(env))
    ):
        return None
    return {**env, **QUIET, "LD_PRELOAD": library, PRELOADED: library}


def set_cpu_malloc(device: torch.device, mode: str) -> bool:
    """Apply ``train.cpu_memory`` = ``mode`` (see the module doc) when training runs on CPU with
    glibc and the user has not tuned malloc themselves; True if it was set."""
    wanted = SETTINGS[mode]
    env = dict(os.environ)
    if (
        not wanted
        or device.type != "cpu"
        or user_set_malloc(env)
        or env.get("LD_PRELOAD", "").strip()  # another malloc is in charge (tcmalloc's
        or not is_glibc()  # mallopt accepts anything and does nothing)
    ):
        return False
    return apply_settings(ctypes.CDLL(None).mallopt, wanted)  # glibc's, in the process's symbols


def cap_kernel_caches(device: torch.device, mode: str) -> bool:
    """For ``train.cpu_memory`` = ``fast`` or ``lean`` on CPU, cap oneDNN's and ideep's caches
    of built primitives at :data:`KERNEL_CACHE` entries each (module doc), where the user has not
    set them; True if either was set."""
    if mode == "system" or device.type != "cpu":
        return False
    unset = [k for k in KERNEL_CACHE_KNOBS if k not in os.environ]
    for knob in unset:
        os.environ[knob] = str(KERNEL_CACHE)
    return bool(unset)


def apply_settings(
    mallopt: Callable[[int, int], int], wanted: list[tuple[int, tuple[int, ...]]]
) -> bool:
    """Set each (parameter, values) in turn, trying its values until ``mallopt`` accepts one;
    stop at the first parameter refused (the rest stay as glibc has them). True if all were set."""
    return all(any(mallopt(param, value) for value in values) for param, values in wanted)
