"""tools/bench_service.py's good requests are good for the index's model: a FILIP rerank only
where the model was trained with FILIP (on any other it is a 400, counted as a failure)."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shard_sets import load_tool
from vlp.config import Config, save_config


@pytest.mark.parametrize("filip", [0.0, 1.0])
def test_filip_reranks_are_good_requests_only_for_a_model_with_filip(tmp_path, filip):
    cfg = Config()
    cfg.loss.filip.weight = filip
    (tmp_path / "model").mkdir()
    save_config(cfg, tmp_path / "model" / "config.yaml")
    (tmp_path / "build.json").write_text(json.dumps({"model": str(tmp_path / "model")}))
    (tmp_path / "s.tar").write_bytes(b"image bytes")  # the image queries read their member
    pq.write_table(pa.table({"captions": [["a red apple"]], "shard": [str(tmp_path / "s.tar")],
                             "image_offset": [0], "image_size": [1]}), tmp_path / "items.parquet")
    requests = load_tool("bench_service").good_requests(tmp_path, 12, random.Random(0))
    texts = [body for kind, body, _ in requests if kind == "good_text"]
    assert len(texts) == 6 and sum(b'"filip"' in body for body in texts) == (2 if filip else 0)
