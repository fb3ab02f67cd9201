"""Peak host memory on CPU: hand freed activation memory back to the system at once.

glibc's ``malloc`` serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap``
and returns it to the system on ``free``; smaller blocks come from the heap, whose freed middle
cannot be returned. By default the threshold is *dynamic*: each freed mmapped block raises it to
that block's size (up to 32 MB), so after the first training step nearly every activation tensor
lives on the heap, and the heap's high-water mark (fragmented by tensors of many sizes freed in
another order than allocated) becomes the process's resident size. A fixed threshold keeps
every large tensor in its own mapping, so the resident size follows the memory actually in use.
Measured in bench/IDEAS.md: peak RSS down by about a third on CPU training, at the cost of a
page fault (and the kernel zeroing the page) for every page of every large allocation: SFT steps
about 1.6x slower, GRPO 1.8x (its system time alone went from 2 s to 17 s in 15 steps). So it is
a setting (``train.cpu_memory: lean``) for runs that must fit in less memory, not the default.
The setting is process-wide, so it is made only when asked for and training runs on CPU, and
never when the user set ``MALLOC_MMAP_THRESHOLD_`` (glibc's own environment knob) themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
THRESHOLD = 64 * 1024


def release_freed_memory(device: torch.device, wanted: bool) -> bool:
    """When ``wanted`` (``train.cpu_memory: lean``), on CPU with glibc, fix malloc's mmap
    threshold (see the module doc); True if it was set."""
    if not wanted or device.type != "cpu" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
