#!/usr/bin/env python3
"""ITC retrieval on the demo val split, broken down by whether a val emoji has a sibling in
training that differs only in skin tone.

The demo split (tools/make_demo_shards.py) treats skin-tone variants as emoji of their own,
as the split the demo target was set on did; about half the val emoji then have such a
sibling in training. Recall on the other half, ranked against all val images, is what the
model does on emoji it has never seen in any form.

    python tools/demo_val_breakdown.py runs/demo/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlp.config import DataConfig
from vlp.data import eval_loader, expand_spec
from vlp.data.tar import tar_members
from vlp.metrics import retrieval_recall
from vlp.model import load_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_shards import SKIN_TONES  # noqa: E402  (the tool that built the split)

# What base_emoji drops, in the json's "U+XXXX" spelling; FE0F is the variation selector.
NOT_BASE = {f"U+{cp:04X}" for cp in SKIN_TONES | {0xFE0F}}


def base_emoji(meta: dict) -> tuple[str, ...]:
    """The emoji without skin-tone modifiers and variation selectors."""
    return tuple(cp for cp in meta["codepoints"].split() if cp not in NOT_BASE)


def training_bases(spec: str) -> set[tuple[str, ...]]:
    bases = set()
    for url in expand_spec(spec):
        with open(url, "rb") as stream:
            for name, data in tar_members(stream):
                if name.endswith(".json"):
                    bases.add(base_emoji(json.loads(data)))
    return bases


@torch.no_grad()
def embed(model, data: DataConfig, tokenizer):
    images, texts, owner, metas = [], [], [], []
    for batch in eval_loader(data, tokenizer, rank=0, world_size=1):
        owner.append(batch["text_image_index"] + sum(len(x) for x in images))
        images.append(model.encode_image(batch["image"]))
        texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"]))
        metas += batch["meta"]
    return torch.cat(images), torch.cat(texts), torch.cat(owner), metas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported model directory (RUN_DIR/model)")
    args = parser.parse_args(argv)
    try:
        model, cfg, tokenizer = load_model_dir(args.model)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seen = training_bases(cfg.data.train)
    images, texts, owner, metas = embed(model.float(), cfg.data, tokenizer)
    scores = images @ texts.t()
    has_sibling = torch.tensor([base_emoji(meta) in seen for meta in metas])[owner]
    # Each image's first text is its .txt (the CLDR name): the one caption open_clip's
    # webdataset evaluation reads.
    is_name = torch.zeros(len(owner), dtype=torch.bool)
    is_name[torch.searchsorted(owner, torch.arange(len(images)))] = True
    print(f"{'val texts':<40}{'texts':>7}{'t2i_r1':>8}{'t2i_r5':>8}{'t2i_r10':>8}")
    for label, keep in (("all", torch.ones_like(has_sibling)),
                        ("emoji with a skin-tone sibling in train", has_sibling),
                        ("emoji never seen in any form", ~has_sibling),
                        ("names only (.txt)", is_name)):
        # The subset's texts, still ranked against every val image.
        recall = retrieval_recall(scores[:, keep], owner[keep])
        print(f"{label:<40}{int(keep.sum()):>7}"
              + "".join(f"{recall[k]:>8.3f}" for k in ("t2i_r1", "t2i_r5", "t2i_r10")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
