#!/usr/bin/env python3
"""Build a development set unlike the emoji: characters drawn from many fonts, with
class-level captions that also name the style, and fonts held out for evaluation.

    python tools/make_font_shards.py OUT [--fonts DIR ...] [--seed 0]

Classes: lowercase letters, digits and a few signs (45 by default, `--chars`); the label is
the class's name ("letter g", "digit 7", "ampersand"; OUT/classes.txt lists them).
Images: one character at 64 px on a light background, in one of eight ink colours, large
or small, at a random place. Captions (three phrasings, `.txt` + the json `captions` list):
"a large red letter g in a bold italic serif font", "a lowercase g, bold, italic, serif,
red, large", "the letter g". Style words come from the font's own tables: weight, slant,
fixed pitch, and its PANOSE serif class where the font states one. `--captions class`
names the class alone ("a digit 7", "the number 7", "a picture of the numeral 7"), the shape
of a labelled set turned into captions: zero-shot then measures what training was about.

Fonts: every font fontconfig lists (`fc-list`), or the fonts under each `--fonts DIR`, that
maps every class character to a glyph of its own with that character's name (symbol fonts
that put pictures at letter code points are left out). Fonts whose glyphs look alike
(families of one design, metric clones of one typeface: a distance between small renders of
every class glyph) form one group; groups never straddle splits. At most
`--fonts-per-group` fonts of a group are used, picked to differ most; identical-looking ones
once. Splits, by group: `val` (retrieval) and `zeroshot` (labelled by the json field
`class`) hold fonts never seen in training, and not each other's either.

    python pipelines/zeroshot.py --model M --images 'OUT/zeroshot-*.tar' \\
        --label-field class --classes OUT/classes.txt

More fonts (Debian): apt-get install fonts-liberation fonts-noto-core fonts-freefont-ttf
fonts-urw-base35 fonts-texgyre fonts-lmodern ... (docs/training.md#development-sets lists
the set the documented figures were built from). Deterministic for a seed and a set of
fonts; OUT/fonts.json records which fonts went where.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from fontTools import agl
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devsets import jpeg_bytes, staged_output, with_article, write_split  # noqa: E402

from vlp.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from vlp.data.writer import write_sizes  # noqa: E402

DEFAULT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789&?!@#$%+="
SIGN_NAMES = {
    "&": ["ampersand", "and sign", "& sign"], "?": ["question mark", "? sign"],
    "!": ["exclamation mark", "! sign"], "@": ["at sign", "@ symbol"],
    "#": ["hash sign", "number sign", "# symbol"], "$": ["dollar sign", "$ symbol"],
    "%": ["percent sign", "% symbol"], "+": ["plus sign", "+ symbol"],
    "=": ["equals sign", "= symbol"],
}
COLOURS = {"black": (25, 25, 25), "red": (205, 30, 35), "green": (30, 140, 55),
           "blue": (35, 70, 205), "orange": (240, 135, 20), "purple": (125, 45, 165),
           "brown": (115, 70, 35), "grey": (125, 125, 125)}
SIZES = {"large": (34, 44), "small": (15, 21)}  # digit height in px on the 64-px canvas
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
LOOK_ALIKE = 0.14   # render distance under which two fonts share a design (clones, variants)
IDENTICAL = 0.02    # ... and under which they are the same glyphs
APT_HINT = ("apt-get install fonts-liberation fonts-noto-core fonts-freefont-ttf "
            "fonts-urw-base35 fonts-texgyre fonts-lmodern")


def class_names(char: str) -> list[str]:
    """The class's names, the label first."""
    if char.isascii() and char.islower():
        return [f"letter {char}", f"lowercase {char}", f"lowercase letter {char}"]
    if char.isdigit():
        return [f"digit {char}", f"number {char}", f"numeral {char}"]
    if char in SIGN_NAMES:
        return SIGN_NAMES[char]
    raise SystemExit(f"--chars: no name for {char!r}; use lowercase letters, digits or {''.join(SIGN_NAMES)}")


@dataclass(frozen=True)
class Font:
    path: str
    index: int
    family: str
    weight: str          # light | regular | bold
    italic: bool
    kind: str | None     # monospaced | serif | sans-serif | handwritten | None (unknown)

    def style_words(self) -> list[str]:
        words = [self.weight] if self.weight != "regular" else []
        return words + (["italic"] if self.italic else []) + ([self.kind] if self.kind else [])


# ---- finding fonts --------------------------------------------------------------------

def font_files(dirs: list[Path]) -> list[tuple[str, int]]:
    """(file, index in a collection) of every font file under `dirs`, or fontconfig's list."""
    if dirs:
        missing = [d for d in dirs if not d.is_dir()]
        if missing:
            raise SystemExit(f"--fonts: not a folder: {missing[0]}")
        paths = sorted({str(p) for d in dirs for p in d.rglob("*") if p.suffix.lower() in FONT_SUFFIXES})
        return [(p, i) for p in paths for i in range(_faces(p))]
    if shutil.which("fc-list") is None:
        raise SystemExit("fc-list not found: install fontconfig or pass --fonts DIR")
    listing = subprocess.run(["fc-list", "--format", "%{file}|%{index}\n"], check=True,
                             capture_output=True, text=True).stdout
    found = set()
    for line in listing.splitlines():
        path, _, index = line.rpartition("|")
        # A variable font's named instances come as index >= 2**16: its default face stands for them.
        if path.lower().endswith(FONT_SUFFIXES) and int(index or 0) < 0x10000:
            found.add((path, int(index or 0)))
    return sorted(found)


def _faces(path: str) -> int:
    if not path.lower().endswith(".ttc"):
        return 1
    try:
        return len(TTCollection(path, lazy=True).fonts)
    except Exception:  # counted as unreadable when opened
        return 1


def inspect_font(path: str, index: int, chars: str) -> Font | str:
    """The font's style, or why it cannot serve (a skip reason)."""
    try:
        tt = TTFont(path, fontNumber=index, lazy=True)
        cmap = tt.getBestCmap() or {}
        glyphs = [cmap.get(ord(c)) for c in chars]
        if None in glyphs:
            return "lacks a class character"
        if len(set(glyphs)) < len(glyphs):
            return "draws two classes with one glyph"
        if sum(not _names_char(g, c) for g, c in zip(glyphs, chars)) > len(chars) / 4:
            return "symbol font (glyph names are not the characters)"
        return Font(path, index, tt["name"].getBestFamilyName() or Path(path).stem,
                    _weight(tt), _italic(tt), _kind(tt, glyphs))
    except Exception as err:  # fontTools raises many types for broken files
        return f"unreadable ({type(err).__name__})"


def _names_char(glyph: str, char: str) -> bool:
    expected = agl.UV2AGL.get(ord(char), "")
    code = f"{ord(char):04X}"
    return glyph in (expected, f"uni{code}", f"u{code}") or glyph.startswith(f"{expected}.")


def _weight(tt: TTFont) -> str:
    weight = tt["OS/2"].usWeightClass if "OS/2" in tt else 400
    return "light" if weight < 350 else "bold" if weight >= 600 else "regular"


def _italic(tt: TTFont) -> bool:
    slanted = "OS/2" in tt and tt["OS/2"].fsSelection & 0x201  # italic or oblique bit
    return bool(slanted or tt["head"].macStyle & 2 or ("post" in tt and tt["post"].italicAngle))


def _kind(tt: TTFont, glyphs: list[str]) -> str | None:
    if len({tt["hmtx"][g][0] for g in glyphs}) == 1:
        return "monospaced"
    panose = tt["OS/2"].panose if "OS/2" in tt else None
    if panose is None:
        return None
    if panose.bFamilyType == 3:
        return "handwritten"
    if panose.bFamilyType == 2 and 2 <= panose.bSerifStyle <= 10:
        return "serif"
    if panose.bFamilyType == 2 and 11 <= panose.bSerifStyle <= 13:
        return "sans-serif"
    return None  # not stated, or a class (flared, rounded) that is neither


@lru_cache(maxsize=256)
def load_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, index=index, layout_engine=ImageFont.Layout.BASIC)


def fingerprint(font: Font, chars: str) -> np.ndarray | None:
    """Every class glyph drawn, cropped to its ink and shrunk to 16x16: fonts of one design
    come out close whatever their metrics. None when a glyph draws nothing."""
    face = load_font(font.path, font.index, 40)
    cells = []
    for char in chars:
        canvas = Image.new("L", (100, 100), 0)
        ImageDraw.Draw(canvas).text((20, 20), char, font=face, fill=255)
        box = canvas.getbbox()
        if box is None:
            return None
        cells.append(np.asarray(canvas.crop(box).resize((16, 16), Image.Resampling.BILINEAR), np.float32))
    return np.concatenate([c.ravel() for c in cells]) / 255


def distances(prints: np.ndarray) -> np.ndarray:
    """Root-mean-square difference between every two fingerprints."""
    sq = (prints ** 2).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * prints @ prints.T, 0) / prints.shape[1])


def look_alike_groups(fonts: list[Font], dist: np.ndarray) -> list[list[int]]:
    """Fonts joined by family, by a family whose name extends another's, and by look-alike
    pairs (union-find); each group sorted."""
    parent = list(range(len(fonts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_family: dict[str, int] = {}
    pairs = [(i, first_of_family.setdefault(f.family, i)) for i, f in enumerate(fonts)]
    for family, i in first_of_family.items():  # "Noto Serif Display" joins "Noto Serif"
        words = family.split()
        pairs += [(i, first_of_family[" ".join(words[:k])]) for k in range(1, len(words))
                  if " ".join(words[:k]) in first_of_family]
    pairs += list(zip(*np.nonzero(dist < LOOK_ALIKE)))
    for i, j in pairs:
        parent[root(int(i))] = root(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(fonts)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def most_different(members: list[int], dist: np.ndarray, cap: int, rng: random.Random) -> list[int]:
    """Up to `cap` members, each the one farthest from those already picked (a seeded
    start), stopping before an identical-looking one."""
    picked = [rng.choice(members)]
    while len(picked) < min(cap, len(members)):
        rest = [m for m in members if m not in picked]
        gaps = dist[np.ix_(rest, picked)].min(1)
        if gaps.max() < IDENTICAL:
            break
        picked.append(rest[int(gaps.argmax())])
    return sorted(picked)


def usable_fonts(dirs: list[Path], chars: str) -> tuple[list[Font], np.ndarray, Counter]:
    fonts, skipped = [], Counter()
    for path, index in font_files(dirs):
        found = inspect_font(path, index, chars)
        if isinstance(found, str):
            skipped[found] += 1
        else:
            fonts.append(found)
    prints, kept = [], []
    for font in fonts:
        fp = fingerprint(font, chars)
        if fp is None:
            skipped["draws a class character blank"] += 1
        else:
            prints.append(fp)
            kept.append(font)
    dist = distances(np.stack(prints)) if prints else np.zeros((0, 0), np.float32)
    return kept, dist, skipped


# ---- splitting -------------------------------------------------------------------------

def split_fonts(fonts: list[Font], dist: np.ndarray, args, rng: random.Random,
                skipped: Counter) -> dict[str, list[Font]]:
    groups = look_alike_groups(fonts, dist)
    if len(groups) < args.min_groups:
        raise SystemExit(
            f"too few fonts: {len(fonts)} usable fonts in {len(groups)} groups of look-alike designs; "
            f"train, val and zeroshot need at least {args.min_groups} groups (--min-groups). "
            f"Install more fonts ({APT_HINT}) or pass --fonts DIR.")
    picked = [most_different(g, dist, args.fonts_per_group, rng) for g in groups]
    if len(fonts) > sum(map(len, picked)):
        skipped["look-alike beyond --fonts-per-group"] += len(fonts) - sum(map(len, picked))
    rng.shuffle(picked)
    total = sum(map(len, picked))
    splits: dict[str, list[Font]] = {"val": [], "zeroshot": [], "train": []}
    for group in picked:
        held_out = [s for s in ("val", "zeroshot") if len(splits[s]) < args.heldout_fraction * total]
        splits[held_out[0] if held_out else "train"] += [fonts[i] for i in group]
    if not splits["train"]:
        raise SystemExit(f"no fonts left for training: lower --heldout-fraction ({args.heldout_fraction})")
    return splits


# ---- drawing ---------------------------------------------------------------------------

def plan(fonts: list[Font], chars: str, n: int, rng: random.Random) -> list[tuple[Font, str]]:
    """n (font, char) pairs, classes in turn; a class meets every font once before any twice."""
    queues: dict[str, list[Font]] = {c: [] for c in chars}
    pairs = []
    for i in range(n):
        char = chars[i % len(chars)]
        if not queues[char]:
            queues[char] = rng.sample(fonts, len(fonts))
        pairs.append((queues[char].pop(), char))
    return pairs


@lru_cache(maxsize=1024)
def digit_height(path: str, index: int) -> float:
    """Ink height of "0" at 100 px: sizes are set by it, so letters keep their proportions."""
    left, top, right, bottom = load_font(path, index, 100).getbbox("0")
    return max(bottom - top, 1)


def render(font: Font, char: str, colour: tuple[int, int, int], height: int,
           rng: random.Random, side: int = 64, margin: int = 2) -> Image.Image:
    size = max(6, round(100 * height / digit_height(font.path, font.index)))
    while True:
        face = load_font(font.path, font.index, size)
        left, top, right, bottom = face.getbbox(char)
        if max(right - left, bottom - top) <= side - 2 * margin or size <= 6:
            break
        size = max(6, int(size * (side - 2 * margin) / max(right - left, bottom - top)))
    paper = 255 - rng.randint(0, 24)
    image = Image.new("RGB", (side, side), (paper, paper, paper))
    x = rng.randint(margin, max(margin, side - margin - (right - left))) - left
    y = rng.randint(margin, max(margin, side - margin - (bottom - top))) - top
    ImageDraw.Draw(image).text((x, y), char, font=face, fill=colour)
    return image


def captions(font: Font, char: str, colour: str, size: str, rng: random.Random,
             caption_kind: str) -> list[str]:
    names = class_names(char)
    if caption_kind == "class":  # the class alone, the same three phrasings for every image of it
        return [with_article(names[0]), f"the {names[1 % len(names)]}", f"a picture of the {names[-1]}"]
    style = " ".join(font.style_words()) or "regular"
    described = ", ".join(font.style_words() + [colour, size])
    return [f"{with_article(f'{size} {colour} {rng.choice(names)}')} in {with_article(style)} font",
            f"{with_article(rng.choice(names))}, {described}",
            f"the {rng.choice(names)}"]


def make_sample(key: str, font: Font, char: str, rng: random.Random, quality: int,
                caption_kind: str) -> dict:
    colour = rng.choice(sorted(COLOURS))
    ink = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    size = rng.choice(sorted(SIZES))
    image = render(font, char, ink, rng.randint(*SIZES[size]), rng)
    texts = captions(font, char, colour, size, rng, caption_kind)
    return {"__key__": key, "jpg": jpeg_bytes(image, quality), "txt": texts[0],
            "json": {"class": class_names(char)[0], "char": char, "family": font.family,
                     "font_file": Path(font.path).name, "weight": font.weight,
                     "italic": font.italic, "kind": font.kind, "colour": colour, "size": size,
                     "captions": texts[1:]}}


def split_samples(split: str, fonts: list[Font], chars: str, n: int, seed: int, quality: int,
                  caption_kind: str) -> list[dict]:
    pairs = plan(fonts, chars, n, random.Random(f"{seed}/{split}/plan"))
    samples = [make_sample(f"{split[0]}{i:06d}", font, char, random.Random(f"{seed}/{split}/{i}"), quality,
                           caption_kind)
               for i, (font, char) in enumerate(pairs)]
    random.Random(f"{seed}/{split}/order").shuffle(samples)
    return samples


# ---- main ------------------------------------------------------------------------------

PROVENANCE = """# Font development set (generated: do not edit)

Built by `{command}`.
Classes ({n_classes}, OUT/classes.txt): {chars}
Splits by groups of look-alike fonts (no font, family or clone in two splits):

| split | images | fonts | families |
|---|---|---|---|
{rows}

Each sample: `KEY.jpg` (64 px, JPEG quality {quality}), `KEY.txt` ({caption_kind}),
`KEY.json` (`class` — the zero-shot label —, `char`, `family`, `font_file`, `weight`,
`italic`, `kind`, `colour`, `size`, and `captions`: two more phrasings). fonts.json lists
the fonts of each split and the ones left out, by reason.
"""


CAPTION_KINDS = {"described": "a caption naming the class, colour, size and the font's style",
                 "class": "a caption naming the class alone; the same three phrasings for all its images"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--fonts", type=Path, action="append", default=[],
                   help="a folder of font files (repeatable; default: every font fc-list lists)")
    p.add_argument("--chars", default=DEFAULT_CHARS, help=f"the classes (default {DEFAULT_CHARS.replace('%', '%%')})")
    p.add_argument("--train", type=int, default=4500, help="training images (default 4500)")
    p.add_argument("--val", type=int, default=450, help="val images, on held-out fonts (default 450)")
    p.add_argument("--zeroshot", type=int, default=450, help="zero-shot images, on other held-out fonts (default 450)")
    p.add_argument("--heldout-fraction", type=float, default=0.15,
                   help="share of the fonts for val, and again for zeroshot (default 0.15)")
    p.add_argument("--fonts-per-group", type=int, default=8,
                   help="fonts used at most from one group of look-alikes (default 8)")
    p.add_argument("--min-groups", type=int, default=12,
                   help="fail unless the fonts form at least this many groups (default 12)")
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--eval-shards", type=int, default=2, help="shards of val and of zeroshot (default 2)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90: thin strokes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", choices=("described", "class"), default="described",
                   help="described (default): the class, colour, size and font style; class: the class "
                        "alone, in three phrasings (\"a digit 7\", \"the number 7\", \"a picture of the "
                        "numeral 7\"): every image of a class has the same captions, as in a labelled set")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if len(set(args.chars)) != len(args.chars) or len(args.chars) < 2:
        p.error("--chars needs at least 2 distinct characters")
    for char in args.chars:
        class_names(char)
    if min(args.train, args.val, args.zeroshot) < 1 or not 0 < args.heldout_fraction < 0.5:
        p.error("--train/--val/--zeroshot must be >= 1 and --heldout-fraction in (0, 0.5)")
    if min(args.fonts_per_group, args.min_groups - 2, args.train_shards, args.eval_shards) < 1:
        p.error("--fonts-per-group, --train-shards and --eval-shards must be >= 1, --min-groups >= 3")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # it chats about odd but usable tables
    start = time.perf_counter()
    fonts, dist, skipped = usable_fonts(args.fonts, args.chars)
    splits = split_fonts(fonts, dist, args, random.Random(f"{args.seed}/fonts"), skipped)
    counts = {"train": args.train, "val": args.val, "zeroshot": args.zeroshot}
    with staged_output(args.out, args.overwrite) as out:
        sizes = {}
        for split, split_fonts_ in splits.items():
            samples = split_samples(split, split_fonts_, args.chars, counts[split], args.seed, args.quality,
                                    args.captions)
            sizes.update(write_split(out, split, samples,
                                     args.train_shards if split == "train" else args.eval_shards))
        write_sizes(out, sizes)
        atomic_write_text(out / "classes.txt", "".join(class_names(c)[0] + "\n" for c in args.chars))
        atomic_write_json(out / "fonts.json", {"splits": {s: [asdict(f) for f in fs] for s, fs in splits.items()},
                                               "skipped": dict(skipped.most_common())})
        rows = "\n".join(f"| {s} | {counts[s]} | {len(fs)} | {len({f.family for f in fs})} |"
                         for s, fs in splits.items())
        atomic_write_text(out / "README.md", PROVENANCE.format(
            command=" ".join(["python tools/make_font_shards.py", *(argv if argv is not None else sys.argv[1:])]),
            n_classes=len(args.chars), chars=args.chars,
            rows=rows, quality=args.quality, caption_kind=CAPTION_KINDS[args.captions]))
    print(f"{args.out}: " + ", ".join(f"{s} {counts[s]} images / {len(fs)} fonts" for s, fs in splits.items())
          + f"; {len(args.chars)} classes; skipped fonts: {dict(skipped.most_common()) or 'none'}; "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
