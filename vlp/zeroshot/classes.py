"""Class lists: a text file (one class a line) or a json mapping label -> display name.

The label is what an image source reports (folder name, json field); the display name is
what goes into the prompt. In a text file the two are the same.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

from vlp.zeroshot.errors import ZeroShotError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassList:
    labels: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def load_classes(path: str | Path) -> ClassList:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZeroShotError(f"class file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        classes = _from_json(text, path)
    else:
        classes = _from_lines(text.splitlines(), path)
    if len(classes) < 2:
        raise ZeroShotError(f"{path}: need at least 2 classes, got {len(classes)}")
    return classes


def _from_lines(lines: list[str], path: Path) -> ClassList:
    names, blank = [], []
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if name:
            names.append(name)
        else:
            blank.append(number)
    # Blank lines after the last class are just file endings; blank lines between
    # classes may be a paste error, so they are reported.
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    blank = [n for n in blank if n < last]
    if blank:
        log.warning("%s: skipped %d empty line(s): %s", path, len(blank), blank[:10])
    _reject_duplicates(names, path, "class names")
    return ClassList(labels=names, names=names)


def _from_json(text: str, path: Path) -> ClassList:
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _unique_pairs(pairs, path))
    except json.JSONDecodeError as err:
        raise ZeroShotError(f"{path}: not valid json: {err}") from None
    if isinstance(data, list):
        pairs = [(str(x), str(x)) for x in data]
    elif isinstance(data, dict):
        pairs = [(str(k), str(v)) for k, v in data.items()]
    else:
        raise ZeroShotError(f"{path}: expected a json object label -> display name (or a list)")
    labels = [k.strip() for k, _ in pairs]
    names = [v.strip() for _, v in pairs]
    empty = [labels[i] or f"#{i}" for i in range(len(pairs)) if not labels[i] or not names[i]]
    if empty:
        raise ZeroShotError(f"{path}: empty label or display name for {empty}")
    _reject_duplicates(labels, path, "labels")
    _reject_duplicates(names, path, "display names")
    return ClassList(labels=labels, names=names)


def _unique_pairs(pairs: list, path: Path) -> dict:
    keys = Counter(k for k, _ in pairs)
    dupes = sorted(k for k, n in keys.items() if n > 1)
    if dupes:
        raise ZeroShotError(f"{path}: duplicate labels {dupes}")
    return dict(pairs)


def _reject_duplicates(items: list[str], path: Path, what: str) -> None:
    # Two identical prompts give identical embeddings: the classifier could never tell
    # the classes apart, so this is an error rather than a warning.
    counts = Counter(items)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise ZeroShotError(f"{path}: duplicate {what}: {dupes}")


def reject_indistinct(classes: ClassList, prompt_key: Callable[[str], Hashable], where: str) -> None:
    """Display names the model reads as the same text (`apple` and `Apple` under an uncased
    tokenizer, `café` and `cafe` when it strips accents) get identical prompts and so
    identical scores: an error naming them. `prompt_key` maps a name to what the model sees."""
    groups: dict[Hashable, list[str]] = {}
    for name in classes.names:
        groups.setdefault(prompt_key(name), []).append(name)
    clashes = [names for names in groups.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(" = ".join(repr(n) for n in names) for names in clashes[:10])
        raise ZeroShotError(f"{where}: class names the model's tokenizer cannot tell apart (they would "
                            f"score identically): {shown}; merge or rename them")
