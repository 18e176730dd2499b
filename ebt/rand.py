"""The random draws of EBTs: random starts and Langevin noise (`randn_`), on every path alike.

Seeded results depend on these draws, so the reference loop (ebt.think), the fast paths (ebt.fast) and
the models all take them from here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

_CHUNK = 1 << 20
_threads = (None, None)  # ((pid, threads), ThreadPoolExecutor): a forked process builds its own


def randn_(out: torch.Tensor) -> torch.Tensor:
    """Fill `out` with N(0, 1) draws and return it.

    torch's CPU normal_ is serial, so on CPU a tensor of more than 2^20 elements is filled in chunks of
    2^20, each from its own generator seeded from the global one (one draw), on as many threads as torch
    uses. The numbers depend on the seed alone, not on the thread count; they differ from torch.randn's.
    Elsewhere (CUDA: parallel, and capturable in a CUDA graph) this is out.normal_()."""
    global _threads
    n = out.numel()
    if out.device.type != "cpu" or n <= _CHUNK or not out.is_contiguous():
        return out.normal_()
    base = int(torch.randint(0, 2**62, (1,)))
    flat = out.view(-1)

    def fill(i):
        flat[i * _CHUNK: (i + 1) * _CHUNK].normal_(generator=torch.Generator().manual_seed(base + i))

    key = (os.getpid(), max(1, torch.get_num_threads()))
    if _threads[0] != key:
        if _threads[1] is not None and _threads[0][0] == key[0]:
            _threads[1].shutdown(wait=False)  # another thread count: this process's old pool goes
        _threads = (key, ThreadPoolExecutor(key[1], thread_name_prefix="ebt-randn"))
    list(_threads[1].map(fill, range((n + _CHUNK - 1) // _CHUNK)))
    return out
