"""Two real ranks (gloo process group, no launcher): rank and world come from
torch.distributed, as they do under `deepspeed`."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from vlp.config import DataConfig
from vlp.data import eval_loader, train_loader
from vlp.data.writer import ShardWriter, write_sizes


def _write(out: Path, prefix: str, counts: list[int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 200, 10)).save(buf, "JPEG")
    index = 0
    sizes = {}
    for shard, count in enumerate(counts):
        with ShardWriter(out / f"part{shard}", prefix, maxcount=count) as writer:
            for _ in range(count):
                writer.write({"__key__": f"k{index:04d}", "jpg": buf.getvalue(), "txt": f"c{index}"})
                index += 1
        write_sizes(out / f"part{shard}", writer.sizes)
        sizes[shard] = str(out / f"part{shard}" / f"{prefix}-000000.tar")
    return "::".join(sizes.values())


def _rank_main(rank: int, tmp: str, train_spec: str, val_spec: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    cfg = DataConfig(train=train_spec, val=val_spec, batch_size=4, eval_batch_size=3,
                     workers=2, shuffle_buffer=4, image_size=16)
    loader = train_loader(cfg, None)
    batches = [len(b["key"]) for epoch in range(2) for b in loader]
    val_keys = [k for b in eval_loader(cfg, None) for k in b["key"]]
    gathered = [None, None]
    dist.all_gather_object(gathered, {"train": batches, "len": len(loader), "val": val_keys})
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def test_two_ranks_get_equal_train_batches_and_disjoint_complete_eval(tmp_path):
    # Uneven shards: rank 0 owns 11 samples, rank 1 owns 2 (shard split by node).
    train_spec = _write(tmp_path / "train", "train", [10, 2, 1])
    val_spec = _write(tmp_path / "val", "val", [7, 4, 2])  # 3 shards < 2 ranks × 2 workers
    # fork: spawned ranks would each re-import torch (seconds on 2 busy cores)
    mp.start_processes(_rank_main, args=(str(tmp_path), train_spec, val_spec), nprocs=2,
                       join=True, start_method="fork")
    r0, r1 = json.loads((tmp_path / "result.json").read_text())
    expected = 2  # ceil(13 samples / (4 per batch · 2 ranks))
    assert r0["len"] == r1["len"] == expected
    assert r0["train"] == r1["train"] == [4] * (2 * expected)  # 2 epochs, full batches
    assert sorted(r0["val"] + r1["val"]) == [f"k{i:04d}" for i in range(13)]
