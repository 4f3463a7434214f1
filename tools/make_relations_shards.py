#!/usr/bin/env python3
"""Build a relations and attribute-binding development set from the demo emoji: two
glyphs in one 64-px image, side by side or stacked, captioned from their CLDR names, with
foils that keep the words and change the meaning.

    python tools/make_relations_shards.py OUT [--demo shards/demo] [--seed 0]

Scenes: two emoji at a few sizes and offsets, left/right or above/below; in half of them
each glyph is recoloured in one hue and named by it. Captions (three phrasings):
"a dog to the left of an apple", "an apple to the right of a dog", "a dog on the left and
an apple on the right"; "a blue dog above a yellow apple", ...
Objects: demo emoji whose CLDR name is short (`--max-name-words`), has no qualifier after
a colon (skin tones, flags), does not look plural, and holds no colour word of the tints;
articles by a generic English rule.

`--objects N` draws every training scene from N emoji (24 for the `relations24` set) and
holds the val pairs out of training, so a short run has binding, not names, to learn.

Splits: `train` scenes pair training emoji; `val` scenes pair emoji that are in training
scenes but never together there ("unseen pair"), and, for a slice (`--unseen-fraction`),
demo val emoji never seen in training at all ("unseen emoji"). Each val scene comes with
its siblings: the same glyphs and layout with the objects' places swapped, and for tinted
scenes also the nouns or the colours swapped, so its caption shares every word with one
to three other val captions. OUT/foils.jsonl, one test a line for pipelines/foils.py:

    {"image": "images/v000012.jpg", "caption": "a dog to the left of an apple",
     "foils": ["an apple to the left of a dog"], "foil_images": ["images/v000013.jpg"],
     "type": "object-swap"}

types: relation-swap (left<->right, above<->below), object-swap (the nouns trade places),
attribute-swap (the colour words trade places); " (unseen emoji)" is appended for the slice.
The foil image is the sibling the foil describes (a Winoground pair). Images of val are
also in OUT/images/ so the foil file's relative paths resolve from its own folder.
Deterministic for a seed and a demo set; a few seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devsets import jpeg_bytes, staged_output, with_article, write_split  # noqa: E402

from vlp.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from vlp.data.tar import tar_members  # noqa: E402
from vlp.data.writer import write_sizes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINTS = {"red": (220, 30, 30), "orange": (245, 140, 0), "yellow": (240, 210, 0),
         "green": (30, 160, 50), "blue": (30, 80, 230), "purple": (140, 40, 190),
         "pink": (245, 100, 180)}
GLYPH_SIZES = (22, 26, 30)
SIDE = 64
# (first at left/top, second at right/bottom) → phrasings; {a}/{b} are the noun phrases.
PHRASINGS = {
    "h": ["{a} to the left of {b}", "{b} to the right of {a}", "{a} on the left and {b} on the right"],
    "v": ["{a} above {b}", "{b} below {a}", "{a} at the top and {b} at the bottom"],
}
FLIPPED = {  # the same phrasings with the relation turned around
    "h": ["{a} to the right of {b}", "{b} to the left of {a}", "{a} on the right and {b} on the left"],
    "v": ["{a} below {b}", "{b} above {a}", "{a} at the bottom and {b} at the top"],
}


@dataclass(frozen=True)
class Emoji:
    key: str
    name: str
    jpg: bytes


@dataclass(frozen=True)
class Scene:
    first: Emoji                     # left or top
    second: Emoji
    axis: str                        # "h" side by side, "v" stacked
    tints: tuple[str, str] | None    # colour of first, second
    boxes: tuple[tuple[int, int, int], tuple[int, int, int]]  # (x, y, size) of each glyph

    def phrase(self, which: int) -> str:
        emoji, tint = (self.first, self.second)[which], self.tints and self.tints[which]
        return with_article(f"{tint} {emoji.name}" if tint else emoji.name)

    def captions(self, flipped: bool = False) -> list[str]:
        templates = (FLIPPED if flipped else PHRASINGS)[self.axis]
        return [t.format(a=self.phrase(0), b=self.phrase(1)) for t in templates]

    def swapped_places(self) -> "Scene":  # what the relation-swapped caption describes
        tints = self.tints and self.tints[::-1]
        return replace(self, first=self.second, second=self.first, tints=tints)

    def swapped_nouns(self) -> "Scene":
        return replace(self, first=self.second, second=self.first)

    def swapped_tints(self) -> "Scene":
        return replace(self, tints=self.tints[::-1])

    def objects(self) -> frozenset[str]:
        return frozenset((self.first.key, self.second.key))


# ---- objects ---------------------------------------------------------------------------

def read_emoji(demo: Path, split: str) -> list[Emoji]:
    shards = sorted(demo.glob(f"{split}-*.tar"))
    if not shards:
        raise SystemExit(f"no {split}-*.tar in {demo}: build the demo set (tools/make_demo_shards.py) or pass --demo")
    members: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with open(shard, "rb") as stream:
            for name, data in tar_members(stream):
                key, _, ext = name.rpartition(".")
                members.setdefault(key, {})[ext] = data
    return [Emoji(key, json.loads(m["json"])["name"], m["jpg"])
            for key, m in sorted(members.items()) if "jpg" in m and "json" in m]


def nameable(name: str, max_words: int) -> bool:
    """Short, unqualified, singular-looking and free of the tints' words."""
    words = name.split()
    last = words[-1].lower() if words else ""
    plural = re.search(r"[^su]s$", last) is not None and not last.endswith(("ss", "us", "is"))
    return (0 < len(words) <= max_words and ":" not in name and not plural
            and not {w.lower() for w in words} & TINTS.keys())


def object_pool(demo: Path, split: str, max_words: int) -> list[Emoji]:
    emoji = read_emoji(demo, split)
    pool = [e for e in emoji if nameable(e.name, max_words)]
    print(f"{split}: {len(pool)} of {len(emoji)} demo emoji have a short plain name", file=sys.stderr)
    return pool


# ---- scenes ----------------------------------------------------------------------------

def random_scene(first: Emoji, second: Emoji, rng: random.Random, tinted: bool) -> Scene:
    axis = rng.choice("hv")
    sizes = (rng.choice(GLYPH_SIZES), rng.choice(GLYPH_SIZES))
    boxes = []
    for slot, size in enumerate(sizes):
        along = rng.randint(slot * SIDE // 2, (slot + 1) * SIDE // 2 - size)  # own half
        across = min(max(0, (SIDE - size) // 2 + rng.randint(-8, 8)), SIDE - size)
        boxes.append((along, across, size) if axis == "h" else (across, along, size))
    tints = tuple(rng.sample(sorted(TINTS), 2)) if tinted else None
    return Scene(first, second, axis, tints, tuple(boxes))


def draw(scene: Scene) -> Image.Image:
    canvas = Image.new("RGB", (SIDE, SIDE), (255, 255, 255))
    for which, (x, y, size) in enumerate(scene.boxes):
        emoji = (scene.first, scene.second)[which]
        glyph = decoded(emoji.jpg).resize((size, size), Image.Resampling.LANCZOS)
        if scene.tints:
            glyph = tint(glyph, TINTS[scene.tints[which]])
        canvas.paste(glyph, (x, y))
    return canvas


@lru_cache(maxsize=4096)
def decoded(jpg: bytes) -> Image.Image:
    return Image.open(BytesIO(jpg)).convert("RGB")


def tint(glyph: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """One hue: the glyph's shading from dark `colour` to white (the background stays white)."""
    gray = ImageOps.grayscale(glyph)
    return Image.merge("RGB", [gray.point(lut) for lut in tint_tables(colour)])


@lru_cache(maxsize=None)
def tint_tables(colour: tuple[int, int, int]) -> tuple[list[int], ...]:
    """Gray level → R, G, B: dark `colour` at black, `colour` at mid-gray, white at white."""
    dark = tuple(c * 2 // 5 for c in colour)
    ramp = ImageOps.colorize(Image.linear_gradient("L").resize((1, 256)), black=dark,
                             white=(255, 255, 255), mid=colour)
    return tuple(list(band.tobytes()) for band in ramp.split())


def small_vocabulary(pool: list[Emoji], args) -> tuple[list[Emoji], frozenset[frozenset[str]]]:
    """`--objects N`: N emoji of the pool, and pairs of them kept out of training for the
    val groups (with few objects every pair would otherwise meet in training)."""
    if args.objects > len(pool):
        raise SystemExit(f"--objects {args.objects}: only {len(pool)} usable training emoji")
    rng = random.Random(f"{args.seed}/objects")
    chosen = sorted(rng.sample(pool, args.objects), key=lambda e: e.key)
    pairs = [frozenset((a.key, b.key)) for i, a in enumerate(chosen) for b in chosen[i + 1:]]
    n_held = args.val_groups - round(args.val_groups * args.unseen_fraction)
    if n_held > len(pairs) // 2:
        raise SystemExit(f"--objects {args.objects} makes {len(pairs)} pairs: too few to hold {n_held} out of "
                         f"training for val; lower --val-groups or raise --objects")
    return chosen, frozenset(rng.sample(pairs, n_held))


def train_scenes(pool: list[Emoji], n: int, tinted_fraction: float, seed: int,
                 held_out: frozenset[frozenset[str]] = frozenset()) -> list[Scene]:
    rng = random.Random(f"{seed}/train")
    scenes = []
    while len(scenes) < n:
        pair = rng.sample(pool, 2)
        if frozenset(e.key for e in pair) not in held_out:
            scenes.append(random_scene(*pair, rng, rng.random() < tinted_fraction))
    return scenes


def siblings(scene: Scene) -> list[Scene]:
    """The scene and the ones whose captions reuse its words: places swapped, and for a
    tinted scene nouns or tints swapped."""
    if scene.tints is None:
        return [scene, scene.swapped_places()]
    return [scene, scene.swapped_places(), scene.swapped_nouns(), scene.swapped_tints()]


def val_groups(seen: list[Emoji], unseen: list[Emoji], trained: list[Scene], args) -> list[tuple[str, Scene]]:
    """(novelty, base scene) for each val group: pairs of trained emoji never together in
    training, and a slice of pairs of emoji never in training."""
    rng = random.Random(f"{args.seed}/val")
    together = {s.objects() for s in trained}
    in_training = sorted({e.key for s in trained for e in (s.first, s.second)})
    by_key = {e.key: e for e in seen}
    n_unseen = round(args.val_groups * args.unseen_fraction)
    if n_unseen and len(unseen) < 2:
        raise SystemExit("--unseen-fraction > 0 needs at least 2 usable demo val emoji")
    groups, used = [], set()
    for _ in range(100 * args.val_groups):
        if len(groups) == args.val_groups:
            break
        novelty = "unseen emoji" if len(groups) < n_unseen else "unseen pair"
        pair = rng.sample(unseen, 2) if novelty == "unseen emoji" else [by_key[k] for k in rng.sample(in_training, 2)]
        objects = frozenset(e.key for e in pair)
        if objects in together or objects in used:
            continue
        used.add(objects)
        groups.append((novelty, random_scene(*pair, rng, tinted=len(groups) % 2 == 1)))
    if len(groups) < args.val_groups:
        raise SystemExit(f"found only {len(groups)} of {args.val_groups} val pairs never together in "
                         f"training: lower --val-groups or --train, or use more emoji")
    return groups


# ---- samples and foils -----------------------------------------------------------------

def sample(key: str, scene: Scene, quality: int, extra: dict) -> dict:
    captions = scene.captions()
    return {"__key__": key, "jpg": jpeg_bytes(draw(scene), quality), "txt": captions[0],
            "json": {"objects": [scene.first.name, scene.second.name],
                     "emoji": [scene.first.key, scene.second.key],
                     "relation": "left of" if scene.axis == "h" else "above",
                     "colours": list(scene.tints) if scene.tints else None,
                     "captions": captions[1:], **extra}}


def foil_lines(keys: list[str], family: list[Scene], novelty: str, rng: random.Random) -> list[dict]:
    """One test per sibling and foil type, in one phrasing chosen per sibling; the foil
    image is the sibling the foil caption describes."""
    where = {scene: key for key, scene in zip(keys, family)}
    suffix = " (unseen emoji)" if novelty == "unseen emoji" else ""
    lines = []
    for key, scene in zip(keys, family):
        phrasing = rng.randrange(len(PHRASINGS[scene.axis]))
        foils = [("relation-swap", scene.captions(flipped=True)[phrasing], scene.swapped_places()),
                 ("object-swap", scene.swapped_nouns().captions()[phrasing], scene.swapped_nouns())]
        if scene.tints:
            foils.append(("attribute-swap", scene.swapped_tints().captions()[phrasing], scene.swapped_tints()))
        for kind, caption, pictured in foils:
            lines.append({"image": f"images/{key}.jpg", "caption": scene.captions()[phrasing],
                          "foils": [caption], "foil_images": [f"images/{where[pictured]}.jpg"],
                          "type": kind + suffix})
    return lines


def val_samples(groups: list[tuple[str, Scene]], quality: int, seed: int) -> tuple[list[dict], list[dict]]:
    samples, lines = [], []
    rng = random.Random(f"{seed}/foils")
    for group, (novelty, base) in enumerate(groups):
        family = siblings(base)
        keys = [f"v{len(samples) + i:06d}" for i in range(len(family))]
        samples += [sample(k, s, quality, {"group": group, "novelty": novelty}) for k, s in zip(keys, family)]
        lines += foil_lines(keys, family, novelty, rng)
    return samples, lines


# ---- main ------------------------------------------------------------------------------

PROVENANCE = """# Relations development set (generated: do not edit)

Built by `{command}` from {demo}.
train: {train} scenes of {train_pool} training emoji; val: {val} scenes in {groups} groups of
siblings ({unseen} groups of demo val emoji never in training); foils.jsonl: {foils} tests
({types}).
Each sample: `KEY.jpg` (64 px), `KEY.txt` + json `captions` (three phrasings),
json `objects`, `emoji` (demo keys), `relation`, `colours` (null: original colours), and for
val `group` and `novelty`. Val images are also under images/ for the foil file.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--demo", type=Path, default=ROOT / "shards" / "demo", help="the demo shards (default shards/demo)")
    p.add_argument("--train", type=int, default=4000, help="training scenes (default 4000)")
    p.add_argument("--val-groups", type=int, default=120,
                   help="val groups: a scene and its siblings, 2 or 4 images (default 120)")
    p.add_argument("--unseen-fraction", type=float, default=0.25,
                   help="share of val groups made of emoji never in training (default 0.25)")
    p.add_argument("--tinted-fraction", type=float, default=0.5,
                   help="share of training scenes with recoloured glyphs (default 0.5; val: every other group)")
    p.add_argument("--max-name-words", type=int, default=2, help="longest emoji name used (default 2 words)")
    p.add_argument("--objects", type=int, default=0,
                   help="draw training scenes from this many emoji only (default 0: all usable ones); "
                        "a small vocabulary makes binding, not naming, the thing to learn")
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--val-shards", type=int, default=2)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if min(args.train, args.val_groups, args.max_name_words, args.train_shards, args.val_shards) < 1:
        p.error("--train, --val-groups, --max-name-words and the shard counts must be >= 1")
    if args.objects and args.objects < 4:
        p.error("--objects must be 0 (all) or >= 4")
    if not (0 <= args.unseen_fraction <= 1 and 0 <= args.tinted_fraction <= 1):
        p.error("--unseen-fraction and --tinted-fraction must be in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    seen = object_pool(args.demo, "train", args.max_name_words)
    unseen = object_pool(args.demo, "val", args.max_name_words)
    if len(seen) < 4:
        raise SystemExit(f"only {len(seen)} usable training emoji in {args.demo}; need at least 4")
    held_out = frozenset()
    if args.objects:
        seen, held_out = small_vocabulary(seen, args)
    trained = train_scenes(seen, args.train, args.tinted_fraction, args.seed, held_out)
    groups = val_groups(seen, unseen, trained, args)
    train = [sample(f"r{i:06d}", s, args.quality, {}) for i, s in enumerate(trained)]
    val, lines = val_samples(groups, args.quality, args.seed)
    with staged_output(args.out, args.overwrite) as out:
        sizes = {**write_split(out, "train", train, args.train_shards),
                 **write_split(out, "val", val, args.val_shards)}
        write_sizes(out, sizes)
        for s in val:
            atomic_write_bytes(out / "images" / f"{s['__key__']}.jpg", s["jpg"])
        atomic_write_text(out / "foils.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
        types = sorted({line["type"] for line in lines})
        atomic_write_text(out / "README.md", PROVENANCE.format(
            command=" ".join(["python tools/make_relations_shards.py", *(argv if argv is not None else sys.argv[1:])]),
            demo=args.demo, train=len(train), train_pool=len(seen), val=len(val), groups=len(groups),
            unseen=sum(n == "unseen emoji" for n, _ in groups), foils=len(lines), types="; ".join(types)))
    print(f"{args.out}: {len(train)} train + {len(val)} val scenes, {len(lines)} foil tests; "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
