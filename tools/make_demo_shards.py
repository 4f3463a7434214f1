#!/usr/bin/env python3
"""Build the embedded demo set `shards/demo/` from material no one here wrote.

Images: every fully-qualified emoji in Unicode's emoji-test.txt, rendered from Google's Noto
Color Emoji font (a CBDT bitmap font: drawn at its native size 109 with embedded colors,
composited on white, downscaled to 64 px, JPEG at quality 75: 14.9 MB in all, where
quality 90 took 17.1 MB; over half of either is tar headers and padding, 2.5 KB a sample).
Skin-tone variants are emoji of their own and are kept (as in the split the demo's target
was set on), so about half the val emoji have a sibling in training that differs only in
skin tone; `--no-skin-tones` leaves them out for the strict protocol where no val emoji
has a near-copy in training.
Captions: the CLDR English name (`.txt`), plus "name, keyword, keyword..." in the json
`captions` list; the json also keeps `name`, `keywords`, `group`, `subgroup`, `codepoints`.
Split: by emoji, deterministic (seeded shuffle; every 10th → val).

Rebuild (Debian/Ubuntu):
    apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data
    python tools/make_demo_shards.py shards/demo
"""
from __future__ import annotations

import argparse
import io
import math
import random
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlp.data.writer import ShardWriter, write_sizes

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR = Path("/usr/share/unicode/cldr/common")
APT_HINT = "apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data"
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
NATIVE_SIZE = 109  # the only size the bitmap strikes exist at


def read_emoji_test(path: Path, skin_tones: bool) -> list[dict]:
    """Fully-qualified emoji in CLDR order with their group and subgroup."""
    emoji, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line:
            codepoints = [int(cp, 16) for cp in line.split(";")[0].split()]
            if skin_tones or SKIN_TONES.isdisjoint(codepoints):
                emoji.append({"codepoints": codepoints, "group": group, "subgroup": subgroup})
    return emoji


def read_cldr_annotations(cldr: Path) -> dict[str, tuple[str, list[str]]]:
    """Emoji string (without U+FE0F, as CLDR keys them) → (English name, keywords)."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for sub in ("annotations", "annotationsDerived"):
        for node in ET.parse(cldr / sub / "en.xml").getroot().iter("annotation"):
            cp, text = node.get("cp"), (node.text or "").strip()
            if node.get("type") == "tts":
                names[cp] = text
            else:
                keywords[cp] = [k.strip() for k in text.split("|") if k.strip()]
    return {cp: (name, keywords.get(cp, [])) for cp, name in names.items()}


def render(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """The glyph on white, centered in a square, downscaled; None if the font lacks it."""
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (right, bottom), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    alpha_box = canvas.getchannel("A").getbbox()
    if alpha_box is None or right > 1.5 * bottom:  # blank, or drawn as several glyphs
        return None
    side = max(right, bottom)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(canvas, ((side - right) // 2, (side - bottom) // 2), canvas)
    return square.resize((size, size), Image.Resampling.LANCZOS)


def build_samples(size: int, quality: int, skin_tones: bool) -> list[dict]:
    for path in (FONT, EMOJI_TEST, CLDR / "annotations" / "en.xml"):
        if not path.exists():
            sys.exit(f"missing {path}; install the sources with: {APT_HINT}")
    font = ImageFont.truetype(str(FONT), NATIVE_SIZE, layout_engine=ImageFont.Layout.RAQM)
    annotations = read_cldr_annotations(CLDR)
    samples, missing = [], []
    for item in read_emoji_test(EMOJI_TEST, skin_tones):
        text = "".join(map(chr, item["codepoints"]))
        name, keywords = annotations.get(text.replace("\ufe0f", ""), (None, []))
        image = render(text, font, size) if name else None
        if image is None:
            missing.append(text)
            continue
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality, optimize=True)
        extra = [k for k in keywords if k != name]
        samples.append({
            "__key__": "_".join(f"{cp:x}" for cp in item["codepoints"]),
            "jpg": buf.getvalue(),
            "txt": name,
            "json": {"name": name, "keywords": keywords, "group": item["group"],
                     "subgroup": item["subgroup"],
                     "codepoints": " ".join(f"U+{cp:04X}" for cp in item["codepoints"]),
                     "captions": [", ".join([name] + extra)] if extra else []},
        })
    if missing:
        print(f"left out {len(missing)} emoji without a CLDR name or a single glyph: "
              f"{' '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    return samples


SKIN_NOTE = {
    True: "skin-tone variants are kept as emoji of their own, so about half the val emoji\n"
          "have a sibling in training that differs only in skin tone (`--no-skin-tones` for a\n"
          "strict split)",
    False: "skin-tone variants are left out, so no val emoji has a near-copy in training",
}

PROVENANCE = """# Demo shards (generated: do not edit)

{train} train + {val} val emoji, {train_shards} + {val_shards} img2dataset-layout shards, split by emoji
(seed {seed}); {skin}.
Each sample: `KEY.jpg` ({size} px, JPEG quality {quality}), `KEY.txt` (the CLDR English
name), `KEY.json` (`name`, `keywords`, `group`, `subgroup`, `codepoints`, and `captions`:
the name followed by its keywords). KEY is the code points in hex.

Sources (Debian packages):
- images: rendered from Noto Color Emoji (`fonts-noto-color-emoji`, SIL Open Font License 1.1);
- names and keywords: Unicode CLDR annotations (`unicode-cldr-core`, Unicode License);
- groups and subgroups: `emoji-test.txt` (`unicode-data`, Unicode License).

Rebuild (byte-identical for the same package versions):

    apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data
    python tools/make_demo_shards.py shards/demo
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (replaced)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--quality", type=int, default=75,
                        help="JPEG quality (75, the libjpeg default, keeps the set under 15 MB)")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--val-shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-skin-tones", dest="skin_tones", action="store_false",
                        help="leave skin-tone variants out (no val emoji then has a near-copy in training)")
    args = parser.parse_args()

    samples = build_samples(args.size, args.quality, args.skin_tones)
    random.Random(args.seed).shuffle(samples)
    splits = {"val": samples[::10], "train": [s for i, s in enumerate(samples) if i % 10]}
    staging = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    sizes = {}
    for split, shards in (("train", args.train_shards), ("val", args.val_shards)):
        rows = splits[split]
        with ShardWriter(staging, split, maxcount=math.ceil(len(rows) / shards)) as writer:
            for sample in rows:
                writer.write(sample)
        sizes.update(writer.close())
    write_sizes(staging, sizes)
    (staging / "README.md").write_text(PROVENANCE.format(
        train=len(splits["train"]), val=len(splits["val"]), size=args.size, quality=args.quality,
        seed=args.seed,
        skin=SKIN_NOTE[args.skin_tones],
        train_shards=args.train_shards, val_shards=args.val_shards))
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.out}: {len(splits['train'])} train + {len(splits['val'])} val emoji in "
          f"{len(sizes)} shards, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
