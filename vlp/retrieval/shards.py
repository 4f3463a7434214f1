"""Read shard samples together with the byte offset of their image inside the tar.

The index serves images straight from the shards (seek + read by offset), so the embedding
pass reads tars with the data room's `tar_entries`, which also gives each member's offset
(and, unlike `tarfile`, notices a tar cut between two members).
Decoding is left to the caller, so skipping a finished chunk on resume costs no decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from vlp.data.images import IMAGE_EXTENSIONS
from vlp.data.loader import parse_sample
from vlp.data.skips import SkipCounter
from vlp.data.tar import BrokenTar, tar_entries

IMAGE_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class RawSample:
    key: str
    shard: str
    image_member: str
    image_offset: int
    image_size: int
    captions: list[str]
    json: dict = field(default_factory=dict)
    image_bytes: Optional[bytes] = None


def iter_shard(path: str, skips: SkipCounter) -> Iterator[RawSample]:
    """Samples of one tar in member order; bad members are counted skips, a truncated tar
    yields what precedes the damage and records one `bad_tar` skip."""
    group: list[tuple[str, int, bytes]] = []
    key = None
    try:
        with open(path, "rb") as stream:
            for entry in tar_entries(stream):
                member_key = _key_of(entry[0])
                if group and member_key != key:
                    sample = _assemble(path, key, group, skips)
                    if sample is not None:
                        yield sample
                    group = []
                key = member_key
                group.append(entry)
    except (BrokenTar, OSError) as err:
        skips.record("bad_tar", f"{path}: {err}")
        group = []  # the last sample may be cut short: drop it with the counted bad tar
    if group:
        sample = _assemble(path, key, group, skips)
        if sample is not None:
            yield sample


def read_member(shard: str, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def _key_of(name: str) -> str:
    directory, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{directory}/{stem}" if directory else stem


def _ext_of(name: str) -> str:
    base = name.rpartition("/")[2]
    return base.split(".", 1)[1].lower() if "." in base else ""


def _assemble(path: str, key: str, members: list[tuple[str, int, bytes]],
              skips: SkipCounter) -> Optional[RawSample]:
    by_ext = {_ext_of(name): (name, offset, data) for name, offset, data in members}
    # The data room's parser decides what a valid sample is, so the index and training agree.
    raw = {"__key__": key, "__url__": path}
    raw.update({ext: data for ext, (_, _, data) in by_ext.items()})
    parsed = parse_sample(raw, skips)
    if parsed is None:
        return None
    image_bytes, captions, meta = parsed
    name, offset, data = next(by_ext[e] for e in IMAGE_EXTENSIONS if e in by_ext)
    return RawSample(key=key, shard=path, image_member=name, image_offset=offset,
                     image_size=len(data), captions=captions, json=meta, image_bytes=image_bytes)
