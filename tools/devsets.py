"""What the development-set makers (`make_font_shards.py`, `make_relations_shards.py`)
share: an English article rule, JPEG bytes, and writing a whole set into place at once."""
from __future__ import annotations

import io
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image

from vlp.data.writer import ShardWriter

VOWELS = "aeiou"
VOWEL_SOUND_LETTERS = "aefhilmnorsx"  # letters read aloud with a leading vowel: "an F", "an SOS"


def with_article(phrase: str) -> str:
    """`phrase` with "a" or "an" in front, by a generic English spelling rule: "an apple",
    "a dog", "an umbrella", "a unicorn", "a one-way sign", "a eucalyptus", "an ATM sign",
    "an x-ray", "an 8". It reads spelling, not sound, so a rare word comes out wrong ("a hour")."""
    return f"{indefinite_article(phrase.split()[0])} {phrase}"


def indefinite_article(word: str) -> str:
    if word.isupper() and len(word) <= 5:  # an acronym is read letter by letter
        return "an" if word[0].lower() in VOWEL_SOUND_LETTERS else "a"
    lower = word.lower()
    if len(lower) > 1 and lower[1] == "-":  # "x-ray", "T-Rex": the letter's name
        return "an" if lower[0] in VOWEL_SOUND_LETTERS else "a"
    if lower[:1].isdigit():
        return "an" if lower.startswith(("8", "11", "18")) else "a"
    if lower.startswith(("one", "eu", "ewe")):
        return "a"
    if lower.startswith("u") and len(lower) > 2 and lower[1] not in VOWELS and lower[2] in VOWELS:
        return "a"  # "unicorn", "ukulele", "UFO": a "you" sound
    return "an" if lower[:1] in VOWELS else "a"


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside `out` to write the whole set into; it replaces `out` only when
    the block ends without an error, so a failed or killed run leaves the old set as it was."""
    if out.exists() and not overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def write_split(out: Path, split: str, samples: list[dict], shards: int) -> dict[str, int]:
    """`samples` into OUT/{split}-%06d.tar, spread evenly over about `shards` shards."""
    with ShardWriter(out, split, maxcount=max(1, math.ceil(len(samples) / shards))) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.close()
