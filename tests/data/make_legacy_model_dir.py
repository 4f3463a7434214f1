"""Writes tests/data/legacy_model_dir/: a tiny model directory saved by the code as it was
before the objective interface (commit e41cc35), and the scores it gives on a fixed batch.
Kept so that model directories users saved then keep loading (tests/test_objectives.py).
Not run by the tests; rerunning it on today's code would defeat its purpose."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

from test_model import tiny_batch, tiny_cfg, tiny_tokenizer  # noqa: E402

from vlp.model import build_model, save_model_dir  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.loss.weighting = "uncertainty"  # the log-variance scalars must load too
    model = build_model(cfg).eval()
    tokenizer = tiny_tokenizer(HERE / "legacy_vocab")
    out = HERE / "legacy_model_dir"
    save_model_dir(model, cfg, tokenizer, out)
    batch = tiny_batch(b=3)
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(batch["image"])
        text_tokens = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
        scores = {
            "image": model.encode_image(batch["image"]).tolist(),
            "text": model.encode_text(batch["input_ids"], batch["attention_mask"]).tolist(),
            "filip_i2t": model.filip_scores(image_tokens, text_tokens, batch["attention_mask"])[0].tolist(),
            "itm": model.itm_scores(batch["input_ids"], batch["attention_mask"], batch["image"]).tolist(),
            "logit_scale": float(model.logit_scale), "filip_logit_scale": float(model.filip_logit_scale),
            "generated": model.generate_ids(batch["image"], method="greedy", max_new_tokens=4).tolist(),
        }
    (HERE / "legacy_model_scores.json").write_text(json.dumps(scores))
    import shutil
    shutil.rmtree(HERE / "legacy_vocab")


if __name__ == "__main__":
    main()
