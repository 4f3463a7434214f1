"""Embedding pass and item store: metadata, resume after a kill, rank split + merge."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_retrieval_support import encoder, tiny_index, tiny_model_dir, tiny_shards
from vlp.retrieval import store
from vlp.retrieval.build import build_index_dir
from vlp.retrieval.embed import EmbedSettings, embed_shards
from vlp.retrieval.index import load_index
from vlp.retrieval.search import Searcher


def settings(**kw) -> EmbedSettings:
    base = dict(model=str(tiny_model_dir()), batch_size=8, chunk_size=4, filip_tokens=4)
    return EmbedSettings(**{**base, **kw})


def same_store(a, b) -> None:
    ta, tb = pq.read_table(a / store.ITEMS), pq.read_table(b / store.ITEMS)
    assert ta.equals(tb)
    for name in (store.IMAGE_EMB, store.TEXT_EMB, store.TEXT_OWNER, store.IMAGE_TOKENS):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name))


def test_items_carry_metadata_ids_and_image_offsets():
    searcher = Searcher(tiny_index())
    items = searcher.items
    assert len(items) == 30  # 3 shards x 10; the undecodable sample is a counted skip
    manifest = json.loads((tiny_index() / "manifest.json").read_text())
    assert manifest["count"] == 30 and manifest["dims"] == 32 and manifest["factory"] == "IDMap,Flat"
    assert manifest["model"] == str(tiny_model_dir()) and manifest["recall_at_10"] == 1.0
    row = items.row(store.item_id("010010"))
    record = items.item(row)
    assert record["key"] == "010010" and record["captions"] == ["a blue square", "square in blue"]
    assert record["json"]["n"] == 10 and record["shard"].endswith("part1-000000.tar")
    with tarfile.open(record["shard"]) as tar:  # the stored offset reads the exact member
        assert searcher.image_bytes(row) == tar.extractfile("010010.jpg").read()
    assert items.image_emb.dtype == np.float16 and items.tokens.shape == (30, 4, 32)
    assert len(items.text_emb) == 60 and items.text_owner.tolist() == np.repeat(np.arange(30), 2).tolist()


def test_resumed_build_equals_uninterrupted_build(tmp_path):
    shards = list(tiny_shards())
    full, resumed = tiny_index(), tmp_path / "resumed"  # tiny_index: one uninterrupted build

    def kill_after_three(name):
        if len(store.finished_chunks(resumed)) == 3:
            (resumed / store.CHUNKS / ".leftover.img.npy").write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
    with pytest.raises(KeyboardInterrupt):
        embed_shards(encoder(), shards, resumed, settings(), on_chunk=kill_after_three)
    again = embed_shards(encoder(), shards, resumed, settings())
    assert again["resumed_chunks"] == 3 and again["chunks"] == 6
    assert "skipped_bad_image" not in again  # its chunk was finished: not decoded again
    assert not (resumed / store.CHUNKS / ".leftover.img.npy").exists()
    build_index_dir(resumed, str(tiny_model_dir()))
    same_store(full, resumed)
    index_a, _ = load_index(full)
    index_b, _ = load_index(resumed)
    queries = np.load(full / store.TEXT_EMB).astype(np.float32)
    np.testing.assert_array_equal(index_a.search(queries, 5)[1], index_b.search(queries, 5)[1])


def test_ranks_embed_disjoint_shards_and_merge(tmp_path):
    shards = list(tiny_shards())
    a, b = tmp_path / "rank0", tmp_path / "rank1"
    n0 = embed_shards(encoder(), shards, a, settings(), rank=0, world=2)["embedded"]
    n1 = embed_shards(encoder(), shards, b, settings(), rank=1, world=2)["embedded"]
    assert (n0, n1) == (20, 10)  # shards 0, 2 and shard 1
    manifest = build_index_dir(a, str(tiny_model_dir()), merge_from=[b])
    assert manifest.count == 30
    same_store(a, tiny_index())


def test_changed_settings_refuse_to_mix_chunks(tmp_path):
    embed_shards(encoder(), list(tiny_shards())[:1], tmp_path, settings())
    with pytest.raises(ValueError, match="chunk_size: 4 → 5"):
        embed_shards(encoder(), list(tiny_shards())[:1], tmp_path, settings(chunk_size=5))


def test_duplicate_keys_keep_first_and_are_counted(tmp_path, caplog):
    embed_shards(encoder(), list(tiny_shards())[:1], tmp_path / "a", settings())
    embed_shards(encoder(), list(tiny_shards())[:1], tmp_path / "b", settings())
    # Same shard twice under one name: the chunk is taken once. Rename b's to force a clash.
    for path in (tmp_path / "b" / store.CHUNKS).iterdir():
        path.rename(path.with_name("zz" + path.name))
    count = store.merge_chunks(tmp_path / "a", [tmp_path / "b"])
    assert count == 10 and "dropped 10 items" in caplog.text


def test_missing_chunks_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished embedding chunks"):
        build_index_dir(tmp_path, "m")


def test_build_cli_images_only_with_factory_override(tmp_path, capsys):
    from pipelines.build_index import main

    out = tmp_path / "idx"
    shard = list(tiny_shards())[1]
    assert main(["--model", str(tiny_model_dir()), "--shards", shard, "--out", str(out),
                 "--no-captions", "--filip-tokens", "0", "--factory", "IDMap,HNSW8", "--fp32"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["factory"] == "IDMap,HNSW8" and manifest["count"] == 10
    assert "efSearch" in manifest["search_params"]
    searcher = Searcher(out, encoder=encoder())
    assert len(searcher.items.text_emb) == 0 and searcher.items.tokens is None
    assert searcher.items.image_emb.dtype == np.float32
    with pytest.raises(ValueError, match="needs stored image tokens"):
        searcher.search_text("a red circle", 3, rerank="filip")
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "x"), "--shards", shard]) == 2
    assert "--model and --shards are required" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir()), "--shards", str(tmp_path / "none-{0..1}.tar"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "shard not found" in capsys.readouterr().err


def test_shard_reader_gives_seekable_offsets_and_counts_a_tar_cut_between_members(tmp_path):
    from vlp.data.skips import SkipCounter
    from vlp.retrieval.shards import iter_shard, read_member

    shard = tiny_shards(n_shards=1, per_shard=4, corrupt=False)[0]
    whole = list(iter_shard(shard, SkipCounter()))
    assert len(whole) == 4
    for sample in whole:
        assert read_member(shard, sample.image_offset, sample.image_size) == sample.image_bytes
    # Cut right after the second sample's last member: tarfile would call this a whole tar.
    # The reader cannot tell whether that sample's members were all there, so it drops it
    # along with the one counted bad tar; the first sample survives with its offsets.
    data = open(shard, "rb").read()
    third = whole[2]
    first_member_of_third = min(s.image_offset for s in whole[2:]) - 512
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:first_member_of_third])
    skips = SkipCounter()
    kept = list(iter_shard(str(cut), skips))
    assert [s.key for s in kept] == [whole[0].key] and third.key not in {s.key for s in kept}
    assert read_member(str(cut), kept[0].image_offset, kept[0].image_size) == whole[0].image_bytes
    assert skips.total["bad_tar"] == 1


def _build(capsys, *args) -> tuple[int, str]:
    from pipelines.build_index import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_an_unrelated_out_directory_is_never_written_into(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "notes.txt").write_text("my notes")
    (out / "manifest.json").write_text('{"mine": true}')
    shard = tiny_shards()[1]
    for stage in ("all", "index"):
        code, err = _build(capsys, "--model", tiny_model_dir(), "--shards", shard, "--out", out, "--stage", stage)
        assert code == 2 and "is not empty" in err and "is not a vlp index build" in err, err
    assert (out / "chunks" / "notes.txt").read_text() == "my notes"
    assert (out / "manifest.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.rglob("*")) == ["chunks", "manifest.json", "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _build(capsys, "--model", tiny_model_dir(), "--shards", shard, "--out", empty)[0] == 0


def test_another_model_or_shard_list_never_mixes_into_an_index(tmp_path, capsys):
    """The model is keyed by its content, not its path: new weights in the same directory
    are another model. Another shard list is refused too, unless --append says so."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), model)
    out, shards = tmp_path / "idx", tiny_shards()
    assert _build(capsys, "--model", model, "--shards", shards[1], "--out", out)[0] == 0
    weights = load_file(str(model / "model.safetensors"))
    weights = {name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    save_file(weights, str(model / "model.safetensors"))  # retrained in place
    code, err = _build(capsys, "--model", model, "--shards", f"{shards[1]}::{shards[2]}", "--out", out)
    assert code == 2 and "by another model (its weights or config differ" in err, err
    code, err = _build(capsys, "--model", model, "--shards", shards[1], "--out", out)
    assert code == 2 and "by another model" in err and "shard list" not in err
    # The original model again (moved elsewhere: the path may change) and one more shard.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir(), moved)
    code, err = _build(capsys, "--model", moved, "--shards", f"{shards[1]}::{shards[2]}", "--out", out)
    assert code == 2 and "from another shard list (1 shards then, 2 now: 1 new, 0 left out; --append" in err, err
    assert _build(capsys, "--model", moved, "--shards", shards[2], "--out", out, "--append")[0] == 0
    assert Searcher(out).manifest.count == 20
    assert len(json.loads((out / "build.json").read_text())["shards"]) == 2
    other = tmp_path / "other"
    assert _build(capsys, "--model", model, "--shards", shards[0], "--out", other, "--stage", "embed")[0] == 0
    code, err = _build(capsys, "--out", out, "--stage", "index", "--merge", other)
    assert code == 2 and "chunks of different models cannot be merged" in err


def _png(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_indexing_counts_images_over_the_pixel_budget(tmp_path):
    from vlp.data.writer import ShardWriter
    from vlp.retrieval.encoder import Encoder

    with ShardWriter(tmp_path / "shards", "big", 10) as writer:
        writer.write({"__key__": "big", "png": _png((1200, 1000)), "txt": "large"})
        writer.write({"__key__": "small", "png": _png((40, 40)), "txt": "small"})
    enc = Encoder(tiny_model_dir())
    enc.cfg.data.max_image_pixels = 1_000_000  # the model config's budget applies
    counts = embed_shards(enc, [str(tmp_path / "shards" / "big-000000.tar")], tmp_path / "idx", settings())
    assert counts["embedded"] == 1 and counts["skipped_image_too_large"] == 1
