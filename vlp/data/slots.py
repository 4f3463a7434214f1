"""Batch image buffers that the DataLoader workers inherit instead of sending.

Sent the usual way, a worker's batch images become a fresh shared-memory segment per batch
(~0.7 ms to create for 64 images of 64 px), and the main process fetches its file
descriptor from the worker over a socket with a challenge-response handshake (~1 ms,
waiting for the worker's sharer thread to be scheduled): on the demo glyphs ~20 us of CPU
per image, 8% of all the loader's work. Here the main process maps one anonymous shared
region with a few batch-sized slots per worker before the workers fork; they inherit it,
so a batch only names its slot. Nothing is named in /dev/shm, so nothing can leak: the
memory goes when the last process holding it does.
"""
from __future__ import annotations

import functools
import math
import mmap
import multiprocessing
import os

import numpy as np
import torch
from torch.utils.data import get_worker_info


class BatchSlots:
    """`slots_per_worker` uint8 buffers of `shape` for each of `workers` forked workers.

    A worker `take`s a free slot of its own, writes a batch into it and sends the slot's
    index; the main process `lease`s it as a tensor, and the slot returns to its worker when
    the last view of that tensor is gone. With no slot free (the consumer holds on to many
    batches) `take` returns None and the worker sends its batch the usual way."""

    def __init__(self, workers: int, slots_per_worker: int, shape: tuple[int, ...]):
        self.shape, self.slots_per_worker = shape, slots_per_worker
        self.slot_bytes = math.prod(shape)
        count = workers * slots_per_worker
        # Anonymous mmaps are MAP_SHARED: what a forked worker writes, the main process reads.
        self.memory = mmap.mmap(-1, count * self.slot_bytes)
        self.taken = mmap.mmap(-1, count)  # 1 from take until the main process releases it
        fork = multiprocessing.get_context("fork")
        self.free = [fork.Semaphore(slots_per_worker) for _ in range(workers)]
        # Two passes started before either forked share these slots, and so do their
        # workers of the same number: claiming a slot must then be atomic.
        self.claim = [fork.Lock() for _ in range(workers)]
        self.token = os.urandom(8)  # which pass's slots a batch names

    def take(self) -> tuple[SlotRef, torch.Tensor] | None:
        """In a worker: (what to send for the slot's images, all of them until its `count`
        is lowered; a writable uint8 tensor of `shape`), or None if no slot is free."""
        worker = get_worker_info().id
        if not self.free[worker].acquire(block=False):
            return None
        # A slot's flag is cleared before its semaphore is released, so one is found.
        first = worker * self.slots_per_worker
        with self.claim[worker]:
            index = self.taken.find(b"\0", first, first + self.slots_per_worker)
            if index < 0:
                raise RuntimeError("batch slots: the semaphore and the slot flags disagree")
            self.taken[index] = 1
        return SlotRef(self.token, index, self.shape[0]), torch.from_numpy(self._array(np.ndarray, index))

    def lease(self, ref: SlotRef) -> torch.Tensor:
        """In the main process: the images `ref` names, as a tensor that holds the slot."""
        array = self._array(_Lease, ref.index)
        array.release = functools.partial(self.give_back, ref.index)
        return torch.from_numpy(array)[:ref.count]

    def _array(self, kind: type, index: int) -> np.ndarray:
        return kind(self.shape, np.uint8, self.memory, index * self.slot_bytes)

    def give_back(self, index: int) -> None:
        """Slot `index` is free again (from the main process, or from a worker that took it
        and had nothing to send)."""
        self.taken[index] = 0
        self.free[index // self.slots_per_worker].release()


class _Lease(np.ndarray):
    """A slot's pixels in the main process. Every view (numpy or torch) keeps this array
    alive, so its finalizer runs once nothing can read the slot any more."""

    release = None  # set on the leased array only; its views keep the class default

    def __del__(self):
        if self.release is not None:
            self.release()


class SlotRef:
    """What crosses from a worker in place of a batch's images."""

    def __init__(self, token: bytes, index: int, count: int):
        self.token, self.index, self.count = token, index, count
