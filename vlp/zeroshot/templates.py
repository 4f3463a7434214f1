"""Prompt templates: built-in sets, template files, and learned (CoOp) prompts.

A template is a string with one `{}` where the class name goes. `learned:PATH` names a
file of context vectors written by `vlp.zeroshot.coop`; it is returned as a
`LearnedPrompt` marker and the classifier loads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlp.zeroshot.errors import ZeroShotError

SIMPLE = ["a photo of a {}."]

# The 80 prompts Radford et al. published for ImageNet zero-shot evaluation (CLIP, 2021).
IMAGENET80 = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

BUILTIN = {"simple": SIMPLE, "imagenet80": IMAGENET80, "none": ["{}"]}
LEARNED_PREFIX = "learned:"


@dataclass(frozen=True)
class LearnedPrompt:
    """A CoOp context file; the classifier turns it into class embeddings."""
    path: Path


def load_templates(spec: str) -> list[str] | LearnedPrompt:
    """`simple` | `imagenet80` | `none` | `learned:PATH` | a text file, one template a line."""
    if spec in BUILTIN:
        return list(BUILTIN[spec])
    if spec.startswith(LEARNED_PREFIX):
        path = Path(spec[len(LEARNED_PREFIX):]).expanduser()
        if not path.is_file():
            raise ZeroShotError(f"learned prompt file not found: {path}")
        return LearnedPrompt(path)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ZeroShotError(
            f"templates '{spec}' is neither a built-in set ({', '.join(BUILTIN)}), "
            f"'learned:PATH', nor an existing file")
    return parse_template_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def parse_template_lines(lines: list[str], source: str) -> list[str]:
    templates = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise ZeroShotError(f"{source}:{number}: a template needs exactly one '{{}}': {line!r}")
        templates.append(line)
    if not templates:
        raise ZeroShotError(f"{source}: no templates (each line needs one '{{}}')")
    if len(set(templates)) != len(templates):
        dupes = sorted({t for t in templates if templates.count(t) > 1})
        raise ZeroShotError(f"{source}: duplicate templates {dupes}")
    return templates


def fill(template: str, classname: str) -> str:
    return template.replace("{}", classname)
