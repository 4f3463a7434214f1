"""Batch slots: images cross from the workers through inherited shared memory, and a slot
is only reused once nothing in the main process can read it."""
from __future__ import annotations

from types import SimpleNamespace

import torch

import vlp.data.slots as slots_module
from vlp.data import train_loader
from vlp.data.slots import BatchSlots

from test_data import cfg_for, good, write_shards


def as_worker(monkeypatch, worker: int) -> None:
    monkeypatch.setattr(slots_module, "get_worker_info", lambda: SimpleNamespace(id=worker))


def test_a_slot_is_held_while_any_view_of_its_batch_lives(monkeypatch):
    slots = BatchSlots(workers=2, slots_per_worker=2, shape=(4, 3, 2, 2))
    as_worker(monkeypatch, 1)
    (a, pixels), (b, _) = slots.take(), slots.take()
    assert {a.index, b.index} == {2, 3} and slots.take() is None  # worker 1's own two, then none
    pixels[:3] = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1)
    a.count = 3
    leased = slots.lease(a)
    assert leased.shape == (3, 3, 2, 2) and leased[:, 0, 0, 0].tolist() == [0, 1, 2]
    view = leased[1:]
    del leased
    assert slots.take() is None  # the view still reads slot a
    del view
    assert slots.take()[0].index == a.index
    slots.give_back(b.index)
    assert slots.take()[0].index == b.index
    as_worker(monkeypatch, 0)
    assert slots.take()[0].index == 0  # worker 0's slots were never touched


def test_batches_through_slots_equal_batches_made_in_process(tmp_path, monkeypatch):
    """One worker seeds like the main process, so its batches must be the same ones, MixGen
    blends included, even when the consumer holds more batches than the worker has slots."""
    leases = []
    lease = BatchSlots.lease
    monkeypatch.setattr(BatchSlots, "lease", lambda self, *a: leases.append(a) or lease(self, *a))
    spec = write_shards(tmp_path, "train", [good(i * 5) for i in range(40)], maxcount=10)

    def all_batches(workers: int) -> list[dict]:
        cfg = cfg_for(spec, workers=workers, mixgen_prob=0.5, train_samples=48)
        return list(train_loader(cfg, None))  # 12 batches of 4, all held at once

    in_process, from_worker = all_batches(0), all_batches(1)
    assert len(in_process) == len(from_worker) == 12
    assert 5 <= len(leases) < 12  # slots while there were free ones, then sent the usual way
    for a, b in zip(in_process, from_worker):
        assert a["key"] == b["key"] and a["text"] == b["text"]
        assert torch.equal(a["image"], b["image"])


def test_two_passes_at_once_each_get_their_own_images(tmp_path):
    """A pass still being iterated after the next one started reads its own slots."""
    spec = write_shards(tmp_path, "train", [good(i * 5) for i in range(40)], maxcount=10)
    loader = train_loader(cfg_for(spec, workers=1, train_samples=48), None)
    first = iter(loader)
    batches = [next(first) for _ in range(3)]
    second = iter(loader)
    batches += [next(second) for _ in range(3)] + [next(first) for _ in range(3)]
    for batch in batches:
        for key, image in zip(batch["key"], batch["image"]):
            assert abs(image[0].float().mean().item() - int(key[1:])) < 8, key
