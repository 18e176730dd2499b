"""Recycled CPU memory for the (B, S, V) tensors of EBT steps."""

from __future__ import annotations

import threading

import torch


class Recycler:
    """Dead (B, S, V) tensors on CPU, kept to receive the next step's outputs (`out=`).

    Why: glibc serves each allocation above its mmap threshold with a fresh mapping and unmaps it on
    free, so every new (B, S, V) tensor pays a page fault per 4 KB on first touch, and a step makes
    several. CUDA's caching allocator already reuses memory, so on other devices `take` is torch.empty
    and `give` keeps nothing. Only a tensor that nothing else will read may be given: the training
    unroll gives its own p, v and dead candidates, never one a caller holds. At most `keep` tensors
    are held (keep=0: nothing is ever reused); `clear()` frees them. min_bytes: smaller tensors come
    from malloc's heap, which reuses memory already."""

    def __init__(self, keep: int = 6, min_bytes: int = 1 << 22):
        self.keep, self.min_bytes, self.free, self.lock = keep, min_bytes, [], threading.Lock()

    def take(self, shape, dtype, device) -> torch.Tensor:
        shape = torch.Size(shape)
        with self.lock:
            for i, t in enumerate(self.free):
                if t.shape == shape and t.dtype == dtype and t.device == device:
                    return self.free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def take_like(self, like: torch.Tensor) -> torch.Tensor:
        return self.take(like.shape, like.dtype, like.device)

    def give(self, *tensors) -> None:
        with self.lock:
            for t in tensors:
                if (t is not None and t.device.type == "cpu" and t._base is None and t.is_contiguous()
                        and t.grad_fn is None and t.untyped_storage().nbytes() >= self.min_bytes
                        and all(t.data_ptr() != f.data_ptr() for f in self.free)):  # never twice
                    self.free.append(t.detach())
            del self.free[: max(0, len(self.free) - self.keep)]

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


def take(pool, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like `like`: recycled memory from pool, or new."""
    return torch.empty_like(like) if pool is None else pool.take_like(like)


def give_inputs(pool, z_in, z_step, owned: bool) -> None:
    """After a step, give back its input candidates, which nothing reads from here on: the noised one
    z_step (the step's own, when noise made one) and z_in when owned (not a start the caller holds)."""
    pool.give(*([z_step] if z_step is not z_in else []), *([z_in] if owned else []))
